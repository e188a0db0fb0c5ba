"""Datasets, training transforms, the infinite distributed sampler and the collate function for detection."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler, Subset


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


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class InfiniteSampler(Sampler):
    """Endless stream of shuffled indices for iteration-based training, sharded over ranks.

    Epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e``; rank ``r`` of ``w`` takes every ``w``-th
    index of it. ``start`` skips the first ``start`` indices of this rank's stream, so a resumed run continues with
    exactly the data it would have seen (``start = iteration x per-rank batch``).
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

    def __iter__(self) -> Iterator[int]:
        skip, e = self.start, 0
        while True:
            perm = self._epoch(e)
            e += 1
            if skip >= len(perm):
                skip -= len(perm)
                continue
            yield from perm[skip:].tolist()
            skip = 0


def shard(dataset: Dataset, rank: int, world_size: int, limit: Optional[int] = None) -> Subset:
    """Rank ``rank``'s share (every ``world_size``-th item) of the first ``limit`` items of ``dataset``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return Subset(dataset, list(range(rank, n, world_size)))


def _voc_sets(items: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for item in items:
        for sep in ("-", ":", "_", "/"):
            if sep in item:
                y, s = item.split(sep, 1)
                out.append((y, s))
                break
        else:
            raise ValueError(f"VOC image set {item!r}: expected YEAR-split, e.g. 2007-trainval")
    return out


def build_datasets(cfg: Dict[str, Any], data_root: str):
    """``(train_dataset, test_dataset, class_names)`` for ``cfg["task"]``; test datasets carry no transform."""
    root = Path(data_root)
    train_tf = TrainTransform(cfg["flip_prob"], cfg.get("train_use_difficult", True), drop_crowd=True)
    if cfg["task"] == "voc_det":
        from moco_zoo.data.voc import VOCDetection

        if (root / "VOCdevkit").is_dir() and not (root / "VOC2007").is_dir():
            root = root / "VOCdevkit"
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: VOCdevkit directory not found (pass --data-root VOCdevkit)")
        train = VOCDetection(root, _voc_sets(cfg["train_sets"]), transforms=train_tf,
                             keep_difficult=bool(cfg.get("train_use_difficult", True)))
        test = VOCDetection(root, _voc_sets([cfg["test_set"]]), class_names=train.class_names, keep_difficult=True)
        names = list(train.class_names)
    elif cfg["task"] == "coco_det":
        from moco_zoo.data.coco import CocoInstances

        if not root.is_dir():
            raise FileNotFoundError(f"{root}: COCO root not found (expected annotations/ and train2017/ under it)")
        train = CocoInstances(root, cfg["train_split"], transforms=train_tf, remove_images_without_annotations=True,
                              with_masks=bool(cfg["mask"]))
        test = CocoInstances(root, cfg["test_split"], with_masks=False)
        names = list(train.class_names)
        if list(test.class_names) != names:
            raise ValueError(f"{test.ann_file}: categories differ from {train.ann_file}")
    else:
        raise ValueError(f"unknown task {cfg['task']!r}")
    if cfg.get("max_train_images"):
        train = Subset(train, list(range(min(int(cfg["max_train_images"]), len(train)))))
    if len(train) == 0:
        raise ValueError(f"{data_root}: the training set is empty")
    return train, test, names
