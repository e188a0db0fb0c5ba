"""Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576): BN running statistics
recomputed as true averages of per-batch statistics, shared by the kNN baselines (pretrain/) and the transfer
trainer (transfer/)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, List

import torch
from torch import nn


def batchnorm_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """Trainable-statistics BN modules (BatchNorm*, SyncBatchNorm, DistributedBatchNorm2d); not FrozenBatchNorm2d."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any],
                       forward: Callable[[nn.Module, Any], Any] = lambda m, b: m(b)) -> List[nn.Module]:
    """Reset every BN's running statistics and refill them with the cumulative average over ``batches`` (each run
    as ``forward(model, batch)`` in train mode), in place; the BN momenta are restored afterwards. Returns the BN
    modules (callers all-reduce their buffers under DDP). The model is left in train mode."""
    bns = batchnorm_modules(model)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    return bns
