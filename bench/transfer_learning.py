"""Proof that every transfer task learns, and that the two detection backends agree.

Two experiments, each run through the user scripts (``transfer/voc_det.py``, ``coco_det.py``, ``voc_seg.py``) with
``--seeds`` so every number is a mean +- std over seeds:

* ``fit``: train and test on the same N embedded images. A task that cannot fit its own training set has a broken
  target, loss, box coding or evaluator. Targets: detection AP50 >= 90, Mask R-CNN mask AP50 >= 80, mIoU >= 80.
* ``curves``: train on the embedded train split, test on the unseen test split every ``--eval-period`` iterations,
  MoCo backbone vs random init; ``curves.png`` of each run folder has the mean +- std bands.

``--engines torchvision detectron2`` runs each detection experiment on both backends with the same weights, data,
schedule and seeds (backend parity). Prints a Markdown table and writes JSON (``bench/results/transfer_learning.json``).

    python bench/transfer_learning.py --experiments fit --tasks voc_det coco_det voc_seg
    python bench/transfer_learning.py --experiments fit curves --tasks voc_det --engines torchvision detectron2 \\
        --weights runs/moco/checkpoints/checkpoint_000000690.pth
    python bench/transfer_learning.py --experiments curves --tasks voc_seg --preset cpu-os16 --curve-iters 3000 \\
        --eval-period 500 --set threads=1 --jobs 2 --weights runs/moco/checkpoints/checkpoint_000000690.pth
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import _common as C

SCRIPTS = {"voc_det": "voc_det.py", "coco_det": "coco_det.py", "voc_seg": "voc_seg.py"}
METRIC = {"voc_det": ("AP50",), "coco_det": ("segm", "AP50"), "voc_seg": ("mIoU",)}
TARGET = {"voc_det": 90.0, "coco_det": 80.0, "voc_seg": 80.0}


def _data(task: str, args) -> str:
    from moco_zoo.data import ensure_dataset

    kind = "coco" if task == "coco_det" else "voc"
    if kind == "voc" and args.voc_root:
        return args.voc_root
    if kind == "coco" and args.coco_root:
        return args.coco_root
    root = ensure_dataset(kind, root=C.default_data_dir(), num_images=args.images, image_size=args.image_size,
                          **({"voc2012": True} if kind == "voc" else {}))
    return str(root)


def _split_overrides(task: str, experiment: str, n: int) -> List[str]:
    """``fit``: test on the training images themselves (the first ``n``)."""
    if experiment != "fit":
        return []
    if task == "coco_det":
        return ["test_split=train2017", f"max_train_images={n}", f"max_test_images={n}"]
    return ["test_sets=[2007-trainval]", "train_sets=[2007-trainval]", f"max_train_images={n}",
            f"max_test_images={n}"]


def _get(metrics: Dict[str, Any], path) -> float:
    for p in path:
        metrics = metrics[p]
    return float(metrics)


def run_one(task: str, engine: str, experiment: str, args, out: Path) -> Dict[str, Any]:
    iters = args.fit_iters if experiment == "fit" else args.curve_iters
    weights = ["random"] + ([args.weights] if args.weights else [])
    cmd = [sys.executable, str(C.REPO_ROOT / "transfer" / SCRIPTS[task]), "--data-root", _data(task, args),
           "--weights", *weights, "--preset", args.preset, "--arch", args.arch, "--iters", str(iters),
           "--seeds", *map(str, args.seeds), "--output-dir", str(out), "--resume"]
    if task != "voc_seg":
        cmd += ["--engine", engine]
    if engine == "torchvision" and experiment == "curves":
        cmd += ["--eval-period", str(args.eval_period)]
    if args.jobs > 1:
        cmd += ["--jobs", str(args.jobs)]
    overrides = [*_split_overrides(task, experiment, args.fit_images), *args.set]
    if overrides:  # --set needs at least one KEY=VALUE
        cmd += ["--set", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "seconds": seconds}
    rows = json.loads((out / "comparison.json").read_text())
    summary = {}
    for w in weights:
        values = [_get(r["metrics"], METRIC[task]) for r in rows if r["weights"] == w]
        summary["random" if w == "random" else "moco"] = {
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}
    return {"summary": summary, "seconds": seconds, "command": " ".join(cmd), "out": str(out)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "transfer_learning")
    parser.add_argument("--experiments", nargs="+", default=["fit"], choices=["fit", "curves"])
    parser.add_argument("--tasks", nargs="+", default=["voc_det", "coco_det", "voc_seg"], choices=list(SCRIPTS))
    parser.add_argument("--engines", nargs="+", default=["torchvision"], choices=["torchvision", "detectron2"])
    parser.add_argument("--weights", default=None, help="a MoCo checkpoint to compare with random init")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--preset", default="cpu", help="the scripts' --preset (e.g. cpu-os16 for voc_seg curves)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fit-images", type=int, default=20)
    parser.add_argument("--fit-iters", type=int, default=400)
    parser.add_argument("--curve-iters", type=int, default=600)
    parser.add_argument("--eval-period", type=int, default=100)
    parser.add_argument("--images", type=int, default=320, help="embedded images per generated set")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--voc-root", default=None)
    parser.add_argument("--coco-root", default=None)
    parser.add_argument("--runs", default=str(Path(C.default_data_dir()) / "transfer_learning_runs"))
    parser.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE config overrides for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs of a task side by side (the scripts' --jobs)")
    args = parser.parse_args(argv)
    info = C.machine_info()
    C.print_header("Transfer: proof of learning and backend parity", info)
    rows = []
    for experiment in args.experiments:
        for task in args.tasks:
            for engine in (args.engines if task != "voc_seg" else ["torchvision"]):
                out = Path(args.runs) / experiment / task / engine
                r = run_one(task, engine, experiment, args, out)
                row = {"experiment": experiment, "task": task, "engine": engine,
                       "metric": "/".join(METRIC[task]), **r}
                for name in ("random", "moco"):
                    s = (r.get("summary") or {}).get(name)
                    row[name] = f"{s['mean']:.1f} +- {s['std']:.1f}" if s else "-"
                if experiment == "fit" and r.get("summary"):
                    row["target"] = f">= {TARGET[task]:.0f}"
                print(f"  {experiment} {task} {engine}: " + (r.get("error") or f"random {row['random']}, "
                      f"MoCo {row['moco']} ({r['seconds']:.0f} s)"), file=sys.stderr)
                rows.append(row)
    print(C.markdown_table(rows, ["experiment", "task", "engine", "metric", "random", "moco", "target", "seconds"],
                           ["experiment", "task", "engine", "metric", "random init", "MoCo", "target", "seconds"]))
    path = C.write_json("transfer_learning", {"machine": info, "contention": C.contention_note(info) or None,
                                              "args": vars(args), "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
