"""``moco-zoo make-data {imagefolder,voc,coco} --out DIR``: write an embedded synthetic dataset."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict

from . import write_coco, write_imagefolder, write_voc
from .verify import find_bad_images, image_files, report_bad_images

FORMATS = ("imagefolder", "voc", "coco")


def add_commands(subparsers: Any) -> None:
    """Register ``make-data`` and ``verify-data`` on the ``moco-zoo`` parser."""
    add_make_data(subparsers)
    add_verify(subparsers)


def add_make_data(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "make-data",
        help="generate a synthetic objects-in-scenes dataset (ImageFolder, VOC or COCO layout)",
        description="Generate a procedural objects-in-scenes dataset in a real on-disk layout: ImageFolder "
        "(train/<class>/*.jpg, val/<class>/*.jpg), PASCAL VOC (VOCdevkit/VOC2007[, VOC2012]) or COCO 2017 "
        "(annotations/instances_*2017.json, train2017/, val2017/). Same seed, same bytes.",
    )
    p.add_argument("format", choices=FORMATS, help="dataset layout to write")
    p.add_argument("--output-dir", "--out", dest="out", required=True,
                   help="output directory (must be absent or empty unless --overwrite; --out is an alias)")
    p.add_argument("--num-images", type=int, default=None,
                   help="number of images (imagefolder/coco: train+val, default 800/200; voc: per year, default 200)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (imagefolder: square, default 64; voc/coco: long side, default 160)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory written by make-data")
    p.add_argument("--voc2012", action="store_true", help="voc only: also write a VOC2012 trainval tree")
    p.add_argument("--val-fraction", type=float, default=None, help="imagefolder only: share of val images (0.25)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``make-data``; bad arguments raise ValueError / FileExistsError (reported by moco_zoo.cli.main)."""

    if args.format not in FORMATS:
        raise ValueError(f"unknown format {args.format!r}; expected one of {', '.join(FORMATS)}")
    if args.voc2012 and args.format != "voc":
        raise ValueError("--voc2012 only applies to the voc format")
    if args.val_fraction is not None and args.format != "imagefolder":
        raise ValueError("--val-fraction only applies to the imagefolder format")
    kwargs: Dict[str, Any] = {"seed": args.seed, "overwrite": args.overwrite}
    if args.num_images is not None:
        kwargs["num_images"] = args.num_images
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    start = time.perf_counter()
    if args.format == "imagefolder":
        if args.val_fraction is not None:
            kwargs["val_fraction"] = args.val_fraction
        path = write_imagefolder(args.out, **kwargs)
    elif args.format == "voc":
        path = write_voc(args.out, voc2012=args.voc2012, **kwargs)
    else:
        path = write_coco(args.out, **kwargs)
    print(f"wrote {args.format} dataset to {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def add_verify(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify-data", help="decode every image under PATH and list all the files that do not decode",
        description="Decode every image below PATH (an ImageFolder, a VOCdevkit, a COCO root or any folder) with a "
                    "progress bar and list all the bad files at once; exit 2 if there are any.")
    p.add_argument("path", help="dataset root or image file")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    files = image_files(args.path)
    bad = find_bad_images(files)
    if bad:
        print(report_bad_images(bad, len(files)), file=sys.stderr)
        return 2
    print(f"{args.path}: all {len(files)} images decode")
    return 0
