"""LARS without host-device syncs: lightly's update, with its zero-norm test on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer


class LARS(Optimizer):
    """SGD with momentum and LARS layer-wise adaptation ("Large batch training of
    convolutional networks", You et al. 2017): the update of ``lightly.utils.lars.LARS``
    (PyTorch Lightning Bolts'), with the same arguments, state and checkpoints.

    For each parameter ``p`` with gradient ``g`` in a group with weight decay ``wd != 0``::

        if ||p|| != 0 and ||g|| != 0:
            g = (g + wd p) * trust_coefficient ||p|| / (||g|| + wd ||p|| + eps)
        (else g is left alone: neither decayed nor scaled)

    then, with momentum ``m``: ``buf = g`` on the first step, ``buf = m buf + (1 - dampening) g``
    after, ``g = g + m buf`` (nesterov) or ``g = buf``; and ``p = p - lr g``. Groups with
    ``wd == 0`` take plain momentum-SGD steps: no decay and no adaptation (the official
    SimCLR/BYOL rule for biases and norms, in their own no-decay group).

    lightly tests the norms with ``if p_norm != 0 and g_norm != 0`` on tensors: on a GPU, two
    host-device syncs per parameter per step. Here the test is a ``torch.where`` on the device.
    The step runs on (device, dtype) buckets of a group with ``torch._foreach_*`` ops: on a GPU
    a whole bucket at once (the norms of every parameter in one call, the trust ratios as one
    stacked tensor), on a CPU one tensor at a time, which keeps each tensor in cache through
    its step (torch's own rule for its optimizers' ``foreach`` default). The operations and
    their order are lightly's, and so are the results (equal bit for bit on CPU, in float32
    and float64, where compared).

    Args:
        params: parameters or parameter groups (each may set its own ``weight_decay``...).
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: weight decay (L2 penalty added to the gradient before adaptation).
        nesterov: Nesterov momentum.
        trust_coefficient: LARS trust coefficient (eta).
        eps: added to the trust ratio's denominator.
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
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups of older or lightly's checkpoints
            group.setdefault("nesterov", False)
            group.setdefault("foreach", None)

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
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        if weight_decay != 0:
            updates = self._adapted(params, grads, group)
        else:
            updates = grads  # read only below: the gradients are never changed
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
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    @staticmethod
    def _adapted(
        params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        """``(g + wd p) * trust`` where both norms are non-zero, ``g`` elsewhere: new tensors.
        (Parameters whose norm is 0 are 0, finite ones at least; gradients likewise.)"""
        weight_decay = group["weight_decay"]
        norms = torch.stack(torch._foreach_norm([*params, *grads])).view(2, len(params))
        p_norm, g_norm = norms
        # lightly's expression, in its order of operations
        trust = p_norm / (g_norm + p_norm * weight_decay + group["eps"])
        trust = trust * group["trust_coefficient"]
        adapt = norms.ne(0).all(dim=0)  # both norms non-zero
        # Elsewhere lightly leaves g as it is, which (g + wd p) * scale gives exactly with
        # scale 1 where p = 0 (wd p = 0) and scale 0 where g = 0: scale = (||g|| != 0).
        scale = torch.where(adapt, trust, g_norm.ne(0).to(trust.dtype))
        updates = torch._foreach_add(grads, params, alpha=weight_decay)  # lightly's kernels
        torch._foreach_mul_(updates, list(scale.unbind()))
        return updates
