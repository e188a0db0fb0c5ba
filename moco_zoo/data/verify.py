"""Decode every image of a dataset once and list all the bad files at once (``moco-zoo verify-data PATH``, and
``verify_images`` / ``skip_bad_images`` in pretraining), instead of stopping at the first bad file mid-training."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple, Union

from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(root: Union[str, Path]) -> List[Path]:
    """Every image file below ``root`` (an ImageFolder, a VOCdevkit, a COCO root or any folder), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    return sorted(Path(d) / f for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_SUFFIXES))


def check_image(path: Union[str, Path]) -> str:
    """``""`` if PIL decodes the whole image, else why not."""
    try:
        with Image.open(path) as img:
            img.convert("RGB")
        return ""
    except Exception as e:  # any decoder failure is this file's problem
        return f"{type(e).__name__}: {e}"


def find_bad_images(paths: Sequence[Union[str, Path]], *, progress: bool = True,
                    desc: str = "verify images") -> List[Tuple[str, str]]:
    """``[(path, reason)]`` of every file in ``paths`` that does not decode (all of them, not just the first)."""

    bad = []
    for p in tqdm(paths, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        reason = check_image(p)
        if reason:
            bad.append((str(p), reason))
    return bad


def report_bad_images(bad: Iterable[Tuple[str, str]], checked: int) -> str:
    bad = list(bad)
    lines = [f"{len(bad)} of {checked} images do not decode:"] + [f"  {p}: {why}" for p, why in bad]
    return "\n".join(lines)
