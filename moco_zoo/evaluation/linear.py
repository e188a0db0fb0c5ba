"""Linear-probe sweep on cached features: a grid of linear heads (learning rates x weight decays) trained together,
one pass over the data per epoch, as DINOv2/v3's linear evaluation does (arXiv:2304.07193).

All heads live in one stacked weight ``HxCxD`` (+ bias ``HxC``) and share every batch: the summed per-head
cross-entropies give each head exactly its own gradient. Each head is stepped with its own lr and weight decay by
the update of ``torch.optim.SGD`` (momentum, dampening 0, coupled weight decay), with a per-epoch cosine schedule.
All heads start from the same N(0, 0.01) weights (MoCo's linear-protocol init) and zero bias. The head with the
best top-1 on a validation split carved from train (per class, deterministic) is reported on the test split.
Under ``torchrun`` every rank takes its share of each global batch and the gradients are summed (all-reduce), so
the result equals the single-process one up to float rounding.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from moco_zoo.checkpoint import atomic_torch_save, safe_torch_load
from moco_zoo.device import is_distributed, rank, world_size
from moco_zoo.pretrain.data import sample_seed

logger = logging.getLogger(__name__)


def balanced_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): ``round(fraction * n_c)`` images of every class (at least 1, leaving at least
    1 for training) go to val, drawn by a generator seeded with ``seed``; both index lists sorted."""
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def init_head(dim: int, num_classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CxD weight ~ N(0, 0.01) and C zero bias (the MoCo linear protocol's init), drawn from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(num_classes, dim, generator=g) * 0.01, torch.zeros(num_classes)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch (the same on every rank)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, 0x11A)))


def cosine_factor(epoch: int, epochs: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class LinearSweep:
    """``H = len(lrs) * len(wds)`` linear heads over D-dim features (head ``i`` = ``grid[i]`` = (lr, wd))."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], wds: Sequence[float], *, seed: int = 0,
                 momentum: float = 0.9) -> None:
        self.grid: List[Tuple[float, float]] = [(float(lr), float(wd)) for lr in lrs for wd in wds]
        h = len(self.grid)
        w0, b0 = init_head(dim, num_classes, seed)
        self.weight = w0.expand(h, -1, -1).clone().requires_grad_(True)  # HxCxD
        self.bias = b0.expand(h, -1).clone().requires_grad_(True)  # HxC
        self.momentum = float(momentum)
        self.buffers: Optional[List[torch.Tensor]] = None
        self.lr = torch.tensor([g[0] for g in self.grid])  # H
        self.wd = torch.tensor([g[1] for g in self.grid])  # H

    def to(self, device: torch.device) -> "LinearSweep":
        self.weight = self.weight.detach().to(device).requires_grad_(True)
        self.bias = self.bias.detach().to(device).requires_grad_(True)
        self.lr, self.wd = self.lr.to(device), self.wd.to(device)
        if self.buffers is not None:
            self.buffers = [b.to(device) for b in self.buffers]
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """BxD -> BxHxC (one GEMM with the HC x D stacked weights)."""
        return (x @ self.weight.flatten(0, 1).T).view(len(x), *self.weight.shape[:2]) + self.bias

    @torch.no_grad()
    def step(self, lr_factor: float) -> None:
        """One SGD step of every head: ``d = g + wd p; buf = m buf + d; p -= lr buf`` (torch.optim.SGD's update)."""
        params = (self.weight, self.bias)
        grads = []
        for p in params:
            shape = (-1,) + (1,) * (p.dim() - 1)
            grads.append(p.grad + self.wd.view(shape) * p)
        if self.buffers is None:
            self.buffers = [g.clone() for g in grads]
        else:
            for b, g in zip(self.buffers, grads):
                b.mul_(self.momentum).add_(g)
        for p, b in zip(params, self.buffers):
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.sub_(self.lr.view(shape) * lr_factor * b)
            p.grad = None

    def state_dict(self) -> Dict[str, Any]:
        return {"weight": self.weight.detach().cpu(), "bias": self.bias.detach().cpu(), "grid": self.grid,
                "buffers": None if self.buffers is None else [b.cpu() for b in self.buffers]}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if [tuple(g) for g in sd["grid"]] != self.grid:
            raise ValueError("linear sweep checkpoint: its lr/wd grid differs from the configured one")
        dev = self.weight.device
        self.weight = sd["weight"].to(dev).requires_grad_(True)
        self.bias = sd["bias"].to(dev).requires_grad_(True)
        self.buffers = None if sd["buffers"] is None else [b.to(dev) for b in sd["buffers"]]

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, topk: int = 1, chunk: int = 4096) -> torch.Tensor:
        """H top-``topk`` accuracies (%); a head with non-finite weights (diverged) gets -1."""
        correct = torch.zeros(len(self.grid), device=x.device)
        for xs, ys in zip(torch.split(x, chunk), torch.split(y, chunk)):
            top = self.logits(xs).topk(topk, dim=2).indices  # BxHxk
            correct += (top == ys.view(-1, 1, 1)).any(2).float().sum(0)
        acc = correct * 100.0 / max(1, len(y))
        finite = torch.isfinite(self.weight).flatten(1).all(1) & torch.isfinite(self.bias).all(1)
        return torch.where(finite, acc, torch.full_like(acc, -1.0))


def train_sweep(sweep: LinearSweep, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                seed: int = 0, checkpoint: Optional[Path] = None, progress: bool = False,
                stop_epoch: Optional[int] = None) -> LinearSweep:
    """Train every head of ``sweep`` on features ``x`` (NxD) / labels ``y`` (N); resumable from ``checkpoint``.
    ``stop_epoch``: leave after this many epochs (of the ``epochs`` schedule), e.g. to fit a time-limited job."""
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        ck = safe_torch_load(checkpoint)
        sweep.load_state_dict(ck["sweep"])
        start = int(ck["epoch"])
        logger.info("linear sweep resumed from %s at epoch %d", checkpoint, start)
    r, w = rank(), world_size()
    n = len(y)
    epochs_it = range(start, min(epochs, stop_epoch or epochs))
    if progress and r == 0:
        epochs_it = tqdm(epochs_it, desc=f"linear sweep ({len(sweep.grid)} heads)", leave=False, file=sys.stderr)
    for epoch in epochs_it:
        order = epoch_order(n, seed, epoch).to(x.device)
        for start_i in range(0, n, batch_size):
            batch = order[start_i:start_i + batch_size]
            mine = batch[r::w]
            logits = sweep.logits(x[mine])  # bxHxC
            target = y[mine].unsqueeze(1).expand(-1, logits.shape[1])  # bxH
            # sum over heads of each head's mean loss over the GLOBAL batch: head h gets exactly its own gradient
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / len(batch)
            loss.backward()
            if is_distributed():
                for p in (sweep.weight, sweep.bias):
                    dist.all_reduce(p.grad)
            sweep.step(cosine_factor(epoch, epochs))
        if checkpoint is not None and r == 0:
            atomic_torch_save({"sweep": sweep.state_dict(), "epoch": epoch + 1}, checkpoint)
    return sweep


def run_linear_sweep(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                     lrs: Sequence[float], wds: Sequence[float], epochs: int, batch_size: int, momentum: float = 0.9,
                     val_fraction: float = 0.1, split_seed: int = 0, seed: int = 0,
                     checkpoint: Optional[Path] = None, progress: bool = False) -> Dict[str, Any]:
    """Train the grid on train minus val, choose on val, report the chosen head on test."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    tr, va = balanced_split(train_y.cpu(), val_fraction, split_seed)
    sweep = LinearSweep(train_x.shape[1], num_classes, lrs, wds, seed=seed, momentum=momentum).to(train_x.device)
    train_sweep(sweep, train_x[tr], train_y[tr], epochs=epochs, batch_size=batch_size, seed=seed,
                checkpoint=checkpoint, progress=progress)
    val_acc = sweep.accuracy(train_x[va], train_y[va])
    best = int(torch.argmax(val_acc))  # first of the best (ties: the earlier grid point)
    test1 = sweep.accuracy(test_x, test_y)[best].item()
    test5 = sweep.accuracy(test_x, test_y, topk=min(5, num_classes))[best].item()
    lr, wd = sweep.grid[best]
    return {"top1": test1, "top5": test5, "val_top1": val_acc[best].item(), "best_lr": lr, "best_wd": wd,
            "grid": [{"lr": g[0], "wd": g[1], "val_top1": a} for g, a in zip(sweep.grid, val_acc.tolist())]}
