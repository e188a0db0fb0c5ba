"""Shared command line of ``transfer/voc_det.py`` and ``transfer/coco_det.py``.

Several ``--weights`` give one run each (same config, same seed, same budget) under ``--out/<weights>/`` and a
comparison table ``--out/comparison.md`` (+ ``comparison.json``) at the end.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import config as cfglib

ENGINES = ("torchvision", "detectron2")

DESCRIPTIONS = {
    "voc_det": "Fine-tune and test a detector on Pascal VOC (VOC07+12 trainval -> VOC07 test) from MoCo backbone "
               "weights; reports AP50 (VOC07 11-point), VOC area AP50, and COCO-style AP / AP75.",
    "coco_det": "Fine-tune and test Mask R-CNN (or Faster R-CNN with --no-mask) on COCO from MoCo backbone weights; "
                "reports the 12 COCOeval numbers for boxes and masks.",
}


def build_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{task}.py", description=DESCRIPTIONS[task])
    data_help = ("VOCdevkit directory (containing VOC2007/ and VOC2012/)" if task == "voc_det"
                 else "COCO root (annotations/instances_<split>.json, <split>/ image folders)")
    p.add_argument("--data-root", required=True, help=data_help)
    p.add_argument("--weights", nargs="+", required=True, metavar="SPEC",
                   help="backbone weights: zoo name (moco_r50.v2_800ep), hf-hub:ORG/REPO, a converted or raw "
                        "checkpoint file, torchvision-supervised, or random; several -> one run each + comparison")
    p.add_argument("--out", default=f"runs/{task}", help="output directory (default: %(default)s)")
    p.add_argument("--preset", default="paper", choices=cfglib.preset_names(task),
                   help="schedule/size preset (default: %(default)s); every value can be overridden")
    p.add_argument("--config", dest="config_file", help="YAML file of config keys applied after the preset")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (value parsed as YAML), e.g. --set steps=[200,250]; repeatable")
    p.add_argument("--engine", default="torchvision", choices=ENGINES, help="detection engine (default: %(default)s)")
    p.add_argument("--arch", help="ResNet architecture (default: the one the weights report, else resnet50)")
    p.add_argument("--detector", choices=("c4", "fpn"), help="R-CNN backbone layout (voc default c4, coco fpn)")
    p.add_argument("--norm", choices=("bn", "syncbn", "frozen"), help="normalisation in backbone and head")
    p.add_argument("--iters", type=int, help="training iterations (lr steps scale along unless steps is set)")
    p.add_argument("--batch-size", type=int, help="global batch size (all processes)")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled linearly)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("--max-test-images", type=int, help="evaluate on the first N test images only")
    if task == "coco_det":
        p.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                       help="Mask R-CNN (default) or Faster R-CNN (--no-mask)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or (no value) from each run's <out>/<weights>/checkpoint_last.pth")
    p.add_argument("--eval-only", action="store_true", help="only test the model in the --resume checkpoint")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow fully unpickling trusted weights files that need it")
    return p


def run_slug(spec: str) -> str:
    p = Path(spec)
    if p.suffix and (p.exists() or "/" in spec or "\\" in spec):
        spec = f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._") or "weights"
    return slug


def run_dirs(out: Path, specs: List[str]) -> List[Path]:
    dirs, seen = [], {}
    for spec in specs:
        slug = run_slug(spec)
        seen[slug] = seen.get(slug, 0) + 1
        dirs.append(out / (slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"))
    return dirs


def resolve_config(task: str, args: argparse.Namespace) -> Dict[str, Any]:
    overrides = {
        "arch": args.arch, "detector": args.detector, "norm": args.norm, "iters": args.iters,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "device": args.device,
        "precision": args.precision, "threads": args.threads, "workers": args.workers,
        "max_test_images": args.max_test_images, "mask": getattr(args, "mask", None),
        "allow_pickle": args.allow_pickle,
    }
    return cfglib.resolve(task, args.preset, args.config_file, overrides, cfglib.parse_set(args.sets))


def write_comparison(task: str, out: Path, results: List[Dict[str, Any]]) -> Optional[Path]:
    from moco_zoo import device as devlib

    from . import report

    if not devlib.is_main_process() or not results:
        return None
    table = report.markdown_table(task, results)
    report.write_json(out / "comparison.json", results)
    text = (f"# {task}: comparison ({len(results)} run(s), same config and budget)\n\n{table}\n"
            + "".join(f"- `{r['weights']}`: {r['out_dir']}\n" for r in results))
    report.atomic_write_text(out / "comparison.md", text)
    return out / "comparison.md"


def run(task: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    from moco_zoo import device as devlib

    from . import report

    cfg = resolve_config(task, args)
    out = Path(args.out)
    if args.resume not in (None, "auto") and len(args.weights) > 1:
        raise cfglib.ConfigError("--resume CKPT takes one --weights; use --resume without a value for several")
    if args.eval_only and not args.resume:
        raise cfglib.ConfigError("--eval-only needs --resume (the checkpoint to test)")
    if args.engine == "detectron2":
        from ..detectron2_backend import run_detectron2

        return [run_detectron2(cfg, w, args.data_root, d, resume=args.resume is not None, eval_only=args.eval_only)
                for w, d in zip(args.weights, run_dirs(out, args.weights))]
    from ..modeling import resolve_arch
    from .trainer import DetectionRun

    if not cfg["arch"]:
        # one architecture for every run of a comparison (random init gets the MoCo weights' architecture)
        cfg["arch"] = resolve_arch(args.weights, None, allow_pickle=bool(cfg["allow_pickle"]))
    results = []
    for spec, run_dir in zip(args.weights, run_dirs(out, args.weights)):
        result = DetectionRun(cfg, spec, args.data_root, str(run_dir), resume=args.resume,
                              eval_only=args.eval_only).run()
        results.append(result)
        if devlib.is_main_process():
            row = report.metric_row(task, result["metrics"])
            print(f"{task} [{spec}]: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if v is not None),
                  flush=True)
    path = write_comparison(task, out, results)
    if path is not None:
        print(path.read_text(encoding="utf-8"), flush=True)
    return results


def main(task: str, argv: Optional[List[str]] = None) -> int:
    parser = build_parser(task)
    args = parser.parse_args(argv)
    from moco_zoo.checkpoint import CheckpointError

    try:
        run(task, args)
    except (ValueError, FileNotFoundError, CheckpointError, ImportError) as e:
        print(f"{task}: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
