#!/usr/bin/env python
"""Measured compute peak of this machine: fp32 and bf16 matmul GFLOP/s, and conv throughput by dtype and layout.

    python bench/machine_peak.py                # full run (~1-2 min on 2 cores)
    python bench/machine_peak.py --quick        # smoke run

1. ``torch.matmul`` on square matrices of several sizes, best of N calls, 2*n^3 FLOPs per call. The best bf16 figure
   is "the measured bf16 matmul peak" that bench/pretrain_throughput.py divides the MoCo step's FLOP rate by.
2. One ResNet-50 bottleneck block per stage (the shapes that dominate a ResNet-50 step at 224 px), forward and
   forward+backward, in fp32 and under bf16 autocast, in NCHW and channels_last memory format. FLOPs are counted with
   torch.utils.flop_counter, so the table reads as GFLOP/s and as a fraction of the matmul peak.

Writes bench/results/machine_peak.json (``--out`` to change).
"""
from __future__ import annotations

import argparse
import contextlib

import _common as C  # noqa: E402  (also puts the repo root on sys.path)

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(n: int, dtype: torch.dtype, repeat: int, min_time: float) -> dict:
    a = torch.randn(n, n, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, dtype=torch.float32).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    t = C.time_fn(lambda: torch.matmul(a, b, out=out), warmup=2, repeat=repeat, min_time=min_time)
    flops = 2.0 * n ** 3
    return {"n": n, "best_gflops": flops / t["best_s"] / 1e9, "median_gflops": flops / t["median_s"] / 1e9,
            "calls": t["n"]}


def bottleneck(in_ch: int, mid: int, stride: int) -> nn.Module:
    """A torchvision ResNet-50 Bottleneck (stride on the 3x3 conv, v1.5) with a projection shortcut when needed."""
    from torchvision.models.resnet import Bottleneck

    out_ch = mid * Bottleneck.expansion
    down = None
    if stride != 1 or in_ch != out_ch:
        down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
    return Bottleneck(in_ch, mid, stride=stride, downsample=down)


# (name, in_channels, width, stride, input spatial size) for the first block of each ResNet-50 stage at 224 px.
R50_BLOCKS = [
    ("layer1.0", 64, 64, 1, 56),
    ("layer2.0", 256, 128, 2, 56),
    ("layer3.0", 512, 256, 2, 28),
    ("layer4.0", 1024, 512, 2, 14),
]


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def conv_block_rows(batch: int, repeat: int, min_time: float, blocks) -> list:
    rows = []
    for name, in_ch, mid, stride, hw in blocks:
        block = bottleneck(in_ch, mid, stride).train()
        x0 = torch.randn(batch, in_ch, hw, hw)
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            block = block.to(memory_format=fmt)
            x = x0.contiguous(memory_format=fmt).requires_grad_(True)
            for prec in ("fp32", "bf16"):
                ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else contextlib.nullcontext

                def fwd():
                    with torch.no_grad(), ctx():
                        block(x)

                def fwd_bwd():
                    with ctx():
                        y = block(x)
                    y.float().sum().backward()
                    block.zero_grad(set_to_none=True)
                    x.grad = None

                f_flops = count_flops(fwd)
                fb_flops = count_flops(fwd_bwd)
                tf = C.time_fn(fwd, warmup=2, repeat=repeat, min_time=min_time)
                tfb = C.time_fn(fwd_bwd, warmup=2, repeat=repeat, min_time=min_time)
                rows.append({
                    "block": name, "shape": f"{batch}x{in_ch}x{hw}x{hw}", "layout": layout, "precision": prec,
                    "fwd_ms": tf["best_s"] * 1e3, "fwd_gflops": f_flops / tf["best_s"] / 1e9,
                    "fwd_bwd_ms": tfb["best_s"] * 1e3, "fwd_bwd_gflops": fb_flops / tfb["best_s"] / 1e9,
                })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "machine_peak")
    parser.add_argument("--sizes", default="1024,2048,3072,4096", help="square matmul sizes")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (best-of-N)")
    parser.add_argument("--min-time", type=float, default=1.0, help="keep timing at least this many seconds")
    parser.add_argument("--conv-batch", type=int, default=16, help="batch of the ResNet-50 block benchmark")
    parser.add_argument("--no-conv", action="store_true", help="skip the conv block benchmark")
    args = parser.parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.sizes, args.repeat, args.min_time, args.conv_batch = "256,512", 2, 0.0, 2
    info = C.machine_info()
    C.print_header("Machine peak: matmul GFLOP/s and ResNet-50 block throughput", info)

    mm_rows = []
    for n in C.iter_sizes(args.sizes):
        for prec, dtype in DTYPES.items():
            r = matmul_gflops(n, dtype, args.repeat, args.min_time)
            r["precision"] = prec
            mm_rows.append(r)
    peaks = {p: max(r["best_gflops"] for r in mm_rows if r["precision"] == p) for p in DTYPES}
    print("### torch.matmul, square n x n (best of N)\n")
    table = []
    for n in C.iter_sizes(args.sizes):
        row = {"n": n}
        for r in mm_rows:
            if r["n"] == n:
                row[r["precision"] + "_best"] = r["best_gflops"]
                row[r["precision"] + "_median"] = r["median_gflops"]
        row["ratio"] = row["bf16_best"] / row["fp32_best"]
        table.append(row)
    print(C.markdown_table(table, ["n", "fp32_best", "fp32_median", "bf16_best", "bf16_median", "ratio"],
                           ["n", "fp32 GFLOP/s best", "fp32 median", "bf16 GFLOP/s best", "bf16 median",
                            "bf16/fp32"]))
    print(f"\npeak fp32 {peaks['fp32']:.1f} GFLOP/s, peak bf16 {peaks['bf16']:.1f} GFLOP/s "
          f"({peaks['bf16'] / peaks['fp32']:.2f}x)\n")

    conv_rows = []
    if not args.no_conv:
        blocks = R50_BLOCKS[:2] if args.quick else R50_BLOCKS
        conv_rows = conv_block_rows(args.conv_batch, max(2, args.repeat - 2), min(args.min_time, 0.5), blocks)
        for r in conv_rows:
            r["fwd_bwd_pct_bf16_peak"] = 100.0 * r["fwd_bwd_gflops"] / peaks["bf16"]
        print("### ResNet-50 bottleneck blocks (first block of each stage, 224 px input), best of N\n")
        print(C.markdown_table(conv_rows, ["block", "shape", "layout", "precision", "fwd_ms", "fwd_gflops",
                                           "fwd_bwd_ms", "fwd_bwd_gflops", "fwd_bwd_pct_bf16_peak"],
                               ["block", "input", "layout", "precision", "fwd ms", "fwd GFLOP/s",
                                "fwd+bwd ms", "fwd+bwd GFLOP/s", "% of bf16 matmul peak"]))
        print()
    path = C.write_json("machine_peak", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick,
        "peak_gflops": peaks, "matmul": mm_rows, "conv_blocks": conv_rows,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
