"""Command line of ``transfer/voc_seg.py``: one run per ``--weights`` spec (same config, seed and budget) under
``--out/<weights>/`` and a comparison table ``--out/comparison.md`` (+ ``comparison.json``)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from moco_zoo import device as devlib

from . import config as cfglib
from . import report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voc_seg.py",
        description="Fine-tune and evaluate an FCN semantic segmentation model on Pascal VOC from MoCo backbone "
                    "weights; reports mIoU (confusion-matrix based, 255 = ignore), pixel and mean class accuracy.")
    p.add_argument("--data-root", required=True, help="VOCdevkit directory (containing VOC2007/ and/or VOC2012/)")
    p.add_argument("--weights", nargs="+", required=True, metavar="SPEC",
                   help="backbone weights: zoo name (moco_r50.v2_800ep), hf-hub:ORG/REPO, a converted or raw "
                        "checkpoint file, torchvision-supervised, or random; several -> one run each + comparison")
    p.add_argument("--out", default="runs/voc_seg", help="output directory (default: %(default)s)")
    p.add_argument("--preset", default="paper", choices=cfglib.preset_names(),
                   help="schedule/size preset (default: %(default)s); every value can be overridden")
    p.add_argument("--config", dest="config_file", help="YAML file of config keys applied after the preset")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (value parsed as YAML), e.g. --set crop_size=320; repeatable")
    p.add_argument("--arch", help="ResNet architecture (default: the one the weights report, else resnet50)")
    p.add_argument("--norm", choices=("bn", "syncbn", "frozen"), help="normalisation (default: preset)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="8/16: dilated ResNet; 32: plain")
    p.add_argument("--iters", type=int, help="training iterations")
    p.add_argument("--batch-size", type=int, help="global batch size (all processes)")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled linearly)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("--max-test-images", type=int, help="evaluate on the first N validation images only")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or (no value) from each run's <out>/<weights>/checkpoint_last.pth")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the model in the --resume checkpoint")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow fully unpickling trusted weights files that need it")
    return p


def run_slug(spec: str) -> str:
    p = Path(spec)
    if p.suffix and (p.exists() or "/" in spec or "\\" in spec):
        spec = f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._") or "weights"


def run_dirs(out: Path, specs: List[str]) -> List[Path]:
    dirs, seen = [], {}
    for spec in specs:
        slug = run_slug(spec)
        seen[slug] = seen.get(slug, 0) + 1
        dirs.append(out / (slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"))
    return dirs


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    overrides = {"arch": args.arch, "norm": args.norm, "output_stride": args.output_stride, "iters": args.iters,
                 "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "device": args.device,
                 "precision": args.precision, "threads": args.threads, "workers": args.workers,
                 "max_test_images": args.max_test_images, "allow_pickle": args.allow_pickle}
    return cfglib.resolve(args.preset, args.config_file, overrides, cfglib.parse_set(args.sets))


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from .engine import SegmentationRun, resolve_arch

    cfg = resolve_config(args)
    out = Path(args.out)
    if args.resume not in (None, "auto") and len(args.weights) > 1:
        raise cfglib.ConfigError("--resume CKPT takes one --weights; use --resume without a value for several")
    if args.eval_only and not args.resume:
        raise cfglib.ConfigError("--eval-only needs --resume (the checkpoint to evaluate)")
    # one architecture for every run of a comparison (random init gets the MoCo weights' architecture)
    cfg["arch"] = resolve_arch(args.weights, cfg["arch"], allow_pickle=bool(cfg["allow_pickle"]))
    results = []
    for spec, run_dir in zip(args.weights, run_dirs(out, args.weights)):
        result = SegmentationRun(cfg, spec, args.data_root, str(run_dir), resume=args.resume,
                                 eval_only=args.eval_only).run()
        results.append(result)
        if devlib.is_main_process():
            m = result["metrics"]
            print(f"voc_seg [{spec}]: mIoU {m['mIoU']:.1f}, pixel acc {m['pixel_acc']:.1f}, "
                  f"mean acc {m['mean_acc']:.1f}", flush=True)
    if devlib.is_main_process() and results:
        report.write_json(out / "comparison.json", results)
        text = (f"# voc_seg: comparison ({len(results)} run(s), same config and budget)\n\n"
                + report.comparison_markdown(results) + "\n"
                + "".join(f"- `{r['weights']}`: {r['out_dir']}\n" for r in results))
        report.atomic_write_text(out / "comparison.md", text)
        print(text, flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from moco_zoo.checkpoint import CheckpointError

    try:
        run(args)
    except (ValueError, FileNotFoundError, CheckpointError, ImportError) as e:
        print(f"voc_seg: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
