"""Normalisation choices for detection backbones and heads: ``bn``, ``syncbn`` or ``frozen``.

- ``bn``: ordinary BatchNorm2d, statistics of each rank's own batch.
- ``syncbn``: BatchNorm2d whose batch statistics are shared by every rank of a ``torchrun`` job (the MoCo detection
  protocol). On CUDA this is :class:`torch.nn.SyncBatchNorm`; PyTorch's SyncBatchNorm refuses CPU tensors, so on CPU
  (gloo) :class:`DistributedBatchNorm2d` does the same reduction with differentiable all-reduces. In a single process
  it is plain BatchNorm2d.
- ``frozen``: :class:`torchvision.ops.FrozenBatchNorm2d` (affine transform from fixed statistics, no parameters).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torchvision.ops import FrozenBatchNorm2d

from moco_zoo.precise_bn import batchnorm_modules  # noqa: F401  (re-exported by moco_zoo.transfer.modeling)

NORMS = ("bn", "syncbn", "frozen")


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """The module class used while building a model for ``norm`` (syncbn is converted after construction)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: expected one of {', '.join(NORMS)}")
    return FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics reduced over all ranks; works with any backend (gloo on CPU included).

    Each rank contributes (count, sum, sum of squares) per channel; the sums are all-reduced with autograd-aware
    collectives so gradients flow through the shared statistics exactly as with a single large batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)

        c = x.shape[1]
        count = torch.full((1,), float(x.numel() // max(c, 1)), dtype=x.dtype, device=x.device)
        s = x.sum(dim=(0, 2, 3))
        sq = (x * x).sum(dim=(0, 2, 3))
        packed = all_reduce(torch.cat([s, sq, count]))
        total = packed[-1].clamp(min=1.0)
        mean = packed[:c] / total
        var = (packed[c:2 * c] / total - mean * mean).clamp(min=0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp(min=1.0)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        inv = torch.rsqrt(var + self.eps)
        y = (x - mean[None, :, None, None]) * inv[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a cross-rank one (SyncBatchNorm on CUDA, DistributedBatchNorm2d
    elsewhere), keeping parameters and running statistics. FrozenBatchNorm2d is left alone."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, DistributedBatchNorm2d):
        new = DistributedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


