"""Semantic segmentation metrics from a confusion matrix: mIoU, pixel accuracy, mean class accuracy.

``confusion[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``; pixels labelled ``ignore_index``
(VOC's 255 "void" border) are left out. Per class: ``IoU = TP / (TP + FP + FN)`` with ``TP = C[c, c]``,
``FP = sum_g C[g, c] - TP`` (column), ``FN = sum_p C[c, p] - TP`` (row). mIoU averages over classes whose union is
non-zero (a class absent from both ground truth and predictions has no IoU; counting it as 0 or 1 would bias the
mean), which is the convention of the VOC devkit and mmsegmentation (nan-mean).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..evaluation.base import DatasetEvaluator


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``num_classes x num_classes`` int64 matrix (rows: ground truth, columns: prediction) for label tensors of any
    (equal) shape. Ground-truth values outside ``0..num_classes-1`` other than ``ignore_index`` are an error."""
    pred = pred.reshape(-1).to(torch.int64)
    target = target.reshape(-1).to(torch.int64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
    valid = target != ignore_index
    t, p = target[valid], pred[valid]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target labels must be in 0..{num_classes - 1} or {ignore_index}, "
                         f"found {sorted(set(t.unique().tolist()) - set(range(num_classes)))}")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted labels must be in 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """mIoU, pixel accuracy and mean class accuracy (x100) plus per-class IoU from a confusion matrix."""
    c = np.asarray(confusion.cpu().numpy() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    n = c.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}x{n} confusion matrix")
    tp = np.diag(c)
    gt = c.sum(axis=1)
    pr = c.sum(axis=0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = c.sum()
    per_class = {name: (None if np.isnan(v) else float(100 * v)) for name, v in zip(names, iou)}
    return {
        "mIoU": float(100 * np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_acc": float(100 * tp.sum() / total) if total > 0 else 0.0,
        "mean_acc": float(100 * np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        "num_pixels": int(total),
        "num_classes_present": int(np.isfinite(iou).sum()),
        "per_class_IoU": per_class,
    }


class SegmentationMeter(DatasetEvaluator):
    """Accumulates a confusion matrix batch by batch; :meth:`evaluate` sums it over DDP ranks (all_reduce)."""

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, ignore_index: int = 255,
                 device: Optional[torch.device] = None):
        self.device = device  # where the confusion matrix is all-reduced (nccl needs CUDA tensors)
        self.num_classes = num_classes
        self.class_names: List[str] = list(class_names) if class_names is not None else [str(i) for i in
                                                                                           range(num_classes)]
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def process(self, targets, outputs) -> None:
        """``targets``: HxW ground-truth masks (255 = ignore); ``outputs``: HxW predicted class maps."""
        for mask, pred in zip(targets, outputs):
            self.update(pred, mask)

    def reduced_confusion(self, device: Optional[torch.device] = None) -> torch.Tensor:
        conf = self.confusion.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = conf.to(device or "cpu")
            dist.all_reduce(t)
            conf = t.cpu()
        return conf

    def evaluate(self) -> Dict[str, object]:
        conf = self.reduced_confusion(self.device)
        out = segmentation_scores(conf, self.class_names)
        out["confusion"] = conf.tolist()
        return out
