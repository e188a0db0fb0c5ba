#!/usr/bin/env python
"""MoCo v1/v2/v3 pretraining (arXiv:1911.05722, arXiv:2003.04297, arXiv:2104.02057).

Single process:   python pretrain/main_moco.py DATA --arch resnet50 --moco-version v2 --epochs 200 -b 256
DDP (any nodes):  torchrun --nproc_per_node=8 pretrain/main_moco.py DATA --arch resnet50 -b 256
Synthetic data:   python pretrain/main_moco.py synthetic --arch resnet18 --image-size 64 -b 64 --epochs 20
MoCo v3:          python pretrain/main_moco.py DATA --moco-version v3 --arch vit_small   (or --preset cpu-small-v3)

``-b/--batch-size`` is the GLOBAL batch (each of W ranks gets batch/W). Config keys without a flag: ``--set KEY=VALUE``.
``--resume auto`` continues from the newest valid checkpoint in ``--output-dir``.
"""
import sys

from moco_zoo.pretrain.cli import main_moco

if __name__ == "__main__":
    sys.exit(main_moco())
