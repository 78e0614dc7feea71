"""Short command-line errors: what was wrong and a "did you mean", instead of the parser's usage
text and its list of every type a value failed to match; and the config keys a change of
``--model`` / ``--data`` class dropped."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import logging
import re
from collections.abc import Iterable

CLASS_PROBLEM = re.compile(
    r"Problem with given class_path '(?P<path>[^']+)':\n(?P<body>(?:.*\n?)*)"
)
NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
)


def import_class(path: str) -> type | None:
    """The class at a dotted path, or None if it cannot be imported."""
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


def init_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up to the parents;
    an argument whose default is a dataclass (``optim``, ``views``) also as ``name.field``."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in params:
            if p.name == "self" or p.kind in skip:
                continue
            names.append(p.name)
            if dataclasses.is_dataclass(p.default):
                names += [f"{p.name}.{f.name}" for f in dataclasses.fields(p.default)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choices (case-insensitive; a nested
    ``group.name`` also matches its bare ``name``), else ``""``."""
    by_lower = {c.lower(): c for c in choices}
    nested = [c for c in by_lower if c.rsplit(".", 1)[-1] == word.lower() and c != word.lower()]
    if nested:
        return "; did you mean " + " or ".join(repr(by_lower[c]) for c in nested) + "?"
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"


def exact_names(argv: list[str], names: dict[str, list[str]]) -> list[str]:
    """``argv`` with class names given in another case spelled as defined (``--model ibot``,
    ``--model.help IBot`` -> ``IBOT``), for each option of ``names``."""
    out = list(argv)
    for i, arg in enumerate(out):
        option, eq, value = arg.partition("=")
        base = option.removesuffix(".help")
        if base not in names:
            continue
        if not eq:
            if i + 1 >= len(out):
                continue
            value = out[i + 1]
        exact = {n.lower(): n for n in names[base]}.get(value.lower())
        if exact is None or exact == value:
            continue
        if eq:
            out[i] = f"{option}={exact}"
        else:
            out[i + 1] = exact
    return out


def _class_body(body: str) -> str:
    """The lines of one class_path problem: up to the next item of the enclosing list."""
    lines = body.splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
    kept = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        kept.append(line[indent:])
    return "\n".join(kept).strip()


def summarize(message: str, names: dict[str, list[str]]) -> str:
    """One short error from a parser message. ``names`` maps ``model`` / ``data`` to the class
    names that may be given without a module."""
    key_match = re.match(r'Parser key "(?P<key>[\w.]+)"', message)
    key = key_match["key"] if key_match else None
    problem = CLASS_PROBLEM.search(message)
    if problem:
        path, body = problem["path"], _class_body(problem["body"])
        name = path.rsplit(".", 1)[-1]
        option = re.match(r"Option '(?P<option>[^']+)' is not accepted", body) or re.match(
            r"unrecognized arguments: --(?P<option>[\w.]+)", body
        )
        cls = import_class(path)
        if option and cls is not None:
            wrong = option["option"]
            hint = did_you_mean(wrong, init_arguments(cls))
            return f"--{key}: {name} has no argument {wrong!r}{hint}"
        value = re.match(r'Parser key "(?P<arg>[\w.]+)":\s*(?P<why>.*)', body, re.S)
        if value:
            why = " ".join(value["why"].split())
            return f"--{key}.init_args.{value['arg']}: {why}"
        if cls is None:
            return f"--{key}: cannot use {path!r} ({' '.join(body.split())})" + _valid(key, names)
        return f"--{key} ({name}): {' '.join(body.split())}"
    unknown = re.search(r"Expected a dot import path string: (?P<name>\S+)", message)
    if unknown and key in names:
        given = unknown["name"]
        return f"unknown {key} {given!r}{did_you_mean(given, names[key])}{_valid(key, names)}"
    lines = [ln for ln in message.splitlines() if not ln.strip().startswith(NOISE)]
    return "\n".join(ln for ln in lines if ln.strip())


def _valid(key: str | None, names: dict[str, list[str]]) -> str:
    return f" (valid names: {', '.join(names[key])})" if key in names else ""


def unrecognized(message: str, options: Iterable[str]) -> str:
    """A "did you mean" for each unrecognised ``--option`` in ``message``."""
    match = re.search(
        r"(?:unrecognized arguments:|does not accept option) '?(?P<args>.*?)'?$", message
    )
    if not match:
        return message
    hints = []
    for arg in match["args"].split():
        if arg.startswith("-") or "." in arg:
            option = "--" + arg.lstrip("-").split("=", 1)[0]
            # neither the enclosing group (--trainer for --trainer.foo) nor list appends (key+)
            keys = [o for o in options if not o.endswith("+") and not option.startswith(o + ".")]
            hints.append(did_you_mean(option, keys).removeprefix("; "))
    return "; ".join([message, *filter(None, hints)])


class DroppedArguments(logging.Handler):
    """Collects the init arguments the parser drops when a config's class is replaced on the
    command line (``--model BYOL`` over a SimCLR config): the parser reports them only in a
    debug log record, which this handler reads."""

    PATTERN = re.compile(
        r"class_path change from '(?P<old>[^']+)' to '(?P<new>[^']+)', discarding init_args: "
        r"(?P<args>\{.*\})",
        re.S,
    )

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.dropped: list[tuple[str, str, list[str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if not match:
            return
        try:
            args = list(ast.literal_eval(match["args"]))
        except (ValueError, SyntaxError):
            args = re.findall(r"'(\w+)': ", match["args"])
        self.dropped.append((match["old"], match["new"], args))

    def messages(self, bases: Iterable[str] = ()) -> list[str]:
        """One line per class change that dropped arguments, leaving out changes from the
        classes named in ``bases`` (the parser starts from the base class's defaults)."""
        lines = []
        for old, new, args in dict.fromkeys((o, n, tuple(a)) for o, n, a in self.dropped):
            old_name, new_name = old.rsplit(".", 1)[-1], new.rsplit(".", 1)[-1]
            if old_name in bases:
                continue
            lines.append(
                f"{new_name} replaces the config's {old_name}; these {old_name} arguments do not "
                f"apply to {new_name} and were dropped: {', '.join(args)}"
            )
        return lines


def parser_logger() -> tuple[logging.Logger, DroppedArguments]:
    """A logger for the argument parser that keeps its debug records to itself, with a
    :class:`DroppedArguments` handler attached."""
    logger = logging.getLogger("sslzoo.cli.parser")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = DroppedArguments()
    logger.addHandler(handler)
    return logger, handler
