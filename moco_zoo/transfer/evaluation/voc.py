"""Pascal VOC detection AP, matching the VOC devkit / detectron2 ``PascalVOCDetectionEvaluator`` protocol.

Protocol (per class, per IoU threshold ``t``):
- all detections of the class, over all images, sorted by score (descending; ties keep input order);
- each detection is compared with the ground-truth boxes of its class in its image and takes the one of maximum IoU
  (``jmax``; VOC does *not* look for the best still-unmatched box);
- ``IoU > t`` (strict, as the devkit): if ``jmax`` is *difficult* the detection is ignored (neither TP nor FP);
  else the first detection to claim ``jmax`` is a TP and later ones are FPs (duplicates);
- ``IoU <= t`` or no ground truth of the class in the image: FP;
- recall = TP / npos with npos = number of non-difficult ground-truth boxes; precision = TP / (TP + FP).

AP from the precision/recall curve: ``use_07_metric=True`` is VOC2007's 11-point interpolated AP (mean over recall
levels 0, .1, ..., 1 of the maximum precision at recall >= level); otherwise the VOC2010+ area under the
monotone precision envelope.

Pixel convention: the VOC devkit works on 1-based inclusive integer coordinates and adds ``+1`` to widths and
heights. Our boxes are 0-based *continuous* xyxy (``moco_zoo.data.voc.parse_voc_xml`` maps ``xmin -> xmin - 1``,
``xmax -> xmax``), so ``x1 - x0`` already equals the devkit's ``xmax - xmin + 1`` and IoU is computed here *without*
``+1``. This gives exactly the devkit's IoU for ground truth read from XML and for predictions mapped back the way
detectron2 does (``xmin + 1``), so numbers agree with detectron2 on the same detections (up to detectron2's rounding
of scores to 3 decimals and boxes to 0.1 px in its intermediate text files).

Metrics reported by :func:`evaluate_voc` (all x100), the three numbers the MoCo paper reports plus area variants:
- ``AP50``: mAP at IoU .5 with ``use_07_metric`` (default: the VOC07 11-point metric, the paper's AP50);
- ``AP``, ``AP75``: mean over IoU .50:.05:.95 and IoU .75 of the same per-threshold VOC AP. This is exactly how
  detectron2's ``PascalVOCDetectionEvaluator`` computes the AP / AP75 the MoCo paper reports on VOC2007 test (it
  passes ``use_07_metric=True`` at every threshold);
- ``AP50_area``, ``AP_area``, ``AP75_area``: the same with the area-under-PR AP (VOC2010+ style; ``AP_area`` is the
  "COCO-style" mean over IoU .50:.95 of area APs, close to but not identical with pycocotools, which interpolates at
  101 recall points and matches duplicates to the best *unmatched* box);
- ``per_class``: ``{name: {AP50, AP, AP75, AP50_area, AP_area, npos, num_detections}}``.
Classes without any non-difficult ground truth have undefined AP (``None`` in ``per_class``) and are left out of the
means, as the devkit would divide by zero for them.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .base import DatasetEvaluator

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


def voc_ap(recall, precision, use_07_metric: bool = True) -> float:
    """AP (0..1) from a recall / precision curve ordered by decreasing score.

    ``use_07_metric``: VOC2007 11-point interpolation; otherwise the area under the precision envelope (VOC2010+).
    An empty curve gives 0. The 11 recall levels are compared with a 1e-12 tolerance, so a recall of exactly 3/10
    counts at level 0.3 (the py-faster-rcnn / detectron2 port builds its levels with ``np.arange(0, 1.1, 0.1)``,
    whose 0.3 is 0.30000000000000004 and misses it; the two differ only when a recall lands exactly on a level).
    """
    rec = np.asarray(recall, dtype=np.float64).ravel()
    prec = np.asarray(precision, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision differ in length ({rec.size} vs {prec.size})")
    if rec.size == 0:
        return 0.0
    if use_07_metric:
        points = []
        for t in np.linspace(0.0, 1.0, 11):
            above = rec >= t - 1e-12
            points.append(prec[above].max() if above.any() else 0.0)
        return float(np.sum(points) / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (monotone non-increasing)
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a) x len(b)) of continuous xyxy boxes (no +1, see module docstring)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _np(x: Any, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x, dtype=dtype)


def _pr_curves(tp_flags: np.ndarray, fp_flags: np.ndarray, npos: int):
    tp = np.cumsum(tp_flags, dtype=np.float64)
    fp = np.cumsum(fp_flags, dtype=np.float64)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec


def evaluate_voc(detections: Mapping[Hashable, Mapping[str, Any]],
                 ground_truths: Mapping[Hashable, Mapping[str, Any]],
                 class_names: Sequence[str], use_07_metric: bool = True,
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> Dict[str, Any]:
    """VOC detection metrics (see module docstring).

    ``detections``: ``{image_id: dict(boxes Nx4 xyxy, scores N, labels N in 1..C)}`` (numpy or torch, original image
    coordinates); images absent from ``detections`` simply have no detections. ``ground_truths``: ``{image_id:
    dict(boxes, labels, difficult)}``; its keys define the evaluated image set (a detection on an image without a
    ground-truth entry is an error).
    """
    num_classes = len(class_names)
    thresholds = [float(t) for t in iou_thresholds]
    for key in (0.5, 0.75):
        if not any(abs(t - key) < 1e-9 for t in thresholds):
            thresholds.append(key)
    unknown = [k for k in detections if k not in ground_truths]
    if unknown:
        raise KeyError(f"detections for image ids without ground truth: {unknown[:10]}"
                       f"{' ...' if len(unknown) > 10 else ''}")

    # Per image: match each detection to its max-IoU ground-truth box of the same class (independent of threshold).
    det_label, det_score, det_iou, det_gt = [], [], [], []  # det_gt: global index of jmax, -1 if none
    gt_label_all, gt_difficult_all = [], []
    offset = 0
    for image_id, gt in ground_truths.items():
        gt_boxes = _np(gt["boxes"], np.float64).reshape(-1, 4)
        gt_labels = _np(gt["labels"], np.int64).reshape(-1)
        gt_diff = _np(gt.get("difficult", np.zeros(len(gt_labels), bool)), bool).reshape(-1)
        if not (len(gt_boxes) == len(gt_labels) == len(gt_diff)):
            raise ValueError(f"ground truth for image {image_id!r}: boxes/labels/difficult lengths differ")
        gt_label_all.append(gt_labels)
        gt_difficult_all.append(gt_diff)
        det = detections.get(image_id)
        if det is not None:
            boxes = _np(det["boxes"], np.float64).reshape(-1, 4)
            scores = _np(det["scores"], np.float64).reshape(-1)
            labels = _np(det["labels"], np.int64).reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"detections for image {image_id!r}: boxes/scores/labels lengths differ")
            if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
                raise ValueError(f"detections for image {image_id!r}: labels must be in 1..{num_classes} "
                                 f"(0 is background), got {sorted(set(labels.tolist()))}")
            if len(boxes):
                iou = box_iou_numpy(boxes, gt_boxes)
                same = labels[:, None] == gt_labels[None, :]
                iou = np.where(same, iou, -np.inf)
                if iou.shape[1]:
                    jmax = iou.argmax(axis=1)
                    ovmax = iou[np.arange(len(boxes)), jmax]
                    gidx = np.where(np.isfinite(ovmax), jmax + offset, -1)
                else:
                    ovmax = np.full(len(boxes), -np.inf)
                    gidx = np.full(len(boxes), -1)
                det_label.append(labels)
                det_score.append(scores)
                det_iou.append(ovmax)
                det_gt.append(gidx)
        offset += len(gt_labels)

    gt_label_all = np.concatenate(gt_label_all) if gt_label_all else np.zeros(0, np.int64)
    gt_difficult_all = np.concatenate(gt_difficult_all) if gt_difficult_all else np.zeros(0, bool)
    det_label = np.concatenate(det_label) if det_label else np.zeros(0, np.int64)
    det_score = np.concatenate(det_score) if det_score else np.zeros(0)
    det_iou = np.concatenate(det_iou) if det_iou else np.zeros(0)
    det_gt = np.concatenate(det_gt) if det_gt else np.zeros(0, np.int64)

    ap07 = {t: {} for t in thresholds}
    ap_area = {t: {} for t in thresholds}
    per_class: Dict[str, Any] = {}
    for c, name in enumerate(class_names, start=1):
        npos = int(np.sum((gt_label_all == c) & ~gt_difficult_all))
        sel = np.nonzero(det_label == c)[0]
        order = sel[np.argsort(-det_score[sel], kind="stable")]
        ious, gts = det_iou[order], det_gt[order]
        diff = np.where(gts >= 0, gt_difficult_all[np.clip(gts, 0, None)] if len(gt_difficult_all) else False, False)
        for t in thresholds:
            hit = ious > t
            ignore = hit & diff
            claim = hit & ~diff
            tp = np.zeros(len(order))
            if claim.any():
                idx = np.nonzero(claim)[0]
                _, first = np.unique(gts[idx], return_index=True)
                tp[idx[first]] = 1.0
            fp = (~ignore).astype(np.float64) - tp
            if npos == 0:
                ap07[t][name] = ap_area[t][name] = None
                continue
            rec, prec = _pr_curves(tp, fp, npos)
            ap07[t][name] = 100.0 * voc_ap(rec, prec, use_07_metric=use_07_metric)
            ap_area[t][name] = 100.0 * voc_ap(rec, prec, use_07_metric=False)
        per_class[name] = {"npos": npos, "num_detections": int(len(order))}

    def _mean(values: Iterable[Optional[float]]) -> float:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else 0.0

    def _at(table, t):
        return next(v for k, v in table.items() if abs(k - t) < 1e-9)

    main_ts = [t for t in thresholds if any(abs(t - s) < 1e-9 for s in iou_thresholds)]
    for name in class_names:
        defined = _at(ap07, 0.5)[name] is not None
        per_class[name].update({
            "AP50": _at(ap07, 0.5)[name],
            "AP75": _at(ap07, 0.75)[name],
            "AP": _mean(ap07[t][name] for t in main_ts) if defined else None,
            "AP50_area": _at(ap_area, 0.5)[name],
            "AP_area": _mean(ap_area[t][name] for t in main_ts) if defined else None,
        })
    map07 = {t: _mean(ap07[t].values()) for t in thresholds}
    map_area = {t: _mean(ap_area[t].values()) for t in thresholds}
    evaluated = [n for n in class_names if per_class[n]["AP50"] is not None]
    return {
        "AP50": _at(map07, 0.5),
        "AP": float(np.mean([map07[t] for t in main_ts])),
        "AP75": _at(map07, 0.75),
        "AP50_area": _at(map_area, 0.5),
        "AP_area": float(np.mean([map_area[t] for t in main_ts])),
        "AP75_area": _at(map_area, 0.75),
        "metric": "voc07-11point" if use_07_metric else "voc-area",
        "num_images": len(ground_truths),
        "num_detections": int(len(det_label)),
        "num_classes_evaluated": len(evaluated),
        "per_class": per_class,
    }


def _gather_objects(obj: Any) -> List[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` when torch.distributed is initialised, else ``[obj]``."""

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class VOCEvaluator(DatasetEvaluator):
    """Accumulates predictions batch by batch and computes :func:`evaluate_voc` (DDP-aware).

    ``ground_truths``: ``{image_id: dict(boxes, labels, difficult)}`` or any object with a ``ground_truths()`` method
    returning that (``moco_zoo.data.voc.VOCDetection``). Only images passed to :meth:`update` (on any rank) are
    evaluated, so evaluating a subset of the test set counts only that subset's ground truth. Predictions must be in
    original image coordinates. :meth:`evaluate` gathers every rank's predictions with ``all_gather_object`` and returns
    the same metrics on every rank (it must therefore be called on all ranks).
    """

    def __init__(self, ground_truths, class_names: Sequence[str], use_07_metric: bool = True):
        if hasattr(ground_truths, "ground_truths"):
            ground_truths = ground_truths.ground_truths()
        self.ground_truths = dict(ground_truths)
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.reset()

    def reset(self) -> None:
        self._predictions: Dict[Hashable, Dict[str, np.ndarray]] = {}

    def update(self, image_ids: Sequence[Hashable], outputs: Sequence[Mapping[str, Any]]) -> None:
        if len(image_ids) != len(outputs):
            raise ValueError(f"update: {len(image_ids)} image ids but {len(outputs)} outputs")
        for image_id, out in zip(image_ids, outputs):
            if isinstance(image_id, torch.Tensor):
                image_id = image_id.item()
            if image_id not in self.ground_truths:
                raise KeyError(f"update: image id {image_id!r} has no ground truth")
            self._predictions[image_id] = {
                "boxes": _np(out["boxes"], np.float32).reshape(-1, 4),
                "scores": _np(out["scores"], np.float32).reshape(-1),
                "labels": _np(out["labels"], np.int64).reshape(-1),
            }

    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        self.update([t["image_id"] for t in targets], outputs)

    def gathered_predictions(self) -> Dict[Hashable, Dict[str, np.ndarray]]:
        merged: Dict[Hashable, Dict[str, np.ndarray]] = {}
        for part in _gather_objects(self._predictions):
            merged.update(part)
        return merged

    def evaluate(self) -> Dict[str, Any]:
        preds = self.gathered_predictions()
        gts = {k: self.ground_truths[k] for k in self.ground_truths if k in preds}
        return evaluate_voc(preds, gts, self.class_names, use_07_metric=self.use_07_metric)
