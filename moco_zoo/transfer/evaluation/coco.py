"""COCO box / mask AP through pycocotools ``COCOeval`` (never reimplemented here), DDP-aware.

Usage::
    ev = CocoEvaluator(dataset.coco, iou_types=("bbox", "segm"), cat_ids=dataset.cat_ids)
    for images, targets in loader:
        outputs = model(images)                       # boxes xyxy in original image coordinates
        ev.update({t["image_id"]: o for t, o in zip(targets, outputs)})
    metrics = ev.evaluate()                            # {"bbox": {"AP": ..., ...}, "segm": {...}}

Predictions: ``boxes`` Nx4 xyxy, ``scores`` N, ``labels`` N contiguous (1..C, mapped to COCO category ids with
``cat_ids[label]``), optional ``masks`` (N x 1 x H x W float probabilities, thresholded at 0.5, or N x H x W bool /
uint8) at the original image size. Masks are RLE-encoded with ``pycocotools.mask.encode`` as soon as they arrive so
memory stays small. Only images passed to :meth:`CocoEvaluator.update` (on any rank) are evaluated
(``params.imgIds``), so a subset of the split can be evaluated. Zero detections are fine: AP is 0 where ground
truth exists and -1 where pycocotools has nothing to measure.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .base import DatasetEvaluator
from .voc import _gather_objects, _np

#: The 12 numbers COCOeval.summarize() prints, in its order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def stats_to_dict(stats: Sequence[float]) -> Dict[str, float]:
    """COCOeval ``stats`` -> ``{name: value x100}``; pycocotools' -1 ("no ground truth to measure") stays -1."""
    return {n: (float(v) * 100.0 if v >= 0 else -1.0) for n, v in zip(COCO_STAT_NAMES, stats)}


def _category_map(coco_gt, cat_ids) -> Dict[int, int]:
    if cat_ids is None:
        cats = sorted(coco_gt.getCatIds())
        return {i + 1: c for i, c in enumerate(cats)}
    if isinstance(cat_ids, Mapping):
        return {int(k): int(v) for k, v in cat_ids.items()}
    return {i + 1: int(c) for i, c in enumerate(cat_ids)}  # sequence: cat_ids[label - 1]


def encode_masks(masks: Any, threshold: float = 0.5) -> List[Dict[str, Any]]:
    """N x 1 x H x W probabilities or N x H x W bool/uint8 -> list of compressed RLE dicts (counts as str)."""

    if isinstance(masks, torch.Tensor):
        masks = masks.detach().to("cpu")
        if masks.is_floating_point():
            masks = masks > threshold
        masks = masks.numpy()
    masks = np.asarray(masks)
    if masks.dtype.kind == "f":
        masks = masks > threshold
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be N x 1 x H x W or N x H x W, got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be N x 1 x H x W or N x H x W, got shape {tuple(masks.shape)}")
    masks = masks.astype(np.uint8)
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


class CocoEvaluator(DatasetEvaluator):
    """Collects COCO-format results per iou type and evaluates them with ``COCOeval`` (see module docstring)."""

    def __init__(self, coco_gt, iou_types: Iterable[str] = IOU_TYPES, cat_ids=None, mask_threshold: float = 0.5):
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        bad = [t for t in self.iou_types if t not in IOU_TYPES]
        if bad:
            raise ValueError(f"unsupported iou types {bad}: expected a subset of {IOU_TYPES}")
        self.cat_ids = _category_map(coco_gt, cat_ids)
        unknown = sorted(set(self.cat_ids.values()) - set(coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label -> category map refers to category ids {unknown} absent from the ground truth")
        self.mask_threshold = mask_threshold
        self.summaries: Dict[str, str] = {}
        self.coco_evals: Dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self._results: Dict[str, List[Dict[str, Any]]] = {t: [] for t in self.iou_types}
        self._img_ids: set = set()

    def update(self, predictions: Mapping[Hashable, Mapping[str, Any]], cat_ids=None) -> None:
        """Add ``{image_id: dict(boxes, scores, labels, masks?)}``; ``cat_ids`` overrides the label map."""
        cmap = self.cat_ids if cat_ids is None else _category_map(self.coco_gt, cat_ids)
        for image_id, pred in predictions.items():
            image_id = int(image_id.item() if isinstance(image_id, torch.Tensor) else image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"prediction for image id {image_id}, which is not in the ground truth")
            self._img_ids.add(image_id)
            boxes = _np(pred["boxes"], np.float64).reshape(-1, 4)
            scores = _np(pred["scores"], np.float64).reshape(-1)
            labels = _np(pred["labels"], np.int64).reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"image id {image_id}: boxes/scores/labels lengths differ")
            missing = sorted(set(labels.tolist()) - set(cmap))
            if missing:
                raise ValueError(f"image id {image_id}: labels {missing} have no COCO category id "
                                 f"(known labels {sorted(cmap)[:10]}...)")
            cats = [cmap[int(l)] for l in labels]
            if "bbox" in self.iou_types:
                xywh = boxes.copy()
                xywh[:, 2:] -= xywh[:, :2]
                self._results["bbox"].extend(
                    {"image_id": image_id, "category_id": c, "bbox": [float(v) for v in b], "score": float(s)}
                    for c, b, s in zip(cats, xywh, scores))
            if "segm" in self.iou_types:
                if "masks" not in pred:
                    raise ValueError(f"image id {image_id}: iou type 'segm' needs 'masks' in the predictions")
                rles = encode_masks(pred["masks"], self.mask_threshold)
                if len(rles) != len(labels):
                    raise ValueError(f"image id {image_id}: {len(rles)} masks for {len(labels)} detections")
                info = self.coco_gt.imgs[image_id]
                for r in rles:
                    if list(r["size"]) != [info["height"], info["width"]]:
                        raise ValueError(f"image id {image_id}: mask size {list(r['size'])} != image size "
                                         f"[{info['height']}, {info['width']}] (paste masks at the original size)")
                self._results["segm"].extend(
                    {"image_id": image_id, "category_id": c, "segmentation": r, "score": float(s)}
                    for c, r, s in zip(cats, rles, scores))

    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        self.update({t["image_id"]: o for t, o in zip(targets, outputs)})

    def _gathered(self):
        results = {t: [] for t in self.iou_types}
        img_ids: set = set()
        for part_results, part_ids in _gather_objects((self._results, sorted(self._img_ids))):
            for t in self.iou_types:
                results[t].extend(part_results[t])
            img_ids.update(part_ids)
        return results, sorted(img_ids)

    def _load_results(self, results: List[Dict[str, Any]]):
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                return self.coco_gt.loadRes(copy.deepcopy(results))
        # pycocotools' loadRes cannot take an empty list: an empty result set scores 0 where ground truth exists.
        dt = COCO()
        dt.dataset = {"images": list(self.coco_gt.dataset.get("images", [])),
                      "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])), "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            dt.createIndex()
        return dt

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """``{iou_type: {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}}`` (x100) on every rank."""

        results, img_ids = self._gathered()
        out: Dict[str, Dict[str, float]] = {}
        for iou_type in self.iou_types:
            if not img_ids:
                out[iou_type] = {n: -1.0 for n in COCO_STAT_NAMES}
                self.summaries[iou_type] = "no images evaluated"
                continue
            coco_dt = self._load_results(results[iou_type])
            ev = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            ev.params.imgIds = img_ids
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            self.summaries[iou_type] = buf.getvalue()
            self.coco_evals[iou_type] = ev
            out[iou_type] = stats_to_dict(ev.stats)
        return out
