"""Embedded data: the synthetic scene generator and its ImageFolder / VOC / COCO writers (readers: voc.py, coco.py)."""
from .synthetic import CLASSES
from .writers import ensure_dataset, write_coco, write_imagefolder, write_voc

__all__ = ["CLASSES", "write_imagefolder", "write_voc", "write_coco", "ensure_dataset"]
