"""Pascal VOC semantic segmentation transfer: FCN head on a (MoCo) ResNet backbone, mIoU.

Usage (from the repository root; also under ``torchrun --nproc_per_node=N``)::

    python transfer/voc_seg.py --data-root VOCdevkit --weights moco_r50.v2_800ep random --preset paper
    python transfer/voc_seg.py --data-root VOCdevkit --weights ckpt.pth random --preset cpu

See ``--help`` and moco_zoo/transfer/configs/voc_seg/ for presets and every config key.
"""
import sys

from moco_zoo.transfer.engine.cli import main


if __name__ == "__main__":
    sys.exit(main("voc_seg"))
