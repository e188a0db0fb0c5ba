"""``moco-zoo eval BACKBONE``: the evaluation suite (kNN, linear sweep, few-shot, low-shot fine-tuning, the MoCo
linear protocol) over seeds; ``torchrun --nproc_per_node N -m moco_zoo eval ...`` trains with DDP."""
from __future__ import annotations

import argparse
from typing import Any

from moco_zoo.device import rank
from moco_zoo.logs import setup_logging

from .config import PROTOCOLS, add_arguments, config_from_args
from .results import ResultRow, markdown_table
from .runner import run_eval


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a backbone: kNN, linear sweep, few-shot, low-shot fine-tuning, MoCo linear (mean +- std)",
        description="Evaluates any backbone spec (zoo name, hf-hub:ORG/REPO, checkpoint, random, "
        "torchvision-supervised) on an ImageFolder with train/ and val/ (the embedded synthetic data by default). "
        f"Protocols: {', '.join(PROTOCOLS)}. Frozen features are extracted once and cached; every finished "
        "(protocol, seed) is stored, so a rerun resumes. Writes results.json, results.csv and results.md to "
        "--output-dir (results.json feeds `moco-zoo publish --eval-results`).",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    setup_logging(cfg.output_dir)
    result = run_eval(cfg)
    if rank() == 0:
        rows = [ResultRow(**{k: r[k] for k in ("protocol", "metric", "mean", "std", "n", "values", "seconds")})
                for r in result["results"]]
        print(markdown_table(rows), end="")
        print(f"results: {cfg.output_dir}/results.{{json,csv,md}}")
    return 0
