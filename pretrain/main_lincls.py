#!/usr/bin/env python
"""Linear classification protocol on frozen features (MoCo, arXiv:1911.05722 Sec. 4.1).

    python pretrain/main_lincls.py DATA --pretrained runs/moco/checkpoints/checkpoint_000100000.pth
    python pretrain/main_lincls.py synthetic --pretrained random --arch resnet18 --image-size 64 --epochs 20

    python pretrain/main_lincls.py DATA --recipe moco-v3 --pretrained runs/moco_v3/checkpoints/checkpoint_....pth

Defaults follow the protocol: SGD lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, lr x0.1 at 60 and 80
(scaled to --epochs), fc ~ N(0, 0.01), frozen backbone with BN in eval mode, center-crop evaluation.
``--recipe moco-v3`` (arXiv:2104.02057): base lr 0.1 (ResNet) / 3 (ViT, class-token features) x batch/256, batch
1024, 90 epochs, cosine lr, wd 0, momentum 0.9.
"""
import sys

from moco_zoo.pretrain.cli import main_lincls

if __name__ == "__main__":
    sys.exit(main_lincls())
