"""The report of ``sslzoo eval all``: ``report.json`` (everything), ``report.md`` (the tables a
person reads) and PNG plots (accuracy against label fraction, accuracy per corruption and
severity, accuracy per group), the trained backbone beside the untrained one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NAMES = ("trained", "untrained")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _get(tree: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def headline_rows(backbones: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per backbone) of the summary table."""
    first = next(iter(backbones.values()))
    rows = []
    for protocol in first.get("knn") or {}:
        rows.append(
            (
                f"kNN {protocol}",
                [_pct(_get(b, "knn", protocol, "top1")) for b in backbones.values()],
            )
        )
    for fraction in first.get("linear") or {}:
        rows.append(
            (
                f"linear probe, {_frac(fraction)} labels",
                [_pct(_get(b, "linear", fraction, "top1")) for b in backbones.values()],
            )
        )
    if "mlp" in first:
        rows.append(
            ("MLP probe, 100% labels", [_pct(_get(b, "mlp", "top1")) for b in backbones.values()])
        )
    for shots in _get(first, "fewshot", "shots") or {}:
        cells = []
        for b in backbones.values():
            s = _get(b, "fewshot", "shots", shots)
            cells.append("-" if s is None else f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}")
        rows.append((f"{shots}-shot logistic regression", cells))
    for fraction in first.get("finetune") or {}:
        rows.append(
            (
                f"fine-tuned, {_frac(fraction)} labels",
                [_pct(_get(b, "finetune", fraction, "top1")) for b in backbones.values()],
            )
        )
    rows += selftrain_rows(backbones)
    for name in _get(first, "robustness", "summary") or {}:
        rows.append(
            (
                f"{name}, mean over corruptions",
                [
                    _pct(_get(b, "robustness", "summary", name, "mean_corruption_accuracy"))
                    for b in backbones.values()
                ],
            )
        )
    rows.append(
        (
            "RankMe (effective rank)",
            [f"{_get(b, 'collapse', 'rankme'):.1f}" for b in backbones.values()],
        )
    )
    return rows


def selftrain_rounds(backbone: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """fraction -> mode -> the test top-1 of each self-training round's student."""
    return {
        fraction: {mode: [r["top1"] for r in s.get("rounds", [])] for mode, s in modes.items()}
        for fraction, modes in (backbone.get("selftrain") or {}).items()
    }


def selftrain_rows(backbones: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """One row per label fraction, self-training mode and round."""
    rounds = [selftrain_rounds(b) for b in backbones.values()]
    rows = []
    for fraction, modes in rounds[0].items():
        for mode, tops in modes.items():
            for i in range(len(tops)):
                cells = [_pct((_get(r, fraction, mode) or [None] * (i + 1))[i]) for r in rounds]
                rows.append((f"{mode} round {i + 1}, {_frac(fraction)} labels", cells))
    return rows


def selftrain_markdown(backbones: dict[str, Any]) -> list[str]:
    """Linear probe, fine-tuning and each self-training round side by side."""
    columns: list[str] = []
    for b in backbones.values():
        for modes in selftrain_rounds(b).values():
            for mode, tops in modes.items():
                columns += [
                    f"{mode} r{i + 1}"
                    for i in range(len(tops))
                    if f"{mode} r{i + 1}" not in columns
                ]
    if not columns:
        return []
    lines = [
        "",
        "## Self-training after fine-tuning (test top-1, %)",
        "",
        "Students learn from the fine-tuned network on the unlabeled training images (the "
        "same labeled subset as fine-tuning); each round's student teaches the next.",
        "",
        "| labels | backbone | linear probe | fine-tuned | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for name, b in backbones.items():
        for fraction, modes in selftrain_rounds(b).items():
            cells = {
                f"{m} r{i + 1}": _pct(t) for m, tops in modes.items() for i, t in enumerate(tops)
            }
            linear = _pct(_get(b, "linear", fraction, "top1"))
            tuned = _pct(_get(b, "finetune", fraction, "top1"))
            row = [_frac(fraction), name, linear, tuned] + [cells.get(c, "-") for c in columns]
            lines.append("| " + " | ".join(row) + " |")
    left_out = [
        f"{mode}, {_frac(fraction)}, {name}: {s['left_out']}"
        for name, b in backbones.items()
        for fraction, modes in (b.get("selftrain") or {}).items()
        for mode, s in modes.items()
        if s.get("left_out")
    ]
    if left_out:
        lines += ["", "Left out: " + "; ".join(left_out) + "."]
    return lines


def _frac(fraction: str) -> str:
    return f"{100 * float(fraction):g}%"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    backbones = report["backbones"]
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: `{report['ckpt']}`  ",
        f"Data: {report['data']['class']}  ",
        f"Selection: {report['selection']}.",
        "",
        "Top-1 accuracy on the test split, % (the untrained column is the same architecture "
        "freshly initialised).",
        "",
        "| protocol | " + " | ".join(backbones) + " |",
        "|---|" + "---|" * len(backbones),
    ]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in headline_rows(backbones)]
    robust = _get(backbones, "trained", "robustness")
    if robust:
        severities = sorted({s for c in robust["accuracy"]["knn"].values() for s in c}, key=int)
        lines += [
            "",
            "## Corruptions (trained backbone, linear probe fitted on clean features)",
            "",
        ]
        lines += ["| corruption | " + " | ".join(f"severity {s}" for s in severities) + " |"]
        lines += ["|---|" + "---|" * len(severities)]
        for corruption, by_severity in robust["accuracy"]["linear"].items():
            lines.append(
                f"| {corruption} | "
                + " | ".join(_pct(by_severity.get(s)) for s in severities)
                + " |"
            )
        if robust.get("left_out"):
            lines += [
                "",
                "Left out: " + "; ".join(f"{k} ({v})" for k, v in robust["left_out"].items()) + ".",
            ]
    lines += selftrain_markdown(backbones)
    groups = _groups(backbones)
    if groups:
        lines += [
            "",
            "## Accuracy per group",
            "",
            "| protocol | backbone | worst group | worst | gap | per group |",
            "|---|---|---|---|---|---|",
        ]
        for (protocol, backbone), g in groups.items():
            per = ", ".join(
                f"{n} {_pct(v['accuracy'])} ({v['images']})" for n, v in g["per_group"].items()
            )
            worst = f"{g.get('worst_group', '-')} | {_pct(g.get('worst_accuracy'))}"
            lines.append(f"| {protocol} | {backbone} | {worst} | {_pct(g.get('gap'))} | {per} |")
    plots = [
        p
        for p in ("label_fractions.png", "robustness.png", "groups.png")
        if p in report.get("plots", [])
    ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _groups(backbones: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(protocol, backbone) -> per-group result, for every protocol that has one."""
    found = {}
    for backbone, result in backbones.items():
        for protocol, value in (result.get("knn") or {}).items():
            if "groups" in value:
                found[(f"kNN {protocol}", backbone)] = value["groups"]
        for name, value in (("linear", _get(result, "linear", "1")), ("MLP", result.get("mlp"))):
            if value and "groups" in value:
                found[(f"{name} probe", backbone)] = value["groups"]
        for fraction, value in (result.get("finetune") or {}).items():
            if "groups" in value:
                found[(f"fine-tuned {_frac(fraction)}", backbone)] = value["groups"]
        for shots, value in (_get(result, "fewshot", "shots") or {}).items():
            if "groups" in value:
                found[(f"{shots}-shot", backbone)] = value["groups"]
        for name, value in (_get(result, "robustness", "summary") or {}).items():
            if "groups" in value:
                found[(f"{name}, corrupted", backbone)] = value["groups"]
    return found


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """Write the PNG plots the report has data for; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = report["backbones"]
    written = []
    fractions = {
        k for b in backbones.values() for key in ("linear", "finetune") for k in (b.get(key) or {})
    }
    if len(fractions) > 0:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, b in backbones.items():
            for key, style in (("linear", "--"), ("finetune", "-")):
                points = sorted((float(k), v["top1"]) for k, v in (b.get(key) or {}).items())
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, marker="o", label=f"{key}, {name}")
            for mode, style in (("distill", ":"), ("noisy-student", "-.")):
                points = sorted(
                    (float(k), modes[mode][-1])
                    for k, modes in selftrain_rounds(b).items()
                    if modes.get(mode)
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, marker="s", label=f"{mode} (last round), {name}")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of training labels")
        ax.set_ylabel("test top-1")
        ax.set_title("Accuracy against label fraction")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "label_fractions.png", dpi=120)
        plt.close(fig)
        written.append("label_fractions.png")
    robust = {n: b["robustness"] for n, b in backbones.items() if b.get("robustness")}
    if robust:
        classifiers = list(next(iter(robust.values()))["accuracy"])
        fig, axes = plt.subplots(
            1, len(classifiers), figsize=(6 * len(classifiers), 4.5), squeeze=False
        )
        for ax, classifier in zip(axes[0], classifiers, strict=True):
            for name, r in robust.items():
                table = r["accuracy"][classifier]
                severities = sorted({s for c in table.values() for s in c}, key=int)
                for i, s in enumerate(severities):
                    values = [table[c].get(s, float("nan")) for c in table]
                    ax.plot(
                        range(len(table)),
                        values,
                        "o" if name == "trained" else "x",
                        alpha=0.35 + 0.65 * (i + 1) / len(severities),
                        color="C0" if name == "trained" else "C1",
                        label=f"{name}, severity {s}" if i in (0, len(severities) - 1) else None,
                    )
                ax.axhline(
                    r["summary"][classifier]["clean"],
                    color="C0" if name == "trained" else "C1",
                    lw=1,
                    ls="--",
                )
            ax.set_xticks(range(len(table)), list(table), rotation=60, ha="right", fontsize=8)
            ax.set_ylabel("test top-1")
            ax.set_title(f"{classifier}: accuracy per corruption (dashed: clean)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "robustness.png", dpi=120)
        plt.close(fig)
        written.append("robustness.png")
    groups = _groups(backbones)
    if groups:
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups)), 4))
        names = sorted({n for g in groups.values() for n in g["per_group"]})
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ys = [g["per_group"].get(n, {}).get("accuracy", 0.0) for g in groups.values()]
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=n)
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(groups))],
            [f"{p}\n{b}" for p, b in groups],
            fontsize=7,
        )
        ax.set_ylabel("test top-1")
        ax.set_title("Accuracy per group")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "groups.png", dpi=120)
        plt.close(fig)
        written.append("groups.png")
    return written


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
