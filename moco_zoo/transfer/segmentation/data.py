"""Segmentation training augmentation: random rescale, pad, crop, flip of (image, mask) pairs."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from moco_zoo.data.voc import VOC_IGNORE_INDEX


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
