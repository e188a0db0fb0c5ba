#!/usr/bin/env python
"""What each engine option costs or saves in one detection training step (the transfer engine, cpu preset).

    python bench/transfer_step_variants.py                                  # R50-FPN bf16, 1 thread
    python bench/transfer_step_variants.py --arch resnet18 --variants nchw,cl,cl-fused --reps 8
    python bench/transfer_step_variants.py --quick

One ``TransferRun`` (VOC07+12 synthetic devkit, random init) steps the SAME batch again and again while the
variants alternate step by step (order reversed every other round), so machine load hits every variant alike.
Variants are dash-joined flags: ``nchw`` / ``cl`` (memory format of the model), ``fused`` (fused SGD kernel, else
PyTorch's default single-tensor SGD), ``noclip`` (no gradient-norm clipping; the cpu preset clips at 5.0),
``compile`` (``torch.compile`` of the backbone + FPN, compile time reported separately). Reported per variant:
wall-clock and process CPU seconds per step (median and min); CPU time is the robust number on a shared machine.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from typing import Any, Dict, List

import _common as C


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "transfer_step_variants")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--variants", default="nchw,cl,cl-fused,cl-fused-noclip")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--images", type=int, default=64, help="synthetic VOC images per year")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.reps, args.variants = "resnet18", 1, "nchw,cl-fused"
    threads = C.set_threads(args.threads or 1)
    info = C.machine_info()
    C.print_header(f"Transfer step variants ({args.arch}-FPN, {args.precision}, one batch repeated)", info)

    import torch

    from moco_zoo.data import ensure_dataset
    from moco_zoo.transfer import config as cfglib
    from moco_zoo.transfer.engine import TransferRun

    root = str(ensure_dataset("voc", root=C.default_data_dir(), num_images=args.images, voc2012=True))
    cfg = cfglib.resolve("voc_det", "cpu", None, {"arch": args.arch, "precision": args.precision,
                                                  "threads": threads},
                         {"detector": "fpn", "train_sets": ["2007-trainval", "2012-trainval"], "iters": 1,
                          "checkpoint_period": 10 ** 9, "log_period": 10 ** 9})
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as out:
        run = TransferRun(cfg, "random", root, out)
        run.setup()
        t = run.trainer
        t.train_model.train()
        t._data = itertools.repeat(next(t.batches(0)))
        body = t.model.backbone
        compiled = None
        clip = t.clip_grad_norm
        compile_s = None

        def apply(v: str) -> None:
            nonlocal compiled, compile_s
            flags = set(v.split("-"))
            fmt = torch.channels_last if "cl" in flags else torch.contiguous_format
            t.model.to(memory_format=fmt)
            for p, state in t.optimizer.state.items():  # momentum in the parameter's layout (the fused kernel needs it)
                if p.dim() == 4 and "momentum_buffer" in state:
                    state["momentum_buffer"] = state["momentum_buffer"].contiguous(memory_format=fmt)
            for g in t.optimizer.param_groups:
                g["fused"], g["foreach"] = ("fused" in flags) or None, False
            t.clip_grad_norm = None if "noclip" in flags else clip
            if "compile" in flags:
                if compiled is None:
                    compiled = torch.compile(body, dynamic=False)
                    t.model.backbone = compiled
                    t0 = time.perf_counter()
                    t.run_step()
                    compile_s = time.perf_counter() - t0
                t.model.backbone = compiled
            else:
                t.model.backbone = body

        wall: Dict[str, List[float]] = {v: [] for v in variants}
        cpu: Dict[str, List[float]] = {v: [] for v in variants}
        for v in variants:  # warm-up: oneDNN primitives of every layout
            apply(v)
            t.run_step()
        for r in range(args.reps):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                apply(v)
                c0, t0 = time.process_time(), time.perf_counter()
                t.run_step()
                wall[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
    base = statistics.median(cpu[variants[0]])
    rows: List[Dict[str, Any]] = []
    for v in variants:
        rows.append({"variant": v, "wall_med": statistics.median(wall[v]), "wall_min": min(wall[v]),
                     "cpu_med": statistics.median(cpu[v]), "cpu_min": min(cpu[v]),
                     "vs_first": base / statistics.median(cpu[v]), "wall": wall[v], "cpu": cpu[v]})
    print(C.markdown_table(rows, ["variant", "wall_med", "wall_min", "cpu_med", "cpu_min", "vs_first"],
                           ["variant", "wall s/step (median)", "wall min", "CPU s/step (median)", "CPU min",
                            f"speed vs {variants[0]} (CPU)"], digits=3))
    if compile_s is not None:
        print(f"\ntorch.compile: first compiled step {compile_s:.1f} s")
    path = C.write_json("transfer_step_variants", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick, "args": vars(args),
        "compile_first_step_s": compile_s, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
