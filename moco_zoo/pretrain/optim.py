"""Optimizers of MoCo v3 (arXiv:2104.02057): LARS for ResNets, AdamW for ViTs, with their parameter groups.

LARS (You et al., "Large Batch Training of Convolutional Networks", arXiv:1708.03888) as the paper uses it: for a
weight matrix / kernel, the update ``g + wd * w`` is rescaled by the trust ratio ``eta * |w| / |g + wd * w|`` and fed
to SGD momentum (``mu <- momentum * mu + update``, ``w <- w - lr * mu``); biases and normalisation parameters (every
tensor with ndim <= 1) get neither weight decay nor the rescaling.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """SGD momentum with layer-wise trust-ratio scaling; groups with ``lars_exclude=True`` skip weight decay and the
    scaling (see the module docstring). State per parameter: ``mu`` (the momentum buffer)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, lars_exclude: bool = False) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters split as LARS needs them: matrices / kernels (decay + trust ratio) and ndim <= 1 tensors
    (biases, BN / LayerNorm parameters, class token: neither)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lars_exclude": False},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]


def make_v3_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                      momentum: float = 0.9) -> torch.optim.Optimizer:
    """``lars`` (ResNet recipe) or ``adamw`` (ViT recipe: every trainable parameter decayed, as moco-v3 does)."""
    if name == "lars":
        return LARS(lars_param_groups(model, weight_decay), lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    raise ValueError(f"unknown MoCo v3 optimizer {name!r}: expected lars or adamw")
