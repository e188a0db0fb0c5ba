"""Data augmentation of MoCo v1 (arXiv:1911.05722, Sec. 4) and MoCo v2 "aug+" (arXiv:2003.04297), two views.

v1: RandomResizedCrop(scale 0.2-1), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), horizontal flip.
v2: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(0.2),
    Gaussian blur with sigma ~ U[0.1, 2.0] with p=0.5, horizontal flip.
v3 (arXiv:2104.02057, BYOL's asymmetric recipe, arXiv:2006.07733): RandomResizedCrop(scale crop_min-1),
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, RandomGrayscale(0.2), Gaussian blur with p=1.0 (first view) / 0.1
    (second view), solarize with p=0 / 0.2 (second view only), horizontal flip.
All end with ToTensor and ImageNet mean/std normalisation. Randomness comes from the ``torch`` and ``random``
global generators, which the data set seeds per sample (see :mod:`moco_zoo.pretrain.data`) for exact resumption.
"""
from __future__ import annotations

import random
from typing import Callable, List, Optional, Sequence

from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The recipes' hyper-parameters (also used by pretrain.batched_augment, which must draw the same distributions).
CROP_SCALE = (0.2, 1.0)
V1_JITTER = (0.4, 0.4, 0.4, 0.4)
V2_JITTER, V2_JITTER_P = (0.4, 0.4, 0.4, 0.1), 0.8
GRAY_P = 0.2
BLUR_SIGMA, V2_BLUR_P = (0.1, 2.0), 0.5
V3_JITTER = (0.4, 0.4, 0.2, 0.1)
V3_BLUR_P, V3_SOLARIZE_P = (1.0, 0.1), (0.0, 0.2)  # (first view, second view)
V3_CROP_MIN = 0.08  # moco-v3 main_moco.py --crop-min default (its ResNet recipes pass 0.2)
SOLARIZE_THRESHOLD = 128  # PIL ImageOps.solarize: values >= 128 are inverted


class GaussianBlur:
    """PIL Gaussian blur with a radius (sigma) drawn uniformly from ``sigma`` (SimCLR-style, used by MoCo v2)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class Solarize:
    """PIL solarize (BYOL): every channel value v >= 128 becomes 255 - v."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, SOLARIZE_THRESHOLD)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def moco_v1_transform(size: int = 224, crop_min: float = CROP_SCALE[0]) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
        T.RandomGrayscale(p=GRAY_P),
        T.ColorJitter(*V1_JITTER),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(),
    ])


def moco_v2_transform(size: int = 224, crop_min: float = CROP_SCALE[0]) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(*V2_JITTER)], p=V2_JITTER_P),
        T.RandomGrayscale(p=GRAY_P),
        T.RandomApply([GaussianBlur(BLUR_SIGMA)], p=V2_BLUR_P),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(),
    ])


def moco_v3_transform(view: int, size: int = 224, crop_min: float = V3_CROP_MIN) -> T.Compose:
    """View 0 or 1 of the asymmetric MoCo v3 / BYOL recipe (blur always on the first view, solarize on the second)."""
    ops = [
        T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(*V3_JITTER)], p=V2_JITTER_P),
        T.RandomGrayscale(p=GRAY_P),
        T.RandomApply([GaussianBlur(BLUR_SIGMA)], p=V3_BLUR_P[view]),
    ]
    if V3_SOLARIZE_P[view] > 0:
        ops.append(T.RandomApply([Solarize()], p=V3_SOLARIZE_P[view]))
    return T.Compose(ops + [T.RandomHorizontalFlip(), T.ToTensor(), normalize()])


def pretrain_transform(recipe: str, size: int = 224, crop_min: float = CROP_SCALE[0]) -> T.Compose:
    if recipe == "v1":
        return moco_v1_transform(size, crop_min)
    if recipe == "v2":
        return moco_v2_transform(size, crop_min)
    raise ValueError(f"unknown augmentation recipe {recipe!r}: expected v1 or v2 (v3 has two views: "
                     f"pretrain_views)")


def pretrain_views(recipe: str, size: int = 224, crop_min: float = CROP_SCALE[0]) -> "TwoCropsTransform":
    """The two-view transform of a recipe: the same augmentation twice (v1, v2) or the asymmetric pair (v3)."""
    if recipe == "v3":
        return TwoCropsTransform(moco_v3_transform(0, size, crop_min), moco_v3_transform(1, size, crop_min))
    return TwoCropsTransform(pretrain_transform(recipe, size, crop_min))


class TwoCropsTransform:
    """Two independent augmentations of the same image: (query view, key view); ``second`` (default: ``base``) is
    the transform of the second view (MoCo v3's asymmetric recipe)."""

    def __init__(self, base: Callable, second: Optional[Callable] = None) -> None:
        self.base = base
        self.second = base if second is None else second

    def __call__(self, img: Image.Image) -> List:
        return [self.base(img), self.second(img)]

    def __repr__(self) -> str:
        if self.second is self.base:
            return f"{type(self).__name__}({self.base!r})"
        return f"{type(self).__name__}({self.base!r}, {self.second!r})"


def eval_transform(size: int = 224) -> T.Compose:
    """Center-crop evaluation: resize the short side to size * 256/224, then crop ``size``."""
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(), normalize()])


def linear_train_transform(size: int = 224) -> T.Compose:
    """Linear-probe training augmentation (RandomResizedCrop default scale + flip), as the protocol uses."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize()])
