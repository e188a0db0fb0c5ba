#!/usr/bin/env python
"""Measured evidence: MoCo v2 features vs the same encoder randomly initialised, and the paper's three mechanisms
(moco / end2end / memory_bank, arXiv:1911.05722 Fig. 3) at an equal budget, by kNN and linear-probe top-1.

    python -m tools.compare_mechanisms --out runs/compare                       # synthetic ImageFolder, resnet18 @ 64 px
    python -m tools.compare_mechanisms --out runs/compare --epochs 30 --mechanisms moco end2end memory_bank

Every mechanism gets the same data, seed, epochs, batch and lr; the linear probe uses the same settings for every
backbone (including "random"). Writes ``results.json`` and ``results.md`` to ``--out``; runs are resumable (rerun the
same command: finished pretraining/probe runs are reused, interrupted ones resume).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from moco_zoo.checkpoint import atomic_write_text
from moco_zoo.device import autocast_dtype, default_device
from moco_zoo.pretrain.config import make_config
from moco_zoo.pretrain.data import resolve_data_root
from moco_zoo.pretrain.engine import list_checkpoints, train
from moco_zoo.pretrain.knn import KNNMonitor
from moco_zoo.pretrain.lincls import LinclsConfig, run_linear_probe


def knn_of_random(root: Path, arch: str, image_size: int, seed: int) -> Dict[str, Dict[str, float]]:
    """kNN of the randomly initialised encoder, built exactly as the linear probe's ``random`` baseline (and as the
    MoCo encoders start: torchvision-style init, not timm's zero-initialised last BN of each block).

    Two readings: ``init_bn`` keeps the init's BN statistics (mean 0 / var 1, so eval-mode BN does not normalise),
    ``data_bn`` re-estimates them on the kNN train images (:func:`pretrain.knn.recalibrate_bn`), as a trained
    encoder's BN has."""
    from moco_zoo.backbones import load_backbone

    model = load_backbone("random", arch, seed=seed).eval()
    mon = KNNMonitor(root, image_size, default_device(), workers=2)
    with torch.no_grad():
        return {"init_bn": mon.evaluate(model), "data_bn": mon.evaluate(mon.recalibrate_bn(model))}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic", help="ImageFolder root with train/ and val/, or 'synthetic'")
    p.add_argument("--synthetic-images", type=int, default=4000)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=24, help="pretraining epochs per mechanism (equal budget)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.06,
                   help="base lr for batch 256 (scaled linearly); 0.24 learned nothing class-related at 64 px here")
    p.add_argument("--moco-k", type=int, default=256,
                   help="queue size / bank negatives; in runs of a few hundred steps a long queue holds keys of a much "
                        "older encoder (kNN after 8 epochs: 19.6 at K=2048, 24.1 at K=256)")
    p.add_argument("--moco-m", type=float, default=0.99,
                   help="key-encoder momentum; 0.99 (the paper's ablation: ~0.999) suits runs of a few hundred steps, "
                        "where 0.999 leaves the key encoder at its random init")
    p.add_argument("--knn-every", type=int, default=4, help="kNN monitor every N epochs (and at the end)")
    p.add_argument("--precision", default="auto",
                   help="auto: bf16 + channels_last on CPUs with native bf16 (and on CUDA), fp32 elsewhere")
    p.add_argument("--mechanisms", nargs="+", default=["moco", "end2end", "memory_bank"])
    p.add_argument("--lincls-epochs", type=int, default=8)
    p.add_argument("--lincls-lr", type=float, default=1.0,
                   help="linear-probe lr (the ImageNet protocol's 30 diverges on these small, unnormalised ResNet-18 "
                        "features; the same lr is used for every backbone)")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = Path(args.out)
    root = resolve_data_root(args.data, args.synthetic_images, args.image_size)
    amp = autocast_dtype(default_device(), args.precision)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    results: Dict[str, Any] = {"setup": {k: v for k, v in vars(args).items()}, "rows": {}}
    results["setup"]["data_root"] = str(root)
    probe_specs: Dict[str, str] = {"random init": "random"}
    for mech in args.mechanisms:
        cfg = make_config("cpu-small", data=str(root), arch=args.arch, mechanism=mech,
                          image_size=args.image_size, batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                          moco_k=args.moco_k, momentum=args.moco_m, workers=args.workers, seed=args.seed,
                          output_dir=str(out / f"pretrain_{mech}"), resume="auto", save_every_steps=50,
                          precision=precision, channels_last=amp is not None,
                          knn_every=args.knn_every if args.epochs % args.knn_every == 0 else 1)
        t0 = time.time()
        summary = train(cfg)
        recs = [json.loads(line) for line in (out / f"pretrain_{mech}" / "metrics.jsonl").read_text().splitlines()]
        knn = [r for r in recs if r.get("type") == "epoch" and "knn_top1" in r]
        results["rows"][f"MoCo v2 ({mech})"] = {
            "pretrain_seconds_this_call": round(time.time() - t0, 1), "knn_top1": knn[-1]["knn_top1"] if knn else None,
            "knn_curve": [round(r["knn_top1"], 2) for r in knn], "checkpoint": summary["checkpoint"]}
        probe_specs[f"MoCo v2 ({mech})"] = summary["checkpoint"] or str(list_checkpoints(
            out / f"pretrain_{mech}" / "checkpoints")[0][1])
        print(f"[compare] {mech}: kNN top-1 {results['rows'][f'MoCo v2 ({mech})']['knn_top1']}", file=sys.stderr)
    random_knn = knn_of_random(root, args.arch, args.image_size, args.seed)
    results["rows"].setdefault("random init", {})["knn_top1"] = random_knn["init_bn"]["knn_top1"]
    results["rows"]["random init, BN statistics re-estimated on the data (kNN only)"] = {
        "knn_top1": random_knn["data_bn"]["knn_top1"]}
    for name, spec in probe_specs.items():
        tag = name.replace(" ", "_").replace("(", "").replace(")", "")
        lcfg = LinclsConfig(data=str(root), pretrained=spec, arch=args.arch, epochs=args.lincls_epochs,
                            batch_size=args.batch_size, lr=args.lincls_lr, image_size=args.image_size,
                            workers=args.workers, seed=args.seed, output_dir=str(out / f"lincls_{tag}"),
                            resume="auto", progress=False, precision=precision, channels_last=amp is not None)
        res = run_linear_probe(lcfg)
        results["rows"].setdefault(name, {}).update({"linear_top1": res["top1"], "linear_best_top1": res["best_top1"]})
        print(f"[compare] {name}: linear top-1 {res['top1']:.2f}", file=sys.stderr)
    lines = [f"| backbone ({args.arch}, {args.image_size}px, {args.epochs} ep) | kNN top-1 | linear top-1 (final) |",
             "|---|---|---|"]
    for name, row in results["rows"].items():
        knn = row.get("knn_top1")
        lin = row.get("linear_top1")
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(knn)} | {fmt(lin)} |")
    table = "\n".join(lines)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
