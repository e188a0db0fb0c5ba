"""Detection datasets and training transforms, and the engine's sampler: an infinite, seeded, resumable stream."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import Dataset, Sampler, Subset

from moco_zoo.pretrain.data import sample_seed, seeded_rng


class TrainTransform:
    """Training-time processing of ``(image, target)`` pairs from the readers.

    Random horizontal flip (boxes and masks follow), removal of difficult (unless ``use_difficult``) and crowd
    objects, and of boxes without area. Multi-scale resizing happens inside the model (its transform draws a short
    side from ``min_size_train`` per image), as detectron2's ResizeShortestEdge does.
    """

    def __init__(self, flip_prob: float = 0.5, use_difficult: bool = True, drop_crowd: bool = True):
        self.flip_prob = float(flip_prob)
        self.use_difficult = use_difficult
        self.drop_crowd = drop_crowd

    def __call__(self, image: torch.Tensor, target: Dict[str, Any]):
        target = dict(target)
        n = len(target["boxes"])
        keep = torch.ones(n, dtype=torch.bool)
        if not self.use_difficult and "difficult" in target:
            keep &= ~target["difficult"].bool()
        if self.drop_crowd and "iscrowd" in target:
            keep &= target["iscrowd"] == 0
        boxes = target["boxes"].float()
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            for k, v in list(target.items()):
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and len(v) == n:
                    target[k] = v[keep]
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            w = image.shape[-1]
            image = image.flip(-1)
            b = target["boxes"].clone()
            b[:, 0], b[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
            target["boxes"] = b
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


class InfiniteSampler(Sampler):
    """Endless stream of ``(index, sample_seed)`` pairs for iteration-based training, sharded over ranks.

    Epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e``; rank ``r`` of ``w`` takes every ``w``-th
    index of it. Each pair carries the seed of its augmentation, a function of (seed, rank, position in this rank's
    stream) only, so the data of a run is the same with any number of loader workers and across a resume:
    ``start`` skips the first ``start`` positions (``start = iteration x per-rank batch``).
    """

    def __init__(self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def _epoch(self, e: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + e)
        perm = torch.randperm(self.size, generator=g)[self.rank::self.world_size]
        if len(perm) == 0:  # fewer images than ranks
            perm = torch.randperm(self.size, generator=g)[:1]
        return perm

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        skip, e, position = self.start, 0, self.start
        while True:
            perm = self._epoch(e)
            e += 1
            if skip >= len(perm):
                skip -= len(perm)
                continue
            for index in perm[skip:].tolist():
                yield index, sample_seed(self.seed, self.rank, position)
                position += 1
            skip = 0


class SeededDataset(Dataset):
    """``dataset[(index, seed)]``: ``dataset[index]`` with torch's CPU generator and ``random`` seeded by ``seed``
    (their states restored afterwards), so random transforms depend on the sample's seed only."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        with seeded_rng(seed):
            return self.dataset[int(index)]


def shard(dataset: Dataset, rank: int, world_size: int, limit: Optional[int] = None) -> Subset:
    """Rank ``rank``'s share (every ``world_size``-th item) of the first ``limit`` items of ``dataset``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return Subset(dataset, list(range(rank, n, world_size)))
