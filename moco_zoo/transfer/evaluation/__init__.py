"""Evaluation for the transfer tasks: VOC detection AP (devkit protocol), COCO box/mask AP (pycocotools COCOeval)."""
from .coco import COCO_STAT_NAMES, CocoEvaluator, encode_masks, stats_to_dict
from .voc import IOU_THRESHOLDS, VOCEvaluator, box_iou_numpy, evaluate_voc, voc_ap

__all__ = [
    "COCO_STAT_NAMES", "CocoEvaluator", "encode_masks", "stats_to_dict",
    "IOU_THRESHOLDS", "VOCEvaluator", "box_iou_numpy", "evaluate_voc", "voc_ap",
]
