"""The command lines of ``pretrain/main_moco.py`` and ``pretrain/main_lincls.py``: parse, resolve the config (a bad
value stops with argparse's one-line usage error), log to ``<output-dir>/log.txt``, run, and turn an expected failure
into one line with exit code 2."""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.distributed as dist

from moco_zoo.device import is_distributed, is_main_process
from moco_zoo.errors import EXPECTED_ERRORS, report
from moco_zoo.logs import setup_logging

from . import config as moco_config
from . import lincls
from .engine import train


def _run(prog: str, build_parser: Callable, config_from_args: Callable, job: Callable[[Any], Dict[str, Any]],
         argv: Optional[List[str]]) -> Tuple[Optional[Dict[str, Any]], bool]:
    """``(result or None after an expected error, whether this is the main process)``; the job may start DDP."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    setup_logging(cfg.output_dir)
    result = None
    try:
        result = job(cfg)
    except EXPECTED_ERRORS as e:  # DataError, UnknownArchError, CheckpointError, RunLockedError: named causes
        report(prog, e, bool(getattr(args, "debug", False)))
    main_process = is_main_process()
    if is_distributed():
        dist.destroy_process_group()
    return result, main_process


def main_moco(argv: Optional[List[str]] = None) -> int:
    summary, main_process = _run("main_moco", moco_config.build_parser, moco_config.config_from_args, train, argv)
    if summary is None:
        return 2
    if main_process:
        knn = summary["knn"]
        print(f"done: global step {summary['global_step']}, checkpoint {summary['checkpoint']}"
              + (f", kNN top-1 {knn.get('knn_top1', float('nan')):.2f}%" if knn else ""))
    return 0


def main_lincls(argv: Optional[List[str]] = None) -> int:
    result, _ = _run("main_lincls", lincls.build_parser, lincls.config_from_args, lincls.run_linear_probe, argv)
    if result is None:
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0
