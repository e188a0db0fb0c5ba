#!/usr/bin/env python
"""MoCo v1/v2/v3 pretraining (arXiv:1911.05722, arXiv:2003.04297, arXiv:2104.02057).

Single process:   python pretrain/main_moco.py DATA --arch resnet50 --moco-version v2 --epochs 200 -b 256
DDP (any nodes):  torchrun --nproc_per_node=8 pretrain/main_moco.py DATA --arch resnet50 -b 256
Synthetic data:   python pretrain/main_moco.py --data synthetic --arch resnet18 --image-size 64 -b 64 --epochs 20
MoCo v3:          python pretrain/main_moco.py DATA --moco-version v3 --arch vit_small   (or --preset cpu-small-v3)

``-b/--batch-size`` is the GLOBAL batch (each of W ranks gets batch/W); the lr is ``--lr x batch/256``.
``--resume auto`` continues from the newest valid checkpoint in ``--output-dir``.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from moco_zoo.pretrain.config import build_parser, config_from_args


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    from moco_zoo.errors import EXPECTED_ERRORS, report
    from moco_zoo.logs import setup_logging
    from moco_zoo.pretrain.engine import train

    setup_logging(cfg.output_dir)
    try:
        summary = train(cfg)
    except EXPECTED_ERRORS as e:  # DataError, UnknownArchError, CheckpointError, RunLockedError: named causes
        return report("main_moco", e)
    from moco_zoo.device import is_distributed, is_main_process

    main_process = is_main_process()
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
    if not main_process:
        return 0
    print(f"done: global step {summary['global_step']}, checkpoint {summary['checkpoint']}"
          + (f", kNN top-1 {summary['knn'].get('knn_top1', float('nan')):.2f}%" if summary["knn"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
