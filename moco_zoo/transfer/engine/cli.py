"""The one command line of the transfer scripts (``transfer/voc_det.py``, ``coco_det.py``, ``voc_seg.py``).

Several ``--weights`` give one run each (same config, seed and budget) under ``--output-dir/<weights>/`` and a
comparison table ``--output-dir/comparison.md`` (+ ``comparison.json``) at the end. ``--jobs N`` runs N of these runs
at once in their own processes (each with its share of the CPU threads, or its own GPU); a run's result does not
depend on what runs beside it.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from moco_zoo import device as devlib
from moco_zoo.checkpoint import atomic_write_text, remove_stale_temporaries
from moco_zoo.errors import EXPECTED_ERRORS
from moco_zoo.errors import report as report_error
from moco_zoo.logs import setup_logging
from moco_zoo.runlock import RunLock

from .. import config as cfglib
from .. import report
from ..detectron2_backend import run_detectron2
from ..modeling import resolve_arch
from .run import TransferRun

logger = logging.getLogger(__name__)

DESCRIPTIONS = {
    "voc_det": "Fine-tune and test a detector on Pascal VOC (VOC07+12 trainval -> VOC07 test) from MoCo backbone "
               "weights; reports AP50 (VOC07 11-point), VOC area AP50, and COCO-style AP / AP75.",
    "coco_det": "Fine-tune and test Mask R-CNN (or Faster R-CNN with --no-mask) on COCO from MoCo backbone weights; "
                "reports the 12 COCOeval numbers for boxes and masks.",
    "voc_seg": "Fine-tune and test an FCN semantic segmentation model on Pascal VOC from MoCo backbone weights; "
               "reports mIoU (confusion-matrix based, 255 = ignore), pixel and mean class accuracy.",
}


def build_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{task}.py", description=DESCRIPTIONS[task],
                                epilog="Every config key can be set with --set KEY=VALUE (value parsed as YAML); the "
                                       f"keys and presets are in moco_zoo/transfer/configs/{task}/.")
    p.add_argument("--data-root", required=True,
                   help="COCO root (annotations/instances_<split>.json, <split>/)" if task == "coco_det"
                   else "VOCdevkit directory (containing VOC2007/ and/or VOC2012/)")
    p.add_argument("--weights", nargs="+", required=True, metavar="SPEC",
                   help="backbone weights: zoo name (moco_r50.v2_800ep), hf-hub:ORG/REPO, a converted or raw "
                        "checkpoint file, torchvision-supervised, or random; several -> one run each + comparison")
    p.add_argument("--output-dir", "--out", dest="output_dir", default=f"runs/{task}",
                   help="output directory (default: %(default)s; --out is a deprecated alias)")
    p.add_argument("--preset", default="paper", choices=cfglib.preset_names(task),
                   help="config preset (default: %(default)s)")
    p.add_argument("--config-file", "--config", dest="config_file", help="YAML file of config keys applied after "
                   "the preset")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set steps=[200,250] lr=0.01")
    if task != "voc_seg":
        p.add_argument("--engine", choices=("torchvision", "detectron2"), help="detection engine (default: "
                       "torchvision)")
        p.add_argument("--detector", choices=("c4", "fpn"), help="R-CNN backbone layout")
    if task == "coco_det":
        p.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                       help="Mask R-CNN (default) or Faster R-CNN (--no-mask)")
    if task == "voc_seg":
        p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="8/16: dilated ResNet; 32: plain")
    p.add_argument("--arch", help="ResNet architecture (default: the one the weights report, else resnet50)")
    p.add_argument("--norm", choices=("bn", "syncbn", "frozen"), help="normalisation in backbone and head")
    p.add_argument("--iters", type=int, help="training iterations (lr steps scale along unless steps is set)")
    p.add_argument("--batch-size", type=int, help="global batch size (all processes)")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled linearly)")
    p.add_argument("--eval-period", type=int, help="also evaluate every N iterations (learning curves)")
    p.add_argument("--seed", type=int, help="random seed (head init, data order, augmentation, random backbone)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="one run per seed and weights; the comparison reports mean +- std over the seeds")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--workers", "-j", type=int, help="DataLoader workers per process")
    p.add_argument("--max-test-images", type=int, help="test on the first N test images only")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N of the comparison's runs (weights x seeds) at once, each in its own process with "
                        "1/N of the CPU threads (unless --threads) or its own GPU; small models on a few CPU cores "
                        "get more done this way than with all threads in one run")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or (no value) from each run's <output-dir>/<weights>/checkpoint_last.pth")
    p.add_argument("--eval-only", action="store_true", help="only test the model in the --resume checkpoint")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow fully unpickling trusted weights files that need it")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


_FLAG_KEYS = ("engine", "detector", "mask", "output_stride", "arch", "norm", "iters", "batch_size", "lr",
              "eval_period", "seed", "device", "precision", "threads", "workers", "max_test_images", "allow_pickle")


def resolve_config(task: str, args: argparse.Namespace):
    flags = {k: getattr(args, k, None) for k in _FLAG_KEYS}
    return cfglib.resolve(task, args.preset, args.config_file, flags, cfglib.parse_overrides(args.overrides))


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


def _runs(out: Path, specs: List[str], seeds: Optional[List[int]]):
    """(weights, seed or None, run dir) for every run of a comparison: ``<out>/<weights>[/seed<N>]``."""
    for spec, run_dir in zip(specs, run_dirs(out, specs)):
        if not seeds:
            yield spec, None, run_dir
        else:
            for seed in seeds:
                yield spec, seed, run_dir / f"seed{seed}"


def write_comparison(task: str, out: Path, results: List[Dict[str, Any]]) -> Optional[Path]:
    if not devlib.is_main_process() or not results:
        return None
    table = report.markdown_table(task, results)
    summary = report.seed_summary(task, results)
    report.write_json(out / "comparison.json", results)
    text = f"# {task}: comparison ({len(results)} run(s), same config and budget)\n\n{table}\n"
    if summary:
        text += f"Mean +- std over seeds:\n\n{summary}\n"
        if report.plot_seed_curves(task, results, out / "curves.png"):
            text += "![metric vs iteration, mean +- std over seeds](curves.png)\n\n"
    text += "".join(f"- `{r['weights']}` (seed {r.get('seed')}): {r['out_dir']}\n" for r in results)
    atomic_write_text(out / "comparison.md", text)
    return out / "comparison.md"


def run(task: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    cfg = resolve_config(task, args)
    out = Path(args.output_dir)
    setup_logging(str(out))
    if args.resume not in (None, "auto") and (len(args.weights) > 1 or len(args.seeds or ()) > 1):
        raise cfglib.ConfigError("--resume CKPT takes one --weights and seed; use --resume without a value for "
                                 "several")
    if args.eval_only and not args.resume:
        raise cfglib.ConfigError("--eval-only needs --resume (the checkpoint to test)")
    if args.jobs < 1:
        raise cfglib.ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise cfglib.ConfigError("--jobs runs a comparison's runs side by side in one launch; under torchrun every "
                                 "process already takes part in each run, leave --jobs at 1")
    if not cfg.arch:
        # one architecture for every run of a comparison (random init gets the MoCo weights' architecture)
        cfg.arch = resolve_arch(args.weights, None, allow_pickle=bool(cfg.allow_pickle))
    lock = RunLock(out).acquire() if devlib.is_main_process_env() else None
    try:
        return _run_all(task, args, cfg, out)
    finally:
        if lock is not None:
            lock.release()


def run_one(cfg, spec: str, data_root: str, run_dir: Path, resume: Optional[str], eval_only: bool) -> Dict[str, Any]:
    """One run of a comparison on the configured engine."""
    if cfg.engine == "detectron2":
        return run_detectron2(cfg, spec, data_root, str(run_dir), resume=resume is not None, eval_only=eval_only)
    return TransferRun(cfg, spec, data_root, str(run_dir), resume=resume, eval_only=eval_only).run()


def _job_init(slots, output_dir: str) -> None:
    """A --jobs worker process: its slot number places its progress bars and picks its GPU."""
    slot = slots.get()
    os.environ["MOCO_ZOO_JOB_SLOT"] = str(slot)
    os.environ["TQDM_POSITION"] = str(slot)  # one progress line per worker (tqdm reads TQDM_* defaults)
    setup_logging(output_dir)


def _job_run(cfg, spec: str, data_root: str, run_dir: Path, resume: Optional[str], eval_only: bool,
             jobs: int) -> Dict[str, Any]:
    slot = int(os.environ["MOCO_ZOO_JOB_SLOT"])
    on_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if on_cuda and cfg.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        cfg.device = f"cuda:{slot % torch.cuda.device_count()}"
    if not cfg.threads and not on_cuda:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cfg.threads = max(1, cores // jobs)
    return run_one(cfg, spec, data_root, run_dir, resume, eval_only)


def _log_result(task: str, spec: str, result: Dict[str, Any]) -> Dict[str, Any]:
    if devlib.is_main_process():
        row = report.metric_row(task, result["metrics"])
        logger.info("%s [%s]: %s", task, spec, ", ".join(f"{k} {v:.1f}" for k, v in row.items() if v is not None))
    return result


def _run_all(task: str, args: argparse.Namespace, cfg, out: Path) -> List[Dict[str, Any]]:
    runs = list(_runs(out, args.weights, args.seeds))
    configs = []
    for spec, seed, run_dir in runs:
        if devlib.is_main_process_env():
            for p in remove_stale_temporaries(run_dir):
                logger.warning("removed %s, left by a write that was killed", p)
        run_cfg = cfg.copy()
        if seed is not None:
            run_cfg.seed = seed
        configs.append(run_cfg)
    jobs = min(args.jobs, len(runs))
    if jobs > 1:
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools or CUDA state
        slots = context.Queue()
        for slot in range(jobs):
            slots.put(slot)
        logger.info("%d runs, %d at a time", len(runs), jobs)
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_job_init,
                                 initargs=(slots, str(out))) as pool:
            futures = [pool.submit(_job_run, run_cfg, spec, args.data_root, run_dir, args.resume, args.eval_only,
                                   jobs) for run_cfg, (spec, _, run_dir) in zip(configs, runs)]
            try:
                results = [_log_result(task, spec, f.result()) for f, (spec, _, _) in zip(futures, runs)]
            except BaseException:  # report the first failure without starting the runs still queued
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        results = [_log_result(task, spec, run_one(run_cfg, spec, args.data_root, run_dir, args.resume,
                                                   args.eval_only))
                   for run_cfg, (spec, _, run_dir) in zip(configs, runs)]
    path = write_comparison(task, out, results)
    if path is not None:
        print(path.read_text(encoding="utf-8"), flush=True)
    return results


def main(task: str, argv: Optional[List[str]] = None) -> int:
    parser = build_parser(task)
    args = parser.parse_args(argv)

    try:
        run(task, args)
    except EXPECTED_ERRORS as e:
        return report_error(task, e, args.debug)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
