"""MoCo augmentation split in two halves, for speed: geometry per image in the loader, photometry batched.

The PIL pipeline of :mod:`moco_zoo.pretrain.augment` spends most of its time on colour jitter and blur, one image at a time,
in DataLoader workers that compete with the training step for the same CPU cores. Here the loader only decodes,
crops, resizes and flips (on uint8 tensors) and draws the photometric parameters; the colour jitter, grayscale and
Gaussian blur then run on the whole batch at once on the training device (``--augment batched``); when training on
the CPU with loader workers, each worker runs them on its batch (:class:`PhotometricCollate`).

The distributions are the recipes' (MoCo v1, arXiv:1911.05722 Sec. 4; MoCo v2 "aug+", arXiv:2003.04297; MoCo v3's
asymmetric BYOL recipe, arXiv:2104.02057, whose second view also solarizes): the
parameters are drawn by torchvision's own ``get_params`` in the order the PIL pipeline draws them, so the same sample
seed gives the same crop, flip, jitter factors and order, grayscale and blur decisions and sigma as
``pretrain_transform``. What differs is arithmetic only: colour ops in float without rounding to uint8 between ops,
and the blur is a true Gaussian truncated at 3 sigma (PIL approximates one with box filters).
"""
from __future__ import annotations

import math
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

from .augment import (BLUR_SIGMA, CROP_SCALE, GRAY_P, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, V1_JITTER,
                      V2_BLUR_P, V2_JITTER, V2_JITTER_P, V3_BLUR_P, V3_JITTER, V3_SOLARIZE_P)

# Columns of the per-view photometric parameter row drawn by GeometricViews.
JITTER, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SIGMA, SOLARIZE = 0, 1, 5, 6, 7, 8, 9, 10, 11, 12
NUM_PARAMS = 13
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision


class Recipe:
    """Hyper-parameters of one augmentation recipe, and the order of its photometric ops.

    ``ops``: all ops in the order they run (what the batched half applies, each to the samples whose flag is set);
    ``view_ops[v]``, ``blur_p[v]``, ``solarize_p[v]``: the ops and probabilities of view ``v`` (0: query / first
    crop, 1: key / second crop), which differ in the asymmetric v3 recipe."""

    def __init__(self, name: str) -> None:
        if name == "v1":
            self.jitter, self.jitter_p, self.gray_p = V1_JITTER, 1.0, GRAY_P
            self.ops = ("gray", "jitter")
            self.blur_p, self.solarize_p, self.view_ops = (0.0, 0.0), (0.0, 0.0), (self.ops, self.ops)
        elif name == "v2":
            self.jitter, self.jitter_p, self.gray_p = V2_JITTER, V2_JITTER_P, GRAY_P
            self.ops = ("jitter", "gray", "blur")
            self.blur_p, self.solarize_p, self.view_ops = (V2_BLUR_P,) * 2, (0.0, 0.0), (self.ops, self.ops)
        elif name == "v3":
            self.jitter, self.jitter_p, self.gray_p = V3_JITTER, V2_JITTER_P, GRAY_P
            self.ops = ("jitter", "gray", "blur", "solarize")
            self.blur_p, self.solarize_p = V3_BLUR_P, V3_SOLARIZE_P
            self.view_ops = (("jitter", "gray", "blur"), self.ops)  # the first view has no solarize op at all
        else:
            raise ValueError(f"unknown augmentation recipe {name!r}: expected v1, v2 or v3")
        self.name = name


class GeometricViews:
    """Loader half: PIL image -> (uint8 views 2xSxSx3, photometric parameters 2xNUM_PARAMS float32).

    Random draws follow the PIL pipeline of the same recipe draw for draw (torch and ``random`` generators), so a
    sample seed set by :class:`pretrain.data.ImageFolderDataset` selects the same augmentation in both pipelines.
    """

    def __init__(self, recipe: str, size: int = 224, scale: Tuple[float, float] = CROP_SCALE) -> None:
        scale = (float(scale[0]), float(scale[1]))
        self.recipe = Recipe(recipe)
        self.size = int(size)
        self.crop = T.RandomResizedCrop(self.size, scale=scale)
        self.color = T.ColorJitter(*self.recipe.jitter)

    def _draw_jitter(self, row: List[float]) -> None:
        c = self.color
        order, b, co, s, h = c.get_params(c.brightness, c.contrast, c.saturation, c.hue)
        row[JITTER] = 1.0
        row[ORDER:ORDER + 4] = [float(o) for o in order.tolist()]
        row[BRIGHTNESS:HUE + 1] = [b, co, s, h]

    def view(self, img: Image.Image, which: int = 0) -> Tuple[np.ndarray, List[float]]:
        """View ``which`` (0 or 1): uint8 SxSx3 and its parameter row, drawing exactly as the PIL pipeline of the
        recipe does (``pretrain_transform(recipe)``, or ``moco_v3_transform(which)``). Crop, resize and flip are the
        PIL operations of that pipeline, so the geometry is identical to it."""
        r = self.recipe
        row = [0.0] * NUM_PARAMS
        row[BRIGHTNESS:HUE] = [1.0, 1.0, 1.0]  # identity factors when jitter is off (hue: 0)
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        for op in r.view_ops[which]:
            if op == "jitter":
                if r.jitter_p >= 1.0 or not r.jitter_p < torch.rand(1):  # T.RandomApply: skip if p < u
                    self._draw_jitter(row)
            elif op == "gray":
                row[GRAY] = float(torch.rand(1) < r.gray_p)
            elif op == "blur" and not r.blur_p[which] < torch.rand(1):  # T.RandomApply draws even for p = 1
                row[BLUR], row[SIGMA] = 1.0, random.uniform(*BLUR_SIGMA)
            elif op == "solarize" and not r.solarize_p[which] < torch.rand(1):
                row[SOLARIZE] = 1.0
        flip = bool(torch.rand(1) < 0.5)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out), row

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (uint8 2xSxSx3 views (query, key), float32 2xNUM_PARAMS parameters)."""
        img = img.convert("RGB")
        (q, pq), (k, pk) = self.view(img, 0), self.view(img, 1)
        return torch.from_numpy(np.stack([q, k])), torch.tensor([pq, pk], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(recipe={self.recipe.name!r}, size={self.size})"


# ------------------------------------------------------------------------------------------ batched colour ops
# x: Nx3xHxW float in [0, 1]; factors: N. Each is the torchvision float-tensor definition, per sample. The ``_``
# variants work in place on ``x`` (e.g. a contiguous slice of the batch) and allocate at most one plane per image:
# the colour ops are memory-bound, so passes over the batch are what they cost.
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Nx3xHxW -> Nx1xHxW luma, summed in torchvision's order (0.2989 r + 0.587 g + 0.114 b)."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend_(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """a <- clamp(f a + (1 - f) b, 0, 1) in place; ``b`` broadcasts (a plane or a scalar per image)."""
    f = f.view(-1, 1, 1, 1)
    return a.mul_(f).add_(b * (1 - f)).clamp_(0.0, 1.0)


def adjust_brightness_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul_(f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend_(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend_(x, grayscale(x), f)


def adjust_hue_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.copy_(adjust_hue(x, f))


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return adjust_brightness_(x.clone(), f)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return adjust_contrast_(x.clone(), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return adjust_saturation_(x.clone(), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``f`` turns. V = max and S = (max - min) / max do not change, so every output channel
    is ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 hue) mod 6``, n = 5, 3, 1 for R, G, B."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)  # NxHxW
    delta = maxc - minc
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h6 = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h6 = h6 + 6.0 * f.view(-1, 1, 1)
    k = torch.remainder(x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + h6.unsqueeze(1), 6.0)  # Nx3xHxW
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * t


def solarize(x: torch.Tensor) -> torch.Tensor:
    """PIL's solarize on [0, 1] values: v -> 1 - v where v >= 128 / 255."""
    return torch.where(x >= SOLARIZE_THRESHOLD / 255.0, 1.0 - x, x)


def blur_matrices(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """NxSxS matrices B with (B @ column) = the column filtered by a Gaussian of std ``sigma[n]`` truncated at
    ``radius`` taps, with reflect padding folded in (torchvision's ``gaussian_blur`` border)."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    k = torch.exp(-0.5 * (taps.to(sigma.dtype).view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)  # Nx(2r+1)
    src = torch.arange(size, device=sigma.device).view(-1, 1) + taps.view(1, -1)  # Sx(2r+1), may leave [0, S)
    src = src.abs()
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # reflect: -1 -> 1, S -> S - 2
    b = torch.zeros(sigma.shape[0], size, size, dtype=sigma.dtype, device=sigma.device)
    b.scatter_add_(2, src.unsqueeze(0).expand(sigma.shape[0], -1, -1), k.unsqueeze(1).expand(-1, size, -1))
    return b


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, (2 radius + 1) taps, reflect padding: two batched matmuls."""
    n, c, h, w = x.shape
    if radius >= min(h, w):
        raise ValueError(f"blur radius {radius} needs images larger than {h}x{w}")
    bh = blur_matrices(sigma, h, radius)  # NxHxH
    bw = bh if w == h else blur_matrices(sigma, w, radius)
    y = torch.matmul(bh.unsqueeze(1), x)  # vertical: Nx1xHxH @ NxCxHxW
    return torch.matmul(y, bw.transpose(1, 2).unsqueeze(1))  # horizontal


_JITTER_OPS = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)  # torchvision's fn_idx order


class BatchedPhotometric:
    """Device half: (uint8 views, parameters) of a batch -> normalised float views, as ``[im_q, im_k]``.

    ``views``: Nx2xSxSx3 uint8, ``params``: Nx2xNUM_PARAMS (what the loader collates from :class:`GeometricViews`).
    """

    def __init__(self, recipe: str, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 blur_sigma: Tuple[float, float] = BLUR_SIGMA) -> None:
        self.recipe = Recipe(recipe)
        self.mean, self.std = tuple(mean), tuple(std)
        self.radius = int(math.ceil(3.0 * blur_sigma[1]))

    def jitter(self, x: torch.Tensor, p: torch.Tensor, p_host: torch.Tensor) -> torch.Tensor:
        """ColorJitter: the four ops in each sample's own random order, each sample with its own factors.

        Samples are sorted by their order (24 permutations), so each group is a contiguous slice that runs its four
        ops in place; the grouping is planned on the host copy of the parameters, without device syncs."""
        order = p_host[:, ORDER:ORDER + 4].long()
        code = (order * torch.tensor([64, 16, 4, 1])).sum(1)
        code = torch.where(p_host[:, JITTER] > 0, code, torch.full_like(code, -1))
        code, perm = torch.sort(code, stable=True)
        groups = torch.unique_consecutive(code, return_counts=True)
        perm = perm.to(x.device, non_blocking=True)
        xs, ps = x[perm], p[perm]
        start = 0
        for c, count in zip(*(g.tolist() for g in groups)):
            if c >= 0:
                seg = slice(start, start + count)
                for op in (c // 64, c // 16 % 4, c // 4 % 4, c % 4):
                    _JITTER_OPS[op](xs[seg], ps[seg, BRIGHTNESS + op])  # in place on the contiguous slice
            start += count
        return x.index_copy_(0, perm, xs)

    def photometric(self, x: torch.Tensor, p: torch.Tensor, p_host: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: Nx3xSxS float in [0, 1]; p: NxNUM_PARAMS on x's device (``p_host``: the same on the CPU)."""
        p_host = p.cpu() if p_host is None else p_host
        for op in self.recipe.ops:
            if op == "jitter":
                x = self.jitter(x, p, p_host)
            elif op == "gray":
                idx = torch.nonzero(p_host[:, GRAY] > 0).flatten()
                if idx.numel():
                    idx = idx.to(x.device, non_blocking=True)
                    x.index_copy_(0, idx, grayscale(x[idx]).expand(-1, 3, -1, -1))
            elif op == "blur":
                idx = torch.nonzero(p_host[:, BLUR] > 0).flatten()
                if idx.numel():
                    idx = idx.to(x.device, non_blocking=True)
                    x.index_copy_(0, idx, gaussian_blur(x[idx], p[idx, SIGMA], self.radius))
            elif op == "solarize":
                idx = torch.nonzero(p_host[:, SOLARIZE] > 0).flatten()
                if idx.numel():
                    idx = idx.to(x.device, non_blocking=True)
                    x.index_copy_(0, idx, solarize(x[idx]))
        return x

    def __call__(self, batch: Sequence[torch.Tensor], device: torch.device | str = "cpu",
                 channels_last: bool = False) -> List[torch.Tensor]:
        views, params = batch
        if views.dtype != torch.uint8 or views.dim() != 5 or views.shape[1] != 2 or views.shape[4] != 3:
            raise ValueError(f"expected uint8 views of shape Nx2xSxSx3 from GeometricViews, got "
                             f"{tuple(views.shape)} {views.dtype}")
        n = views.shape[0]
        p_host = params.float().transpose(0, 1).reshape(2 * n, -1)  # queries then keys: one pass of every op
        views = views.to(device, non_blocking=True)
        with torch.autocast(views.device.type, enabled=False):  # fp32 arithmetic even inside a bf16 region
            return self._apply(views, p_host, n, channels_last)

    def _apply(self, views: torch.Tensor, p_host: torch.Tensor, n: int, channels_last: bool) -> List[torch.Tensor]:
        x = views.transpose(0, 1).reshape(2 * n, *views.shape[2:]).permute(0, 3, 1, 2)  # 2Nx3xSxS: queries, keys
        x = x.contiguous().float().div_(255.0)
        x = self.photometric(x, p_host.to(x.device, non_blocking=True), p_host)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return list(x.split(n))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(recipe={self.recipe.name!r}, blur taps={2 * self.radius + 1})"


class PhotometricCollate:
    """DataLoader ``collate_fn`` that runs :class:`BatchedPhotometric` on each collated batch inside the loader
    workers: ``[(views, params), target, index] -> [[im_q, im_k], targets, indices]``.

    For CPU training with loader workers: each worker runs the colour ops on its whole batch with one thread, in
    parallel with the training step, instead of between steps in the training process (where, with several
    threads on a busy machine, the many short parallel kernels wait on each other). The ops have no randomness of
    their own (their parameters come with the views), so the output is the same wherever they run."""

    def __init__(self, photometric: BatchedPhotometric, channels_last: bool = False) -> None:
        self.photometric, self.channels_last = photometric, channels_last

    def __call__(self, samples):
        images, targets, indices = default_collate(samples)
        with torch.no_grad():
            views = self.photometric(images, "cpu", self.channels_last)
        return views, targets, indices
