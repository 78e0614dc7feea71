"""Every shared setting a method re-declares (with its official default) reaches the base
class: a non-default value given to the method is the value the base class uses."""

from __future__ import annotations

import inspect

import pytest

import sslzoo.methods as methods
from sslzoo.methods.base import SSLMethod, init_arguments
from tests.conftest import TINY_RESNET

TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2),
)
# a value unlike any default for each shared setting that lands in ``settings``
OTHER = dict(
    optimizer="adamw", lr=0.321, lr_scaling="sqrt", weight_decay=0.0123, weight_decay_end=0.2,
    momentum=0.77, betas=(0.8, 0.9), warmup_epochs=2.5, start_warmup_lr=1e-4, min_lr=2e-6,
    lars_trust_coefficient=0.02, exclude_bias_and_norm=False, sync_batchnorm=False,
)  # fmt: skip
# settings with two values: the one the method does not default to
FLIPPED = {"lars_trust_ratio": ("update", "larc"), "lars_lr_in_momentum": (False, True)}


@pytest.mark.parametrize(
    "name", ["SimCLR", "MoCoV3", "BYOL", "SimSiam", "SwAV", "DINO", "IBOT", "MAE"]
)
def test_shared_settings_given_to_a_method_reach_the_base_class(name: str) -> None:
    cls = getattr(methods, name)
    declared = set(inspect.signature(cls.__init__).parameters)
    given = {k: v for k, v in OTHER.items() if k in declared}
    for key, values in FLIPPED.items():
        if key in declared:
            default = inspect.signature(cls.__init__).parameters[key].default
            given[key] = next(v for v in values if v != default)
    assert given, "the method re-declares shared settings"
    arch = TINY_VIT if name in ("DINO", "IBOT", "MAE") else TINY_RESNET
    model = cls(**arch, **given)
    for key, value in given.items():
        assert getattr(model.settings, key) == value, key


def test_init_arguments_picks_the_parents_parameters_and_overrides() -> None:
    values = {"self": object(), "lr": 0.5, "temperature": 0.1, "backbone": "resnet18"}
    picked = init_arguments(SSLMethod, values, backbone="resnet50")
    assert picked == {"backbone": "resnet50", "lr": 0.5}
