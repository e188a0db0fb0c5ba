"""Segmentation data: VOC datasets, train augmentation (random rescale, pad, crop, flip), infinite sharded sampler."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler, Subset

from moco_zoo.data.voc import VOC_IGNORE_INDEX, VOCSegmentation


class SegTrainTransform:
    """Random rescale (x ``scale_range``), pad to ``crop_size`` (image 0, mask ``ignore``), random crop, h-flip.

    Uses torch's global RNG (seeded per DataLoader worker by torch), so runs are reproducible for a given seed.
    """

    def __init__(self, crop_size: int, scale_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5,
                 ignore_index: int = VOC_IGNORE_INDEX):
        self.crop = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        s = lo + (hi - lo) * float(torch.rand(()))
        h, w = image.shape[-2:]
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=s < 1)[0]
            mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ph, pw = max(self.crop - nh, 0), max(self.crop - nw, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore_index)
        h, w = image.shape[-2:]
        y0 = int(torch.randint(0, h - self.crop + 1, ()))
        x0 = int(torch.randint(0, w - self.crop + 1, ()))
        image = image[:, y0:y0 + self.crop, x0:x0 + self.crop]
        mask = mask[y0:y0 + self.crop, x0:x0 + self.crop]
        if float(torch.rand(())) < self.flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


class InfiniteShardedSampler(Sampler):
    """Endless stream of dataset indices for this rank: a fresh seeded permutation per epoch, ranks take disjoint
    interleaved slices. ``start`` skips that many of this rank's indices (resuming mid-schedule)."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        per_epoch = math.ceil(self.size / self.world)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(self.size, generator=g).tolist()
            perm += perm[: per_epoch * self.world - self.size]  # pad so every rank gets per_epoch indices
            mine = perm[self.rank::self.world]
            yield from mine[offset:]
            offset = 0
            epoch += 1

    def __len__(self) -> int:  # pragma: no cover - infinite
        return 2 ** 62


def split_sets(items: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for item in items:
        for sep in (":", "-", "_"):
            if sep in item:
                y, s = item.split(sep, 1)
                out.append((y, s))
                break
        else:
            raise ValueError(f"image set {item!r}: expected YEAR-split, e.g. 2012-train")
    return out


def build_datasets(cfg: Dict[str, Any], data_root: str):
    """``(train, val)`` VOCSegmentation datasets; ``data_root`` is the VOCdevkit directory or its parent."""
    root = Path(data_root)
    if (root / "VOCdevkit").is_dir() and not any(root.glob("VOC20*")):
        root = root / "VOCdevkit"
    data_root = str(root)
    train = VOCSegmentation(data_root, split_sets(cfg["train_sets"]), mask_dir=cfg["mask_dir"],
                            transforms=SegTrainTransform(cfg["crop_size"], cfg["scale_range"], cfg["flip_prob"]))
    val = VOCSegmentation(data_root, split_sets(cfg["val_sets"]), class_names=train.class_names,
                          mask_dir=cfg["mask_dir"])
    if cfg.get("max_train_images"):
        train = _subset(train, cfg["max_train_images"])
    if cfg.get("max_test_images"):
        val = _subset(val, cfg["max_test_images"])
    return train, val


def _subset(ds, n: int):
    sub = Subset(ds, list(range(min(n, len(ds)))))
    sub.class_names = ds.class_names
    sub.num_classes = ds.num_classes
    return sub


def collate_stack(batch):
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)
