"""Synthetic data generator throughput: scenes rendered and written as JPEG files per second, on one core.

Measures three stages at a given image size: ``render`` (scene only), ``render+jpeg`` (scene and JPEG encoding in
memory) and each writer end to end (``imagefolder``, ``voc``, ``coco``: files on disk, annotations included).
The issue's target is >= 200 images/s at 128 px for render+jpeg on one core.

    python bench/data_throughput.py [--image-size 128] [--num-images 400] [--quick]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import common_args, machine_info, markdown_table, print_header, write_json  # noqa: E402

NAME = "data_throughput"


def main() -> int:
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), NAME)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-images", type=int, default=400)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):  # one core, as the target says
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from moco_zoo.data import write_coco, write_imagefolder, write_voc
    from moco_zoo.data.writers import JPEG_QUALITY, scene_for

    n = 40 if args.quick else args.num_images
    size = args.image_size
    info = machine_info()
    print_header(f"synthetic data throughput ({size} px, {n} images, 1 core)", info)
    rows = []

    def row(stage: str, seconds: float, count: int) -> None:
        rows.append({"stage": stage, "images": count, "seconds": seconds, "img_per_s": count / seconds})

    t0 = time.perf_counter()
    for i in range(n):
        scene_for("voc", "2007", i, size)
    row("render", time.perf_counter() - t0, n)
    t0 = time.perf_counter()
    for i in range(n):
        buf = io.BytesIO()
        scene_for("voc", "2007", i, size).to_pil().save(buf, "JPEG", quality=JPEG_QUALITY)
    row("render+jpeg", time.perf_counter() - t0, n)
    tmp = Path(tempfile.mkdtemp(prefix="moco_zoo_bench_"))
    try:
        for name, fn, count in (
            ("imagefolder", lambda d: write_imagefolder(d, num_images=max(n, 40), image_size=size), max(n, 40)),
            ("voc (2007)", lambda d: write_voc(d, num_images=max(n, 4), image_size=size), max(n, 4)),
            ("coco", lambda d: write_coco(d, num_images=max(n, 2), image_size=size), max(n, 2)),
        ):
            t0 = time.perf_counter()
            fn(tmp / name.split()[0])
            row(f"write {name}", time.perf_counter() - t0, count)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(markdown_table(rows, ["stage", "images", "seconds", "img_per_s"], ["stage", "images", "s", "img/s"]))
    path = write_json(NAME, {"machine": info, "image_size": size, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
