"""Pascal VOC detection transfer (MoCo paper protocol): VOC07+12 trainval -> VOC07 test, R50-C4 by default.

Usage (from the repository root; also under ``torchrun --nproc_per_node=N``)::

    python transfer/voc_det.py --data-root VOCdevkit --weights moco_r50.v2_800ep random --preset paper
    python transfer/voc_det.py --data-root VOCdevkit --weights ckpt.pth --preset cpu --arch resnet18 --set iters=200

See ``--help`` and moco_zoo/transfer/configs/ for presets and every config key.
"""
import sys

from moco_zoo.transfer.engine.cli import main


if __name__ == "__main__":
    sys.exit(main("voc_det"))
