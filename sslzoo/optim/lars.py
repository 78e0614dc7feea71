"""LARS as the official SSL recipes run it, with every test of a norm on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.optim.optimizer import Optimizer

TrustRatio = Literal["update", "larc"]


class LARS(Optimizer):
    """SGD with momentum and LARS layer-wise adaptation ("Large batch training of
    convolutional networks", You et al. 2017), in the two forms the official SSL code uses.

    For each parameter ``p`` with gradient ``g`` in a group with ``lars_adapt`` (the default;
    the recipes turn it off for biases and norms, which also get no weight decay), and
    ``u = g + wd p``:

    - ``trust_ratio="update"`` (SimCLR's ``lars_optimizer.py``, MoCo v3's and DINO's
      ``LARS``, BYOL's ``scale_by_lars``): ``u = u * eta ||p|| / ||u||`` where both norms are
      non-zero, else ``u`` unscaled.
    - ``trust_ratio="larc"`` (apex ``LARC`` with ``clip=False``, as SwAV runs it; lightly's
      and Bolts' ``LARS``): ``u = u * eta ||p|| / (||g|| + wd ||p|| + eps)`` where both
      ``||p||`` and ``||g||`` are non-zero, else ``u = g`` (neither decayed nor scaled).

    Groups without ``lars_adapt`` take ``u = g + wd p``. Then, with momentum ``m``:
    ``buf = u`` on the first step, ``buf = m buf + (1 - dampening) u`` after,
    ``u = u + m buf`` (nesterov) or ``u = buf``; and ``p = p - lr u``. With
    ``lr_in_momentum`` (SimCLR's ``classic_momentum``) the learning rate scales ``u`` before
    it enters the buffer, and ``p = p - buf``: the two differ while the learning rate moves
    (warmup, cosine).

    The zero-norm tests are ``torch.where`` on the device (lightly's ``if p_norm != 0`` is two
    host-device syncs per parameter per step). The step runs on (device, dtype) buckets of a
    group with ``torch._foreach_*`` ops: on a GPU a whole bucket at once, on a CPU one tensor
    at a time, which keeps each tensor in cache through its step (torch's own rule for its
    optimizers' ``foreach`` default). With ``trust_ratio="larc"`` the operations and their
    order are lightly's, and so are the results (equal bit for bit on CPU where compared).

    Args:
        params: parameters or parameter groups (each may set its own ``weight_decay``,
            ``lars_adapt``...).
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: weight decay (L2 penalty added to the gradient before adaptation).
        nesterov: Nesterov momentum.
        trust_coefficient: LARS trust coefficient (eta).
        eps: added to the ``larc`` trust ratio's denominator.
        trust_ratio: ``update`` or ``larc``, above.
        lr_in_momentum: scale by the learning rate before the momentum buffer.
        lars_adapt: adapt the groups that do not say otherwise.
        foreach: step whole buckets (True) or one tensor at a time (False); ``None`` takes
            whole buckets on CUDA only.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_ratio: TrustRatio = "update",
        lr_in_momentum: bool = False,
        lars_adapt: bool = True,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if trust_ratio not in ("update", "larc"):
            raise ValueError(f"trust_ratio must be 'update' or 'larc', got {trust_ratio!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
            trust_ratio=trust_ratio,
            lr_in_momentum=lr_in_momentum,
            lars_adapt=lars_adapt,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # groups of older or lightly's checkpoints: lightly's rule, adapted where decayed
            group.setdefault("nesterov", False)
            group.setdefault("foreach", None)
            group.setdefault("trust_ratio", "larc")
            group.setdefault("lr_in_momentum", False)
            group.setdefault("lars_adapt", group["weight_decay"] != 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in buckets.items():
                foreach = group["foreach"]
                if foreach or (foreach is None and device.type == "cuda"):
                    self._step_bucket(group, params)
                else:
                    for p in params:
                        self._step_bucket(group, [p])
        return loss

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The step of the parameters of one group on one device with one dtype."""
        grads = [p.grad for p in params]
        weight_decay, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
        if group["lars_adapt"]:
            updates = self._adapted(params, grads, group)
        elif weight_decay != 0:
            updates = torch._foreach_add(grads, params, alpha=weight_decay)
        else:
            updates = grads  # read only below: the gradients are never changed
        if group["lr_in_momentum"]:
            updates, lr = torch._foreach_mul(updates, lr), 1.0
        if momentum != 0:
            bufs, old_bufs, old_updates = [], [], []
            for p, update in zip(params, updates, strict=True):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    old_bufs.append(buf)
                    old_updates.append(update)
                bufs.append(buf)
            if old_bufs:
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_updates, alpha=1 - group["dampening"])
            if group["nesterov"]:
                updates = torch._foreach_add(updates, bufs, alpha=momentum)
            else:
                updates = bufs
        torch._foreach_add_(params, updates, alpha=-lr)

    @staticmethod
    def _adapted(
        params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        """The adapted update of each parameter (new tensors). Parameters whose norm is 0 are
        0 (finite ones at least); gradients likewise."""
        weight_decay, eta = group["weight_decay"], group["trust_coefficient"]
        updates = torch._foreach_add(grads, params, alpha=weight_decay)
        if group["trust_ratio"] == "update":
            norms = torch.stack(torch._foreach_norm([*params, *updates])).view(2, len(params))
            p_norm, u_norm = norms
            trust = eta * p_norm / u_norm  # MoCo v3's order of operations
            scale = torch.where(norms.ne(0).all(dim=0), trust, torch.ones_like(trust))
        else:
            norms = torch.stack(torch._foreach_norm([*params, *grads])).view(2, len(params))
            p_norm, g_norm = norms
            # lightly's expression, in its order of operations
            trust = p_norm / (g_norm + p_norm * weight_decay + group["eps"])
            trust = trust * eta
            # Elsewhere lightly leaves g as it is, which (g + wd p) * scale gives exactly with
            # scale 1 where p = 0 (wd p = 0) and scale 0 where g = 0: scale = (||g|| != 0).
            scale = torch.where(norms.ne(0).all(dim=0), trust, g_norm.ne(0).to(trust.dtype))
        torch._foreach_mul_(updates, list(scale.unbind()))
        return updates
