"""COCO instance annotations reader (the real COCO 2017 layout) on top of pycocotools.

Layout::
    <root>/annotations/instances_<split>.json
    <root>/<split>/*.jpg

``validate_coco_json`` checks a file before training so a broken annotation fails with a message naming the file and
the annotation id, instead of a shape error deep inside a detector. ``CocoInstances`` is the torch Dataset used by
the detection engines: boxes are converted from COCO ``[x, y, w, h]`` to ``xyxy`` (same continuous pixel coordinates),
category ids are mapped to contiguous labels ``1..C`` (sorted by category id; 0 is background), masks are decoded with
``pycocotools`` ``annToMask`` (polygons and RLE alike). Crowd annotations stay in the target with ``iscrowd=1``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

PathLike = Union[str, os.PathLike]

#: Tolerance (pixels) for boxes that stick out of the image through floating-point rounding.
BBOX_TOLERANCE = 1.0


class CocoFormatError(ValueError):
    """A COCO annotation file is missing or malformed. The message names the file and the item at fault."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def validate_coco_json(path: PathLike) -> Dict[str, Any]:
    """Load and check a COCO instances JSON; return the parsed dict.

    Errors (:class:`CocoFormatError`, naming the file and the annotation id): missing top-level or per-item keys,
    duplicate ids, non-positive area, negative box size or a box outside its image, an unknown image or category id,
    and a malformed segmentation (polygons must be lists of an even number of coordinates with at least one polygon
    of >= 3 points; RLE must have ``counts`` and ``size`` equal to the image's ``[height, width]``).
    """
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: COCO annotation file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing top-level key {key!r} (expected images, annotations, categories)")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: {key!r} must be a list")

    images: Dict[int, Dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        for key in ("id", "width", "height", "file_name"):
            if not isinstance(img, dict) or key not in img:
                raise CocoFormatError(f"{path}: images[{i}] is missing key {key!r}")
        if img["id"] in images:
            raise CocoFormatError(f"{path}: duplicate image id {img['id']}")
        if not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] > 0 and img["height"] > 0):
            raise CocoFormatError(f"{path}: image id {img['id']}: size {img['width']}x{img['height']} is not positive")
        images[img["id"]] = img

    categories = set()
    for i, cat in enumerate(data["categories"]):
        for key in ("id", "name"):
            if not isinstance(cat, dict) or key not in cat:
                raise CocoFormatError(f"{path}: categories[{i}] is missing key {key!r}")
        if cat["id"] in categories:
            raise CocoFormatError(f"{path}: duplicate category id {cat['id']}")
        categories.add(cat["id"])
    if not categories:
        raise CocoFormatError(f"{path}: no categories")

    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann:
            raise CocoFormatError(f"{path}: annotations[{i}] is missing key 'id'")
        aid = ann["id"]
        where = f"{path}: annotation id {aid}"
        for key in ("image_id", "category_id", "bbox", "area"):
            if key not in ann:
                raise CocoFormatError(f"{where}: missing key {key!r}")
        if aid in ann_ids:
            raise CocoFormatError(f"{where}: duplicate annotation id")
        ann_ids.add(aid)
        if ann["image_id"] not in images:
            raise CocoFormatError(f"{where}: unknown image id {ann['image_id']}")
        if ann["category_id"] not in categories:
            raise CocoFormatError(f"{where}: unknown category id {ann['category_id']} "
                                  f"(known: {sorted(categories)[:20]}{'...' if len(categories) > 20 else ''})")
        if not _is_number(ann["area"]) or ann["area"] <= 0:
            raise CocoFormatError(f"{where}: area {ann['area']!r} must be a positive number")
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise CocoFormatError(f"{where}: bbox {bbox!r} must be [x, y, width, height] numbers")
        x, y, w, h = bbox
        img = images[ann["image_id"]]
        if w < 0 or h < 0:
            raise CocoFormatError(f"{where}: bbox {bbox} has a negative width or height")
        t = BBOX_TOLERANCE
        if x < -t or y < -t or x + w > img["width"] + t or y + h > img["height"] + t:
            raise CocoFormatError(f"{where}: bbox [x={x}, y={y}, w={w}, h={h}] lies outside image id "
                                  f"{img['id']} ({img['width']}x{img['height']})")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise CocoFormatError(f"{where}: iscrowd must be 0 or 1, got {iscrowd!r}")
        if "segmentation" in ann:
            _check_segmentation(ann["segmentation"], img, where)
    return data


def _check_segmentation(seg: Any, img: Dict[str, Any], where: str) -> None:
    if isinstance(seg, list):
        if not seg:
            raise CocoFormatError(f"{where}: segmentation is an empty polygon list")
        usable = 0
        for j, poly in enumerate(seg):
            if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
                raise CocoFormatError(f"{where}: segmentation polygon #{j} must be a flat list of numbers")
            if len(poly) % 2:
                raise CocoFormatError(f"{where}: segmentation polygon #{j} has an odd number ({len(poly)}) of "
                                      f"coordinates, expected x1, y1, x2, y2, ...")
            usable += len(poly) >= 6
        if not usable:
            raise CocoFormatError(f"{where}: segmentation has no polygon with at least 3 points")
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise CocoFormatError(f"{where}: RLE segmentation must have 'counts' and 'size'")
        size = list(seg["size"]) if isinstance(seg["size"], (list, tuple)) else seg["size"]
        if size != [img["height"], img["width"]]:
            raise CocoFormatError(f"{where}: RLE size {seg['size']} != image [height, width] "
                                  f"[{img['height']}, {img['width']}]")
        if not isinstance(seg["counts"], (list, str)):
            raise CocoFormatError(f"{where}: RLE counts must be a list (uncompressed) or a string (compressed)")
    else:
        raise CocoFormatError(f"{where}: segmentation must be a polygon list or an RLE dict, "
                              f"got {type(seg).__name__}")


def coco_from_dict(data: Dict[str, Any]):
    """A ``pycocotools.coco.COCO`` built from an already-loaded dict (no second read, no stdout chatter)."""

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances (boxes + masks) for ``split`` (``train2017``/``val2017``) under ``root``.

    ``dataset[i]`` is ``(image, target)``: ``image`` float CHW RGB in [0, 1]; ``target`` dict with ``boxes`` float32
    Nx4 xyxy, ``labels`` int64 (contiguous 1..C), ``masks`` uint8 NxHxW, ``iscrowd`` int64 N, ``area`` float32 N,
    ``image_id`` int (the COCO image id), ``orig_size`` int64 ``[h, w]``. Annotations with zero-width boxes are
    dropped. ``transforms(image, target)`` returns the pair. ``.coco`` is the pycocotools COCO object, ``.cat_ids``
    maps contiguous label -> COCO category id (``cat_ids[label]``), ``.label_of`` the reverse, ``.class_names[label-1]``
    the name. ``remove_images_without_annotations=True`` drops images with no non-crowd box (training convention).
    ``with_masks=False`` skips mask decoding (box-only detectors).
    """

    def __init__(self, root: PathLike, split: str = "train2017", transforms: Optional[Callable] = None,
                 ann_file: Optional[PathLike] = None, img_dir: Optional[PathLike] = None,
                 remove_images_without_annotations: bool = False, with_masks: bool = True):
        self.root = Path(root)
        self.split = split
        self.ann_file = Path(ann_file) if ann_file is not None else self.root / "annotations" / f"instances_{split}.json"
        self.img_dir = Path(img_dir) if img_dir is not None else self.root / split
        if not self.img_dir.is_dir():
            raise CocoFormatError(f"{self.img_dir}: COCO image directory not found")
        self.transforms = transforms
        self.with_masks = with_masks
        self.coco = coco_from_dict(validate_coco_json(self.ann_file))
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.cat_ids: Dict[int, int] = {i + 1: c["id"] for i, c in enumerate(cats)}
        self.label_of: Dict[int, int] = {c: l for l, c in self.cat_ids.items()}
        self.class_names: List[str] = [c["name"] for c in cats]
        ids = sorted(self.coco.imgs.keys())
        if remove_images_without_annotations:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
                                         for a in self.coco.imgToAnns.get(i, []))]
        self.ids: List[int] = ids

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.img_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def load_target(self, index: int) -> Dict[str, Any]:
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "image_id": int(img_id),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for j, a in enumerate(anns):
                if "segmentation" in a:
                    masks[j] = self.coco.annToMask(a)
                else:  # box-only annotation: the box is the mask
                    x0, y0, x1, y1 = boxes[j]
                    masks[j, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
            target["masks"] = torch.from_numpy(masks)
        return target

    def __getitem__(self, index: int):
        path = self.image_path(index)
        if not path.is_file():
            raise CocoFormatError(f"{path}: image file not found (image id {self.ids[index]} in {self.ann_file})")
        with Image.open(path) as im:
            image = im.convert("RGB")
        target = self.load_target(index)
        h, w = target["orig_size"].tolist()
        if image.size != (w, h):
            raise CocoFormatError(f"{path}: image is {image.size[0]}x{image.size[1]} but {self.ann_file} says "
                                  f"{w}x{h} (image id {self.ids[index]})")
        arr = np.asarray(image, dtype=np.uint8)
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target
