"""Frozen-feature kNN on Pascal VOC ground-truth objects (see :mod:`moco_zoo.transfer.evaluation.object_knn`).

Usage (from the repository root)::

    python transfer/voc_object_knn.py --data-root VOCdevkit --weights moco_r50.v2_800ep random
    python transfer/voc_object_knn.py --data-root VOCdevkit --weights ckpt.pth random --arch resnet18 --crop-size 64

Writes ``--out/object_knn.json`` and a Markdown table ``--out/object_knn.md`` (one row per ``--weights``).
"""
import sys

from moco_zoo.transfer.evaluation.object_knn import main


if __name__ == "__main__":
    sys.exit(main())
