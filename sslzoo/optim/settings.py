"""The optimisation settings every method shares, as one typed value: optimizer, learning rate
and its scaling with the batch, weight decay and its schedule, warmup, LARS's form.

A method takes ``optim: Optimization = <its official recipe>``; a config changes one field and
keeps the method's other defaults::

    model:
      class_path: sslzoo.methods.SimCLR
      init_args:
        optim:
          lr: 0.12
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName

LRScaling = Literal["linear", "sqrt", "none"]


@dataclass(frozen=True)
class Optimization:
    """How a method's parameters are optimised.

    Args:
        optimizer: ``sgd``, ``lars`` or ``adamw``.
        lr: base learning rate; scaled by the global batch according to ``lr_scaling``.
        lr_scaling: ``linear`` (lr x batch / 256), ``sqrt`` (lr x sqrt(batch)) or ``none``.
        weight_decay: weight decay of the decayed parameters.
        weight_decay_end: if set, weight decay follows a cosine from ``weight_decay`` to this.
        momentum: SGD / LARS momentum.
        betas: AdamW betas.
        warmup_epochs: linear learning-rate warmup length, in epochs (fractions allowed).
        start_warmup_lr: learning rate at step 0 of the warmup.
        min_lr: learning rate at the end of the cosine decay (not scaled).
        min_lr_ratio: if set, the cosine ends at this fraction of the peak (scaled) learning
            rate instead of at ``min_lr`` (Barlow Twins and VICReg: 0.001).
        lars_trust_coefficient: LARS trust coefficient (eta).
        lars_trust_ratio: ``update`` (eta ||w|| / ||g + wd w||: SimCLR, MoCo v3, BYOL, DINO,
            Barlow Twins, VICReg) or ``larc`` (eta ||w|| / (||g|| + wd ||w||): apex LARC, as
            SwAV runs it).
        lars_lr_in_momentum: LARS scales the update by the learning rate before the momentum
            buffer (SimCLR's ``classic_momentum``) rather than after (torch's SGD).
        exclude_bias_and_norm: exclude biases and norm parameters (every tensor with ndim <= 1)
            from weight decay and LARS adaptation.
    """

    optimizer: OptimizerName = "sgd"
    lr: float = 0.05
    lr_scaling: LRScaling = "linear"
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    start_warmup_lr: float = 0.0
    min_lr: float = 0.0
    min_lr_ratio: float | None = None
    lars_trust_coefficient: float = 1e-3
    lars_trust_ratio: TrustRatio = "update"
    lars_lr_in_momentum: bool = False
    exclude_bias_and_norm: bool = True

    def replace(self, **changes: Any) -> Optimization:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def as_settings(value: Any, default: Any) -> Any:
    """``value`` as an instance of ``default``'s dataclass: a mapping (a checkpoint's
    hyper-parameters, a config) fills the fields it names over ``default``'s; ``None`` gives
    ``default``; an instance is kept."""
    if value is None:
        return default
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(default)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise TypeError(f"{type(default).__name__} has no field {', '.join(unknown)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return dataclasses.replace(default, **fields)
    return value
