"""The method contract: a method takes its views as one recipe (``views``) and its optimisation
as one :class:`Optimization` (``optim``), each typed and defaulting to its official recipe, and
declares no view or optimisation setting of its own. What a method is given, an instance or a
mapping (a config, a checkpoint's hyper-parameters), is what the base class uses, and
``--model.help`` documents every setting once, with the method's default."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import re
import sys
import typing
from typing import Any

import pytest

import sslzoo.methods as methods
from sslzoo.augment.recipes import SingleView, Views
from sslzoo.cli import main
from sslzoo.methods.base import SSLMethod
from sslzoo.optim.settings import Optimization
from tests.conftest import TINY_RESNET

METHODS = [
    "SimCLR", "MoCoV3", "BYOL", "SimSiam", "SwAV", "DINO", "DINOv2", "IBOT", "MAE", "BarlowTwins",
    "VICReg", "Distillation",
]  # fmt: skip
TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2),
)
# for every optimisation setting, values unlike the defaults: the first one a method does not
# default to is given to it
OTHER: dict[str, tuple[Any, ...]] = dict(
    optimizer=("adamw", "sgd"), lr=(0.321,), lr_scaling=("sqrt", "none"),
    weight_decay=(0.0123,), weight_decay_end=(0.2,), momentum=(0.77,), betas=((0.8, 0.9),),
    warmup_epochs=(2.5,), start_warmup_lr=(1e-4,), min_lr=(2e-6,), min_lr_ratio=(0.01, 0.02),
    lars_trust_coefficient=(0.02,), lars_trust_ratio=("larc", "update"),
    lars_lr_in_momentum=(True, False), exclude_bias_and_norm=(False, True),
)  # fmt: skip


def arch(name: str) -> dict[str, Any]:
    if name == "Distillation":  # a tiny teacher in place of DINOv2's ViT-B/14
        return {**TINY_RESNET, "teacher": TINY_VIT["backbone"],
                "teacher_kwargs": TINY_VIT["backbone_kwargs"]}  # fmt: skip
    return TINY_VIT if name in ("DINO", "DINOv2", "IBOT", "MAE") else TINY_RESNET


def official(name: str) -> tuple[Views, Optimization]:
    """The method module's official recipe (``VIEWS``, ``OPTIM``)."""
    module = sys.modules[getattr(methods, name).__module__]
    return module.VIEWS, module.OPTIM


def other_optim(default: Optimization) -> Optimization:
    return Optimization(
        **{k: next(v for v in values if v != getattr(default, k)) for k, values in OTHER.items()}
    )


def view_change(default: Views) -> dict[str, float]:
    """A setting of the recipe and a value unlike its default."""
    return {"crop_min_scale": 0.33} if isinstance(default, SingleView) else {"hflip_prob": 0.33}


def with_patch_size(views: Views) -> Views:
    """``views`` as a method on TINY_VIT holds it: DINO and iBOT fill in the recipe's patch
    size from the backbone when it is unset."""
    if getattr(views, "patch_size", 0) is None:
        return views.replace(patch_size=TINY_VIT["backbone_kwargs"]["patch_size"])
    return views


def other_views(default: Views) -> Views:
    return with_patch_size(default.replace(**view_change(default)))


def test_every_method_is_checked() -> None:
    """A new method is covered here too."""
    exported = {n for n in methods.__all__ if n != "SSLMethod"}
    assert all(issubclass(getattr(methods, n), SSLMethod) for n in exported)
    assert exported == set(METHODS)
    assert set(OTHER) == {f.name for f in dataclasses.fields(Optimization)}


@pytest.mark.parametrize("name", METHODS)
def test_views_and_optim_are_typed_recipes_defaulting_to_the_official_ones(name: str) -> None:
    cls = getattr(methods, name)
    parameters = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__)
    views, optim = official(name)
    assert hints["optim"] is Optimization and parameters["optim"].default == optim
    recipe = hints["views"]
    assert issubclass(recipe, Views) and dataclasses.is_dataclass(recipe)
    assert type(parameters["views"].default) is recipe and parameters["views"].default == views
    for settings in (views, optim):  # a default shared by every instance cannot be changed
        assert type(settings).__dataclass_params__.frozen
    # every setting is declared once, in its recipe: none re-declared by the method
    fields = {f.name for f in (*dataclasses.fields(Optimization), *dataclasses.fields(views))}
    assert not fields & set(parameters)


@pytest.mark.parametrize("name", METHODS)
def test_given_settings_reach_the_base_class(name: str) -> None:
    cls = getattr(methods, name)
    views, optim = official(name)
    given_views, given_optim = other_views(views), other_optim(optim)
    model = cls(**arch(name), views=given_views, optim=given_optim)
    assert model.optim == given_optim and model.views == given_views
    # a config names only what it changes: the method's other defaults stay
    change = view_change(views)
    model = cls(**arch(name), optim={"lr": 0.321}, views=change)
    assert model.optim == optim.replace(lr=0.321)
    assert model.views == with_patch_size(views.replace(**change))


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_hyperparameters_hold_plain_settings_that_rebuild_the_method(
    name: str,
) -> None:
    """Checkpoints are loaded with ``weights_only``: the settings are kept as plain mappings,
    and the hyper-parameters give back the same settings."""
    cls = getattr(methods, name)
    views, optim = official(name)
    model = cls(**arch(name), views=other_views(views), optim=other_optim(optim))
    hparams = dict(model.hparams)
    assert hparams["optim"] == dataclasses.asdict(model.optim)
    assert hparams["views"] == dataclasses.asdict(other_views(views))
    # as ``load_from_checkpoint`` does: the arguments the class's ``__init__`` takes
    parameters = inspect.signature(cls.__init__).parameters
    rebuilt = cls(**{k: v for k, v in hparams.items() if k in parameters})
    assert rebuilt.optim == model.optim and rebuilt.views == model.views


def help_text(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *args])
    return out.getvalue()


def entries(text: str) -> dict[str, list[str]]:
    """Each documented option (``  --name ...`` in the help's body, not the usage) and its
    text, whitespace normalised."""
    body = text[text.index("\nHelp for ") :]
    found: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=  --)", body)[1:]:
        option = block.split()[0]
        found.setdefault(option, []).append(" ".join(block.split()))
    return found


def description(entry: str) -> str:
    """An entry's text between the option with its metavar and the type."""
    return entry.split(" ", 2)[2].split("(type:")[0].strip()


def shown(value: Any) -> str:
    return "null" if value is None else str(value)


@pytest.mark.parametrize("name", METHODS)
def test_model_help_documents_every_setting_once_with_the_methods_default(name: str) -> None:
    views, optim = official(name)
    documented = entries(help_text("--model.help", name))
    fields = [f.name for f in dataclasses.fields(Optimization)]
    for field in fields:  # under --model.optim only, once, described, the method's default
        assert [o for o in documented if o.rsplit(".", 1)[-1] == field] == [
            f"--model.optim.{field}"
        ]
        (entry,) = documented[f"--model.optim.{field}"]
        assert description(entry), entry
        assert f"default: {shown(getattr(optim, field))})" in entry, entry
    # the recipe's settings likewise under --model.views, each with the method's value
    for field in dataclasses.fields(views):
        (entry,) = documented[f"--model.views.{field.name}"]
        assert description(entry), entry
        assert f"default: {shown(getattr(views, field.name))})" in entry, entry
