"""COCO detection and instance segmentation transfer (MoCo paper protocol): Mask R-CNN, box and mask AP.

Usage (from the repository root; also under ``torchrun --nproc_per_node=N``)::

    python transfer/coco_det.py --data-root coco --weights moco_r50.v2_800ep random --preset paper
    python transfer/coco_det.py --data-root coco --weights ckpt.pth --preset cpu --arch resnet18 --set iters=200

See ``--help`` and moco_zoo/transfer/configs/ for presets and every config key.
"""
import sys

from moco_zoo.transfer.engine.cli import main


if __name__ == "__main__":
    sys.exit(main("coco_det"))
