#!/usr/bin/env python
"""Images/s per core of the MoCo augmentation pipelines (v1 and v2 "aug+"), PIL path vs uint8 tensor path.

    python bench/augment_throughput.py                      # 224 px crops from ImageNet-sized JPEGs, and 64 px
    python bench/augment_throughput.py --quick              # smoke run
    python bench/augment_throughput.py --reference /path/to/moco   # adds the original repo's transform lists

Measured in one process on one core (torch threads = 1, as inside a DataLoader worker), best of N passes over a
small set of in-memory JPEG files:

* ``decode``: JPEG bytes -> RGB image (PIL ``Image.open().convert("RGB")`` and ``torchvision.io.decode_jpeg``).
* ``pil``: our engine's recipe (``moco_zoo.pretrain.augment.pretrain_transform``), i.e. PIL ops + ToTensor + Normalize.
* ``tensor-v2``: the same recipe with ``torchvision.transforms.v2`` on a uint8 CHW tensor (crop first, colour ops on
  the small uint8 crop, float conversion + normalisation last). A candidate implementation defined here, with the
  same distributions (crop scale, jitter strengths, p's, blur sigma range) as the paper's recipe.
* ``reference``: the original facebookresearch/moco transform lists (with ``--reference``), rebuilt from their
  main_moco.py with their ``moco.loader.GaussianBlur``.

"per image" = decode once + two augmented views, what one training sample costs a DataLoader worker.
"""
from __future__ import annotations

import argparse
import io
import math
import random
import sys
import time

import _common as C

import numpy as np
import torch
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- inputs
def synthetic_jpegs(n: int, width: int, height: int, seed: int = 0, quality: int = 90) -> list:
    """``n`` JPEG byte strings of smooth random colour fields with shapes (content matters little for speed)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 2)), int(rng.integers(0, height - 2))
            x1, y1 = x0 + int(rng.integers(2, max(3, width // 2))), y0 + int(rng.integers(2, max(3, height // 2)))
            draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_tensor(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


# ---------------------------------------------------------------------------------------------- recipes
def ours_pil(recipe: str, size: int):
    """Our engine's transform (PIL), or None when pretrain/augment.py does not provide it yet."""
    try:
        from moco_zoo.pretrain.augment import pretrain_transform
    except ImportError:
        return None
    return pretrain_transform(recipe, size)


def tensor_v2(recipe: str, size: int, blur_kernel: int = 0):
    """The paper's recipe on uint8 CHW tensors with torchvision.transforms.v2 (candidate for the engine).

    Blur: PIL's GaussianBlur(radius=sigma) is a Gaussian of std sigma; the tensor kernel covers +-3 sigma_max.
    """
    from torchvision.transforms import v2

    k = blur_kernel or (2 * math.ceil(3 * 2.0) + 1)
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if recipe == "v1":
        ops = [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
               v2.RandomGrayscale(p=0.2),
               v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
               v2.RandomHorizontalFlip()]
    elif recipe == "v2":
        ops = [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
               v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               v2.RandomGrayscale(p=0.2),
               v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
               v2.RandomHorizontalFlip()]
    else:
        raise ValueError(recipe)
    return v2.Compose(ops + tail)


def tensor_v2_nohue(recipe: str, size: int):
    """tensor-v2 without the hue jitter: shows what the (expensive) RGB->HSV->RGB round trip costs."""
    from torchvision.transforms import v2

    t = tensor_v2(recipe, size)
    for op in t.transforms:
        inner = op.transforms if isinstance(op, v2.RandomApply) else [op]
        for o in inner:
            if isinstance(o, v2.ColorJitter):
                o.hue = None
    return t


def reference_pil(recipe: str, size: int, ref_path: str):
    """The original main_moco.py augmentation list (their loader.GaussianBlur), crop size ``size``."""
    if ref_path not in sys.path:
        sys.path.insert(0, ref_path)
    import moco.loader  # from the reference checkout (facebookresearch/moco @ 4397a04)
    import torchvision.transforms as transforms

    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if recipe == "v2":  # their --aug-plus list
        aug = [transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
               transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               transforms.RandomGrayscale(p=0.2),
               transforms.RandomApply([moco.loader.GaussianBlur([0.1, 2.0])], p=0.5),
               transforms.RandomHorizontalFlip(),
               transforms.ToTensor(),
               normalize]
    else:  # their v1 list
        aug = [transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
               transforms.RandomGrayscale(p=0.2),
               transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
               transforms.RandomHorizontalFlip(),
               transforms.ToTensor(),
               normalize]
    return transforms.Compose(aug)


# ---------------------------------------------------------------------------------------------- timing
def run_pass(jpegs, decode, transform, views: int) -> None:
    for data in jpegs:
        img = decode(data)
        for _ in range(views):
            transform(img)


def measure(jpegs, decode, transform, views: int, repeat: int) -> float:
    """Best images/s over ``repeat`` passes (one image = decode + ``views`` augmentations)."""
    run_pass(jpegs[:2], decode, transform, views)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run_pass(jpegs, decode, transform, views)
        best = min(best, time.perf_counter() - t0)
    return len(jpegs) / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "augment_throughput")
    parser.add_argument("--configs", default="224:500x375,64:64x64",
                        help="comma list of CROP:WIDTHxHEIGHT (crop size : source JPEG size)")
    parser.add_argument("--images", type=int, default=64, help="JPEGs per pass")
    parser.add_argument("--repeat", type=int, default=3, help="passes (best-of-N)")
    parser.add_argument("--reference", default=None, help="path to a facebookresearch/moco checkout (4397a04)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One core: the number a DataLoader worker sees (workers also run single-threaded torch).
    torch.set_num_threads(args.threads or 1)
    if args.quick:
        args.images, args.repeat = 8, 1
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    info = C.machine_info()
    C.print_header("Augmentation throughput per core (decode + two views)", info)

    rows = []
    for spec in args.configs.split(","):
        crop, src = spec.split(":")
        crop = int(crop)
        w, h = (int(v) for v in src.split("x"))
        jpegs = synthetic_jpegs(args.images, w, h, seed=args.seed)
        row0 = {"crop": crop, "source": f"{w}x{h}"}
        dec_pil = measure(jpegs, decode_pil, lambda im: im, 0, args.repeat)
        dec_t = measure(jpegs, decode_tensor, lambda im: im, 0, args.repeat)
        rows.append({**row0, "recipe": "-", "path": "decode only (PIL)", "img_s": dec_pil})
        rows.append({**row0, "recipe": "-", "path": "decode only (torchvision.io)", "img_s": dec_t})
        for recipe in ("v1", "v2"):
            paths = []
            t = ours_pil(recipe, crop)
            if t is not None:
                paths.append(("ours: PIL (moco_zoo.pretrain.augment)", decode_pil, t))
            else:
                print(f"note: moco_zoo.pretrain.augment.pretrain_transform not importable; skipping 'ours' for {recipe}")
            if args.reference:
                paths.append(("reference: PIL (moco@4397a04 list)", decode_pil,
                              reference_pil(recipe, crop, args.reference)))
            paths.append(("candidate: uint8 tensor, transforms.v2", decode_tensor, tensor_v2(recipe, crop)))
            paths.append(("candidate: uint8 tensor v2, no hue", decode_tensor, tensor_v2_nohue(recipe, crop)))
            for name, dec, tf in paths:
                ips = measure(jpegs, dec, tf, 2, args.repeat)
                one_view = measure(jpegs[: max(2, len(jpegs) // 2)], dec, tf, 1, args.repeat)
                rows.append({**row0, "recipe": recipe, "path": name, "img_s": ips, "view_img_s": one_view})
    print(C.markdown_table(rows, ["crop", "source", "recipe", "path", "img_s", "view_img_s"],
                           ["crop", "source JPEG", "recipe", "path", "img/s/core (decode + 2 views)",
                            "img/s/core (decode + 1 view)"]))
    print()
    path = C.write_json("augment_throughput", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick,
        "threads": torch.get_num_threads(), "images_per_pass": args.images, "rows": rows,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
