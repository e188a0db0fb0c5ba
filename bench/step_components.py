#!/usr/bin/env python
"""Micro-benchmarks of the pieces of a MoCo step, to decide which optimisations pay on this machine.

    python bench/step_components.py                  # all sections
    python bench/step_components.py --sections encoder,logits --quick

Sections (each prints a table; best-of-N wall time and the process CPU time of the best call):

* ``encoder``: ResNet forward+backward (query side) + no-grad forward (key side) in fp32 / bf16 autocast and
  NCHW / channels_last, with plain BatchNorm and with the engine's SplitBatchNorm2d (single-device shuffle-BN
  emulation, G groups) as the MoCo module runs it (the input reordered with ``split_block_order``, one native
  batch_norm per contiguous block, keeps channels_last). The BN variants of one (arch, layout, precision) are timed in alternation, so they share the machine's load.
* ``momentum``: key-encoder momentum update, per-parameter Python loop (the original code) vs torch._foreach ops.
* ``logits``: InfoNCE logits forward+backward: einsum positives + einsum over ``queue.clone()`` + cat + in-place
  divide (the original code) vs one mm against the queue without a clone (ours), fp32 and bf16.
* ``sgd``: torch.optim.SGD (momentum, weight decay) with the default CPU implementation, foreach=True, fused=True.
* ``compile``: torch.compile of the encoder (forward+backward), compile time and steady-state speed.
* ``profile``: ours' whole MoCo v2 step (ResNet-50 @ 224, bf16 + channels_last) under torch.profiler, per op: share
  of the step and the FLOP rate of the ops that carry FLOPs (what keeps the step below the matmul peak).
* ``loader``: DataLoader start-up cost (time to first batch) with workers, the cost persistent_workers removes at
  every epoch boundary.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Dict, List

import _common as C

import torch
import torch.nn as nn
import torch.nn.functional as F


def timed(fn, repeat: int, warmup: int = 1) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    best, best_cpu, total = float("inf"), float("inf"), 0.0
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        total += dt
        if dt < best:
            best, best_cpu = dt, dc
    return {"ms": best * 1e3, "cpu_ms": best_cpu * 1e3, "mean_ms": total / repeat * 1e3}


def make_resnet(arch: str) -> nn.Module:
    import timm

    return timm.create_model(arch, num_classes=128)


# ------------------------------------------------------------------------------------------------ sections
def encoder_section(args) -> List[Dict[str, Any]]:
    """For each (arch, layout, precision), the BN variants are timed in alternation (one call each per round), so
    they see the same machine load; best and median over rounds, CPU time of the process for the median call."""
    import statistics

    from moco_zoo.pretrain.shuffle_bn import SplitBatchNorm2d, split_block_order

    rows = []
    cases = [("resnet50", 224, args.r50_batch), ("resnet18", 64, args.r18_batch)]
    if args.quick:
        cases = [("resnet18", 64, 8)]
    for arch, size, batch in cases:
        x0 = torch.randn(batch, 3, size, size)
        for layout in args.layouts.split(","):
            mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = x0.contiguous(memory_format=mf)
            for prec in args.precisions.split(","):
                ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" \
                    else contextlib.nullcontext
                fns = {}
                for bn in args.bn_modes.split(","):
                    torch.manual_seed(0)
                    model = make_resnet(arch).train()
                    if bn == "split":
                        SplitBatchNorm2d.convert(model, args.groups)
                    model = model.to(memory_format=mf)
                    # as MoCo._encode: split BN runs on the reordered batch, output rows put back in order
                    order = split_block_order(batch, args.groups) if bn == "split" else None

                    def encode(inp, model=model, order=order):
                        return model(inp) if order is None else model(inp[order])[torch.argsort(order)]

                    def step(model=model, encode=encode):  # query fwd+bwd + key fwd (no grad): one MoCo step's
                        with ctx():                         # encoder work
                            y = encode(x)
                        y.float().sum().backward()
                        model.zero_grad(set_to_none=True)
                        with torch.no_grad(), ctx():
                            encode(x)

                    step()  # warm-up
                    fns[bn] = step
                walls: Dict[str, List[float]] = {k: [] for k in fns}
                cpus: Dict[str, List[float]] = {k: [] for k in fns}
                for _ in range(args.repeat):
                    for k, fn in fns.items():
                        c0, t0 = time.process_time(), time.perf_counter()
                        fn()
                        walls[k].append(time.perf_counter() - t0)
                        cpus[k].append(time.process_time() - c0)
                for k in fns:
                    rows.append({"arch": f"{arch}@{size}", "batch": batch, "bn": k, "layout": layout,
                                 "precision": prec, "step_ms_best": min(walls[k]) * 1e3,
                                 "step_ms_median": statistics.median(walls[k]) * 1e3,
                                 "img_s": batch / min(walls[k]),
                                 "img_cpu_s": batch / statistics.median(cpus[k])})
                del fns
    return rows


def momentum_section(args) -> List[Dict[str, Any]]:
    rows = []
    for arch in (("resnet18",) if args.quick else ("resnet50", "resnet18")):
        q, k = make_resnet(arch), make_resnet(arch)
        pq, pk = list(q.parameters()), list(k.parameters())
        for p in pk:
            p.requires_grad_(False)
        m = 0.999

        @torch.no_grad()
        def loop():  # the original: param_k.mul_(m).add_(param_q.mul(1 - m)) per parameter
            for a, b in zip(pq, pk):
                b.mul_(m).add_(a.mul(1.0 - m))

        @torch.no_grad()
        def foreach():
            torch._foreach_mul_(pk, m)
            torch._foreach_add_(pk, [p.detach() for p in pq], alpha=1.0 - m)

        @torch.no_grad()
        def lerp():
            torch._foreach_lerp_(pk, [p.detach() for p in pq], 1.0 - m)

        n = sum(p.numel() for p in pq)
        for name, fn in (("per-parameter loop (reference)", loop), ("foreach mul_+add_ (ours)", foreach),
                         ("foreach lerp_", lerp)):
            r = timed(fn, args.repeat * 4)
            rows.append({"arch": arch, "params_M": n / 1e6, "impl": name, **r})
    return rows


def logits_section(args) -> List[Dict[str, Any]]:
    rows = []
    n, c, K, T = (64, 128, 4096, 0.2) if args.quick else (args.logits_batch, 128, 65536, 0.2)
    queue = F.normalize(torch.randn(c, K), dim=0)
    for prec in ("fp32", "bf16"):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else contextlib.nullcontext
        q0 = F.normalize(torch.randn(n, c), dim=1).requires_grad_(True)
        k0 = F.normalize(torch.randn(n, c), dim=1)
        labels = torch.zeros(n, dtype=torch.long)

        def reference():
            with ctx():
                l_pos = torch.einsum("nc,nc->n", [q0, k0]).unsqueeze(-1)
                l_neg = torch.einsum("nc,ck->nk", [q0, queue.clone().detach()])
                logits = torch.cat([l_pos, l_neg], dim=1)
                logits /= T
            F.cross_entropy(logits.float(), labels).backward()
            q0.grad = None

        def ours():
            with ctx():
                l_pos = torch.einsum("nc,nc->n", q0, k0).unsqueeze(-1)
                l_neg = torch.mm(q0, queue.to(q0.dtype) if prec == "fp32" else queue)
                logits = torch.cat([l_pos, l_neg], dim=1) / T
            F.cross_entropy(logits.float(), labels).backward()
            q0.grad = None

        def one_matmul():  # [k | queue] as one C x (1+K) operand would need a copy; positives via rowwise dot
            with ctx():
                l_neg = q0 @ queue
                l_pos = (q0 * k0).sum(1, keepdim=True)
                logits = torch.cat([l_pos, l_neg], 1).div_(T)
            F.cross_entropy(logits.float(), labels).backward()
            q0.grad = None

        for name, fn in (("einsum + queue.clone() + cat + /= T (reference)", reference),
                         ("mm on the queue, no clone (ours)", ours), ("@ + rowwise dot + div_", one_matmul)):
            r = timed(fn, args.repeat * 2)
            rows.append({"shape": f"N={n} C={c} K={K}", "precision": prec, "impl": name, **r})
    return rows


def sgd_section(args) -> List[Dict[str, Any]]:
    rows = []
    for arch in (("resnet18",) if args.quick else ("resnet50",)):
        model = make_resnet(arch)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        for name, kw in (("default", {}), ("foreach=True", {"foreach": True}), ("fused=True", {"fused": True})):
            try:
                opt = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4, **kw)
                r = timed(opt.step, args.repeat * 4)
            except (RuntimeError, TypeError) as e:
                rows.append({"arch": arch, "impl": name, "error": str(e).splitlines()[0]})
                continue
            rows.append({"arch": arch, "impl": name, **r})
    return rows


def compile_section(args) -> List[Dict[str, Any]]:
    rows = []
    arch, size, batch = ("resnet18", 64, 8 if args.quick else args.r18_batch)
    for prec in ("fp32", "bf16"):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else contextlib.nullcontext
        torch.manual_seed(0)
        model = make_resnet(arch).train().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        for mode in ("eager", "compiled"):
            m = model if mode == "eager" else torch.compile(model)

            def fwd_bwd():
                with ctx():
                    y = m(x)
                y.float().sum().backward()
                model.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            try:
                fwd_bwd()
            except Exception as e:  # compile may fail without a C++ compiler
                rows.append({"arch": f"{arch}@{size}", "batch": batch, "precision": prec, "mode": mode,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            first = time.perf_counter() - t0
            r = timed(fwd_bwd, args.repeat, warmup=1)
            rows.append({"arch": f"{arch}@{size}", "batch": batch, "precision": prec, "mode": mode,
                         "first_call_s": first, **r, "img_s": batch / r["ms"] * 1e3})
    return rows


def loader_section(args) -> List[Dict[str, Any]]:
    """Time to the first batch of a fresh DataLoader iterator (what every epoch pays without persistent workers)."""
    from pathlib import Path

    from moco_zoo.pretrain.augment import TwoCropsTransform, pretrain_transform
    from moco_zoo.pretrain.data import ImageFolderDataset, ResumableBatchSampler, make_loader

    from pretrain_throughput import ensure_imagefolder

    root = ensure_imagefolder(Path(args.data_dir), 200, 64)
    ds = ImageFolderDataset(root, TwoCropsTransform(pretrain_transform("v2", 64)))
    rows = []
    for workers in (0, 1, 2):
        for persistent in ((False, True) if workers else (False,)):
            sampler = ResumableBatchSampler(len(ds), 32, seed=0)
            loader = make_loader(ds, sampler, workers=workers, persistent_workers=persistent, seed=0)
            firsts, epochs_s = [], []
            for epoch in range(3):
                sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                it = iter(loader)
                next(it)
                firsts.append(time.perf_counter() - t0)
                for _ in it:
                    pass
                epochs_s.append(time.perf_counter() - t0)
            rows.append({"workers": workers, "persistent": persistent,
                         "first_batch_ms_epoch0": firsts[0] * 1e3, "first_batch_ms_later": min(firsts[1:]) * 1e3,
                         "epoch_s_later": min(epochs_s[1:]), "images_per_epoch": sampler.steps_per_epoch * 32})
            del loader
    return rows


def profile_section(args) -> List[Dict[str, Any]]:
    """Ours' whole MoCo v2 step (engine ``Trainer.train_step``, bf16 autocast + channels_last, ResNet-50 at 224,
    ``--profile-batch``) under torch.profiler: each op's share of the step's self CPU time and, for ops with counted
    FLOPs (FlopCounterMode), the FLOP rate the op reached. Shows which ops keep the step below the matmul peak."""
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from moco_zoo.pretrain.config import make_config
    from moco_zoo.pretrain.engine import Trainer

    from pretrain_throughput import ensure_imagefolder

    arch, size, b = "resnet50", (64 if args.quick else 224), (2 if args.quick else args.profile_batch)
    root = ensure_imagefolder(Path(args.data_dir), 101, 64)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(data=str(root.parent), arch=arch, moco_version="v2", image_size=size, batch_size=b,
                          moco_k=65536, shuffle_bn="off", workers=0, device="cpu", precision="bf16",
                          channels_last=True, epochs=1000, knn_every=0, progress=False, plots=False,
                          output_dir=tmp, seed=0, keep_host_memory=True)
        trainer = Trainer(cfg)
        trainer.model.train()

        def step():
            trainer.train_step(images, torch.arange(b))

        with FlopCounterMode(display=False) as fc:
            step()
        flops = {str(k).replace("aten.", "aten::").rsplit(".", 1)[0]: v
                 for k, v in fc.get_flop_counts()["Global"].items()}
        step()
        n = max(1, args.repeat)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
    events = [(e.key, e.self_cpu_time_total / 1e6 / n, e.count // n) for e in prof.key_averages()]
    total = sum(t for _, t, _ in events)
    rows = []
    for key, t, calls in sorted(events, key=lambda r: -r[1])[:16]:
        # the forward convolution's FLOPs are counted on aten::convolution, its time spent in the oneDNN kernel
        f = flops.get("aten::convolution" if key == "aten::mkldnn_convolution" else key)
        rows.append({"op": key, "ms_per_step": t * 1e3, "share_pct": 100.0 * t / total, "calls": calls,
                     "gflop": f / 1e9 if f else None, "gflop_s": f / t / 1e9 if f else None})
    rows.append({"op": f"total ({arch}@{size} b{b})", "ms_per_step": total * 1e3, "share_pct": 100.0,
                 "gflop": sum(flops.values()) / 1e9, "gflop_s": sum(flops.values()) / total / 1e9})
    return rows


SECTIONS = {
    "encoder": (encoder_section, ["arch", "batch", "bn", "layout", "precision", "step_ms_best", "step_ms_median",
                                  "img_s", "img_cpu_s"]),
    "momentum": (momentum_section, ["arch", "params_M", "impl", "ms", "cpu_ms", "mean_ms"]),
    "logits": (logits_section, ["shape", "precision", "impl", "ms", "cpu_ms", "mean_ms"]),
    "sgd": (sgd_section, ["arch", "impl", "ms", "cpu_ms", "mean_ms", "error"]),
    "compile": (compile_section, ["arch", "batch", "precision", "mode", "first_call_s", "ms", "img_s", "error"]),
    "loader": (loader_section, ["workers", "persistent", "first_batch_ms_epoch0", "first_batch_ms_later",
                                "epoch_s_later", "images_per_epoch"]),
    "profile": (profile_section, ["op", "ms_per_step", "share_pct", "calls", "gflop", "gflop_s"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "step_components")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--r50-batch", type=int, default=8)
    parser.add_argument("--r18-batch", type=int, default=64)
    parser.add_argument("--logits-batch", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8, help="SplitBatchNorm2d groups")
    parser.add_argument("--bn-modes", default="bn,split",
                        help="encoder section: plain BN and the engine's split BN as MoCo runs it")
    parser.add_argument("--precisions", default="fp32,bf16", help="encoder section precisions")
    parser.add_argument("--layouts", default="nchw,channels_last", help="encoder section layouts")
    parser.add_argument("--profile-batch", type=int, default=16, help="profile section: ResNet-50 @ 224 batch")
    parser.add_argument("--data-dir", default=C.default_data_dir())
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    C.set_threads(args.threads)
    info = C.machine_info()
    C.print_header("MoCo step components", info)
    results: Dict[str, Any] = {}
    for name in [s for s in args.sections.split(",") if s]:
        fn, cols = SECTIONS[name]
        rows = fn(args)
        results[name] = rows
        print(f"### {name}\n")
        print(C.markdown_table(rows, cols, digits=2))
        print(flush=True)
    path = C.write_json("step_components", {"machine": info, "contention": C.contention_note(info) or None,
                                             "quick": args.quick, "sections": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
