#!/usr/bin/env python
"""Detection fine-tuning throughput (iterations/s and images/s) of the transfer engine at its ``cpu`` preset.

    python bench/transfer_throughput.py                       # R50-FPN and R50-C4, fp32 and bf16, VOC07+12 layout
    python bench/transfer_throughput.py --quick               # smoke run (ResNet-18, 2 timed iterations)
    python bench/transfer_throughput.py --detectors c4 --precisions fp32 --iters 10

Runs the real training loop of ``moco_zoo.transfer.engine.TransferRun`` (data loading, Faster R-CNN forward with
losses, backward, SGD step, scheduler) on a synthetic VOC devkit (``moco_zoo.data.ensure_dataset("voc")``), with
randomly initialised backbones (the speed does not depend on the weights). ``--warmup`` iterations run first
(allocator, oneDNN primitive caches), then ``--iters`` timed ones; each (detector, precision) runs in its own
subprocess so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any, Dict, List

import _common as C


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    import torch

    from moco_zoo.transfer import config as cfglib
    from moco_zoo.transfer.engine import TransferRun

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    overrides = {"arch": spec["arch"], "detector": spec["detector"], "precision": spec["precision"],
                 "threads": spec.get("threads"), "workers": spec["workers"]}
    sets = {"checkpoint_period": 10 ** 9, "log_period": 10 ** 9, "precise_bn_iters": 0,
            "train_sets": ["2007-trainval", "2012-trainval"], "iters": spec["warmup"]}
    if spec.get("batch_size"):
        sets["batch_size"] = spec["batch_size"]
    cfg = cfglib.resolve("voc_det", "cpu", None, overrides, sets)
    with tempfile.TemporaryDirectory() as out:
        run = TransferRun(cfg, "random", spec["data_root"], out)
        t0 = time.perf_counter()
        run.setup()
        setup_s = time.perf_counter() - t0
        run.trainer.train()  # warm-up iterations
        run.trainer.max_iter = spec["warmup"] + spec["iters"]
        before = run.trainer.train_seconds
        run.trainer.train()  # timed iterations (train_seconds covers the loop only, not the checkpoints)
        seconds = run.trainer.train_seconds - before
        batch = run.total_batch
    res = {"seconds": seconds, "iters_s": spec["iters"] / seconds, "img_s": spec["iters"] * batch / seconds,
           "batch": batch, "setup_s": setup_s, "peak_rss_mb": C.peak_rss_mb(), "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(res), flush=True)
    return 0



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "transfer_throughput")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--detectors", default="fpn,c4", help="comma list of fpn, c4")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (default: the cpu preset's)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (cpu preset: 0)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--images", type=int, default=64, help="synthetic VOC images per year")
    parser.add_argument("--data-root", default=None, help="a VOCdevkit (default: synthetic, generated once)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    try:
        import moco_zoo.transfer.engine.trainer  # noqa: F401
    except ImportError as e:
        print(f"transfer engine not importable ({e}); nothing to measure")
        return 1
    if args.quick:
        args.arch, args.warmup, args.iters, args.precisions = "resnet18", 1, 2, "fp32"
    C.set_threads(args.threads)
    info = C.machine_info()
    C.print_header("Detection fine-tuning throughput (transfer engine, cpu preset)", info)
    data_root = args.data_root
    if not data_root:
        from moco_zoo.data import ensure_dataset

        data_root = str(ensure_dataset("voc", root=C.default_data_dir(), num_images=args.images,
                                       voc2012=True))
    rows: List[Dict[str, Any]] = []
    for det in [d for d in args.detectors.split(",") if d]:
        for prec in [p for p in args.precisions.split(",") if p]:
            spec = dict(arch=args.arch, detector=det, precision=prec, threads=args.threads, workers=args.workers,
                        batch_size=args.batch_size, warmup=args.warmup, iters=args.iters, data_root=data_root)
            r = C.run_worker(__file__, spec, args.timeout)
            row = {"model": f"{args.arch} {det.upper()}", "precision": prec, **r}
            print(f"  {row['model']} {prec}: " + (r["error"] if "error" in r else f"{r['iters_s']:.3f} it/s"),
                  file=sys.stderr)
            rows.append(row)
    print(C.markdown_table(rows, ["model", "precision", "batch", "iters_s", "img_s", "peak_rss_mb"],
                           ["model", "precision", "batch", "iters/s", "img/s", "peak RSS MiB"], digits=3))
    for r in rows:
        if "error" in r:
            print(f"\n{r['model']} {r['precision']}: {r['error']}")
    path = C.write_json("transfer_throughput", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k != "_worker"}, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
