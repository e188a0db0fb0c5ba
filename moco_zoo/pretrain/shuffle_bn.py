"""Shuffling BN (arXiv:1911.05722, Sec. 3.3): keep BN statistics from leaking between a query and its positive key.

With BN, the statistics of a mini-batch mix information across its samples, so a model can "cheat" the pretext task
by recognising the sub-batch a positive came from. MoCo encodes the keys with the sample order shuffled across GPUs
(each GPU computes BN over its own sub-batch), then restores the order.

* ``ddp``: the real thing across ranks: gather all keys' images, apply one permutation shared by every rank
  (drawn on rank 0 and broadcast), let each rank encode its slice, then gather and undo the permutation.
* ``split``: an emulation on one device. Every BatchNorm of both encoders becomes a :class:`SplitBatchNorm2d` that
  normalises G groups of the batch separately (like G GPUs with N/G samples each); the key batch is shuffled before
  the key encoder and unshuffled afterwards, so a key's BN group is a random subset that almost never matches the
  group of its query. Sample ``i`` of an encoder's input is in group ``i % G``; the MoCo module implements this by
  reordering the input so that every group is a contiguous block (:func:`split_block_order`, composed with the key
  shuffle into one gather) and normalising each block with one native ``batch_norm``, which keeps channels_last.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco_zoo.device import is_distributed, rank, world_size


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0; identity without DDP. No gradient."""
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


_GRAD_GROUP = None


def _grad_group():
    """A process group of its own for the differentiable gather, so that its backward all_reduce never interleaves
    with DistributedDataParallel's asynchronous gradient buckets on the default group."""
    global _GRAD_GROUP
    if _GRAD_GROUP is None:
        _GRAD_GROUP = dist.new_group()
    return _GRAD_GROUP


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks (all_reduce) and returns this rank's slice.
    Works with gloo (torch.distributed.nn's version needs reduce_scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous(), group=_grad_group())
        ctx.n = x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_grad_group())
        return grad[rank() * ctx.n:(rank() + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable concat of ``x`` from all ranks along dim 0 (identity without DDP)."""
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks. x: NxCxHxW (local) -> (this rank's shuffled NxCxHxW, unshuffle index)."""
    n_local = x.shape[0]
    x_all = concat_all_gather(x)  # (W*N)xCxHxW
    perm = torch.randperm(x_all.shape[0], device=x.device) if rank() == 0 else torch.empty(
        x_all.shape[0], dtype=torch.long, device=x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)  # one permutation shared by all ranks
    idx_unshuffle = torch.argsort(perm)
    mine = perm.view(world_size(), n_local)[rank()]
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle_ddp` on the encoded keys. x: NxC (local, shuffled) -> NxC in the original order."""
    n_local = x.shape[0]
    x_all = concat_all_gather(x)  # (W*N)xC, in shuffled order
    mine = idx_unshuffle.view(world_size(), n_local)[rank()]
    return x_all[mine]


def batch_shuffle_single(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random permutation of the batch on one device. x: NxCxHxW -> (shuffled x, unshuffle index)."""
    perm = torch.randperm(x.shape[0], device=x.device)
    return x[perm], torch.argsort(perm)


def batch_unshuffle_single(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]


def split_groups(n: int, num_splits: int) -> int:
    """Number of BN groups G used for a batch of ``n`` samples: ``num_splits``, but never fewer than 2 samples per
    group (BN of a single 1x1 sample is undefined)."""
    return max(1, min(int(num_splits), n // 2))


def block_sizes(n: int, g: int) -> List[int]:
    """Sizes of ``g`` nearly equal contiguous blocks of ``n`` samples, the larger ones first (``torch.tensor_split``'s
    partition)."""
    return [n // g + (1 if j < n % g else 0) for j in range(g)]


def split_block_order(n: int, num_splits: int, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """The order that puts the interleaved group ``{i : i % G == j}`` into contiguous block ``j``.

    ``x[order]`` has the samples ``j, j + G, j + 2G, ...`` in block ``j`` (positions ``j*N/G ... (j+1)*N/G - 1``), so
    a :class:`SplitBatchNorm2d` applied to ``x[order]`` normalises exactly the interleaved groups of ``x``. ``None`` when no reordering is needed (one group, or ``N`` not
    divisible by ``G``: both groupings then use the same contiguous blocks)."""
    g = split_groups(n, num_splits)
    if g <= 1 or n % g:
        return None
    return torch.arange(n, device=device).view(n // g, g).t().reshape(-1)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, normalises ``G = min(num_splits, N // 2)`` contiguous blocks of the batch
    independently: the single-device emulation of shuffle BN (MoCo, Sec. 3.3).

    The MoCo module reorders each encoder's input with :func:`split_block_order` and restores the order of the output
    (BN is the only layer of a ResNet that mixes samples), so the blocks are the groups ``{i : i % G == j}``. Each
    block is normalised by one native ``batch_norm`` call, which keeps the input's memory format. Running statistics
    are the average of the blocks' updates. In eval mode it is a plain BatchNorm2d with the same parameter and buffer
    names, so state dicts are interchangeable.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = int(num_splits)

    @classmethod
    def convert(cls, module: nn.Module, num_splits: int) -> nn.Module:
        """Replace every BatchNorm2d in ``module`` (in place) by a SplitBatchNorm2d sharing its tensors."""
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d) and not isinstance(child, cls):
                new = cls(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                          affine=child.affine, track_running_stats=child.track_running_stats)
                new.load_state_dict(child.state_dict())
                new.train(child.training)
                setattr(module, name, new)
            else:
                cls.convert(child, num_splits)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = split_groups(x.shape[0], self.num_splits) if self.training else 1
        if g <= 1:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked) if self.num_batches_tracked is not None else 0.0
        else:
            factor = self.momentum
        n, c = x.shape[:2]
        track = self.running_mean is not None
        # Each block updates its own copy of the running statistics (rows of a G x C tensor), averaged afterwards.
        # split(), not tensor_split(): its backward is one concatenation, tensor_split's is a zero-filled full-size
        # gradient per block, summed.
        rm = self.running_mean.unsqueeze(0).repeat(g, 1) if track else None
        rv = self.running_var.unsqueeze(0).repeat(g, 1) if track else None
        outs = [F.batch_norm(chunk, rm[j] if track else None, rv[j] if track else None, self.weight, self.bias,
                             True, factor, self.eps)
                for j, chunk in enumerate(x.split(block_sizes(n, g), dim=0))]
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.mean(0))
                self.running_var.copy_(rv.mean(0))
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_splits={self.num_splits}"


def resolve_shuffle_mode(mode: str, distributed: bool, mechanism: str) -> str:
    """``auto`` -> ``ddp`` under a multi-rank job (the paper), ``off`` in one process (the original code on one GPU,
    whose shuffle only permutes one BN batch). end2end keys need gradients, so under DDP the cross-rank shuffle
    (no-grad all-gather) is replaced by the split emulation on each rank."""
    if mode == "auto":
        mode = ("split" if mechanism == "end2end" else "ddp") if distributed else "off"
    if mode == "ddp" and not distributed:
        raise ValueError("--shuffle-bn ddp needs a multi-process torchrun job; use 'split' (single-device "
                         "emulation) or 'auto'")
    if mode == "ddp" and mechanism == "end2end":
        raise ValueError("--shuffle-bn ddp is not supported with --mechanism end2end (keys carry gradients); "
                         "use 'split' or 'off'")
    return mode
