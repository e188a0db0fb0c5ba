#!/usr/bin/env python
"""Linear classification protocol on frozen features (MoCo, arXiv:1911.05722 Sec. 4.1).

    python pretrain/main_lincls.py DATA --pretrained runs/moco/checkpoints/checkpoint_000100000.pth
    python pretrain/main_lincls.py --data synthetic --pretrained random --arch resnet18 --image-size 64 --epochs 20

    python pretrain/main_lincls.py DATA --recipe moco-v3 --pretrained runs/moco_v3/checkpoints/checkpoint_....pth

Defaults follow the protocol: SGD lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, lr x0.1 at 60 and 80
(scaled to --epochs), fc ~ N(0, 0.01), frozen backbone with BN in eval mode, center-crop evaluation.
``--recipe moco-v3`` (arXiv:2104.02057): base lr 0.1 (ResNet) / 3 (ViT, class-token features) x batch/256, batch
1024, 90 epochs, cosine lr, wd 0, momentum 0.9.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

from moco_zoo.pretrain.lincls import build_parser, config_from_args


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    from moco_zoo.errors import EXPECTED_ERRORS, report
    from moco_zoo.logs import setup_logging
    from moco_zoo.pretrain.lincls import run_linear_probe

    setup_logging(cfg.output_dir)
    try:
        result = run_linear_probe(cfg)
    except EXPECTED_ERRORS as e:
        return report("main_lincls", e)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
