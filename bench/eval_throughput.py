#!/usr/bin/env python
"""Evaluation suite throughput: feature extraction of ``moco-zoo eval`` vs a plain loop, and the linear-probe sweep.

    python bench/eval_throughput.py                                  # both parts, default cases
    python bench/eval_throughput.py --parts extract --cases resnet50@224:paper --rounds 3
    python bench/eval_throughput.py --quick                          # smoke run

Extraction: ``moco_zoo.evaluation.features.extract_cached`` (the preset's batch, bf16 autocast where the CPU has
native bf16, channels_last, inference mode, safetensors cache written and read back) against a plain
``torch.no_grad()`` fp32 loop over the same DataLoader (same dataset, transform, batch size, workers) on the same
backbone (``moco_zoo.load_backbone``). Both are timed from building the model to holding the features in memory,
on the embedded synthetic ImageFolder (train/ + val/). Each (case, side, round) runs in its own subprocess, so its
peak RSS (``ru_maxrss``) is its own; rounds alternate which side goes first.

Linear sweep: ``moco_zoo.evaluation.linear.train_sweep`` trains the whole lr x wd grid (H heads in one stacked
GEMM per batch) against training the same H heads one at a time, each a plain ``nn.Linear`` with
``torch.optim.SGD`` (momentum, weight decay, per-epoch cosine lr) over the same batches: seconds per head.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import _common as C


# ------------------------------------------------------------------------------------------------ extraction
def _eval_cfg(spec: Dict[str, Any], out: str):
    from moco_zoo.evaluation.config import make_config

    kw = dict(backbone="random", arch=spec["arch"], data=spec["data"], image_size=spec["size"],
              workers=spec["workers"], output_dir=out, progress=False)
    if spec.get("batch"):
        kw["batch_size"] = spec["batch"]
    kw.update(spec.get("sets") or {})
    return make_config(spec["preset"], **kw)


def worker_extract(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from moco_zoo.evaluation import features as feat

    with tempfile.TemporaryDirectory() as out:
        cfg = _eval_cfg(spec, out)
        if spec["side"] == "ours":
            t0 = time.perf_counter()
            fs = feat.extract_cached(cfg, seed=0, device=torch.device("cpu"))
            seconds = time.perf_counter() - t0
            n, dim = len(fs.train) + len(fs.test), fs.train.shape[1]
            info = {"precision": cfg.precision, "channels_last": cfg.channels_last}
        else:
            import moco_zoo
            from moco_zoo.pretrain.data import make_loader

            datasets = feat.eval_datasets(cfg)
            t0 = time.perf_counter()
            model = moco_zoo.load_backbone("random", cfg.arch, num_classes=0, seed=0).eval()
            outs = []
            with torch.no_grad():
                for s in feat.SPLITS:
                    loader = make_loader(datasets[s], batch_size=cfg.batch_size, workers=cfg.workers)
                    for images, _, _ in loader:
                        outs.append(model(images))
            feats = torch.cat(outs)
            seconds = time.perf_counter() - t0
            n, dim = len(feats), feats.shape[1]
            info = {"precision": "fp32", "channels_last": False}
    return {"seconds": seconds, "images": n, "dim": dim, "img_s": n / seconds, "batch": cfg.batch_size, **info}


def worker_breakdown(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Where ours' extraction time goes: model build, the DataLoader alone, the forward alone, the cache."""
    import torch
    from safetensors.torch import load, save

    from moco_zoo.device import autocast, autocast_dtype
    from moco_zoo.evaluation import features as feat
    from moco_zoo.pretrain.data import make_loader

    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as out:
        cfg = _eval_cfg(spec, out)
        amp_dtype = autocast_dtype(device, cfg.precision)
        datasets = feat.eval_datasets(cfg)
        phases: Dict[str, float] = {}
        cpu: Dict[str, float] = {}

        def timed(name, fn):
            t, c = time.perf_counter(), time.process_time()
            value = fn()
            phases[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
            return value

        model = timed("build", lambda: feat.build_frozen_backbone(cfg, 0, device, datasets["train"], amp_dtype))
        batches = timed("data", lambda: [x for s in feat.SPLITS for x, _, _ in make_loader(
            datasets[s], batch_size=cfg.batch_size, workers=cfg.workers)])

        def forward():
            with torch.inference_mode(), autocast(device, amp_dtype):
                return torch.cat([model(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x)
                                  .float() for x in batches])

        feats = timed("forward", forward)
        timed("cache", lambda: load(save({"features": feats.contiguous()})))
        total = timed("extract_cached", lambda: feat.extract_cached(cfg, seed=0, device=device))
    return {"images": len(feats), "batch": cfg.batch_size, "seconds": phases, "cpu_seconds": cpu,
            "same_features": bool(torch.allclose(total.train, feats[:len(total.train)], atol=1e-2, rtol=0))}


def worker_forward(spec: Dict[str, Any]) -> Dict[str, Any]:
    """CPU milliseconds per image of the backbone's forward alone, for each (variant, batch), min over repeats.

    The variants run round-robin in one process, so they share the machine's state; CPU time (not wall) keeps
    other processes out of the figure.
    """
    import torch

    import moco_zoo

    model = moco_zoo.load_backbone("random", spec["arch"], num_classes=0, seed=0).eval()
    variants = {  # name -> (autocast dtype, channels_last, inference_mode)
        "fp32": (None, False, False), "bf16": (torch.bfloat16, False, False),
        "bf16 + channels_last": (torch.bfloat16, True, False),
        "bf16 + channels_last + inference_mode": (torch.bfloat16, True, True),
        "fp32 + inference_mode": (None, False, True)}
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, spec["size"], spec["size"], generator=g) for b in spec["batches"]}
    models = {False: model, True: copy.deepcopy(model).to(memory_format=torch.channels_last)}
    best: Dict[str, Dict[int, float]] = {v: {} for v in variants}

    def run(variant, b):
        dtype, cl, inference = variants[variant]
        x = inputs[b].contiguous(memory_format=torch.channels_last) if cl else inputs[b]
        with (torch.inference_mode() if inference else torch.no_grad()), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            models[cl](x)

    for rep in range(spec["repeat"] + 1):  # the first pass is the warm-up
        for variant in variants:
            for b in spec["batches"]:
                c = time.process_time()
                run(variant, b)
                ms = (time.process_time() - c) * 1e3 / b
                if rep:
                    best[variant][b] = min(best[variant].get(b, float("inf")), ms)
    return {"ms_per_image": best}


# ------------------------------------------------------------------------------------------------ linear sweep
def worker_linear(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from moco_zoo.evaluation.linear import LinearSweep, cosine_factor, epoch_order, init_head, train_sweep

    n, d, c = spec["n"], spec["dim"], spec["classes"]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(c, d, generator=g)[y] + torch.randn(n, d, generator=g)  # NxD class means + noise
    lrs, wds = spec["lrs"], spec["wds"]
    heads = len(lrs) * len(wds)
    epochs, batch = spec["epochs"], spec["batch"]
    t0 = time.perf_counter()
    if spec["side"] == "ours":
        sweep = LinearSweep(d, c, lrs, wds, seed=0)
        train_sweep(sweep, x, y, epochs=epochs, batch_size=batch, seed=0)
        acc = sweep.accuracy(x, y).tolist()
    else:
        acc = []
        for lr in lrs:
            for wd in wds:
                head = torch.nn.Linear(d, c)
                w0, b0 = init_head(d, c, 0)
                with torch.no_grad():
                    head.weight.copy_(w0)
                    head.bias.copy_(b0)
                opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
                for epoch in range(epochs):
                    for group in opt.param_groups:
                        group["lr"] = lr * cosine_factor(epoch, epochs)
                    order = epoch_order(n, 0, epoch)
                    for i in range(0, n, batch):
                        idx = order[i:i + batch]
                        loss = F.cross_entropy(head(x[idx]), y[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                with torch.no_grad():
                    acc.append((head(x).argmax(1) == y).float().mean().item() * 100)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "heads": heads, "s_per_head": seconds / heads, "mean_train_acc": sum(acc) / len(acc)}


# ------------------------------------------------------------------------------------------------ driver
def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    res = {"extract": worker_extract, "breakdown": worker_breakdown, "forward": worker_forward,
           "linear": worker_linear}[spec["part"]](spec)
    res.update(peak_rss_mb=C.peak_rss_mb(), threads=torch.get_num_threads())
    print("RESULT " + json.dumps(res), flush=True)
    return 0



def _alternate(make_spec, rounds: int, timeout: float, label: str) -> Dict[str, List[Dict[str, Any]]]:
    runs: Dict[str, List[Dict[str, Any]]] = {"ours": [], "theirs": []}
    for rnd in range(rounds):
        for side in (("ours", "theirs") if rnd % 2 == 0 else ("theirs", "ours")):
            r = C.run_worker(__file__, make_spec(side), timeout)
            r["round"] = rnd
            runs[side].append(r)
            print(f"  {label} round {rnd} {side}: " + (r.get("error") or json.dumps(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})), file=sys.stderr, flush=True)
    return runs


def _median(runs: List[Dict[str, Any]], key: str):
    vals = [r[key] for r in runs if "error" not in r and key in r]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "eval_throughput")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="extract,linear",
                        help="comma list of extract, breakdown (ours' extraction by phase, one run per case), "
                             "forward (the forward alone per precision / layout / batch), linear")
    parser.add_argument("--cases", default="resnet50@224:paper,resnet18@64:cpu-small",
                        help="extraction cases arch@image_size:preset")
    parser.add_argument("--images", type=int, default=320, help="synthetic ImageFolder images (train + val)")
    parser.add_argument("--batch", type=int, default=0, help="extraction batch for both (default: the preset's)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="eval config override for OUR extraction only (e.g. precision=fp32)")
    parser.add_argument("--forward-cases", default="resnet18@64,resnet50@224", help="forward part: arch@image_size")
    parser.add_argument("--forward-batches", default="64,128,256", help="forward part: batch sizes")
    parser.add_argument("--forward-repeat", type=int, default=3, help="forward part: repeats (min is reported)")
    parser.add_argument("--linear", default="8192x2048x100", help="linear sweep features NxDxC")
    parser.add_argument("--linear-epochs", type=int, default=2)
    parser.add_argument("--linear-batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    if args.quick:
        args.cases, args.images, args.rounds, args.linear = "resnet18@64:cpu-small", 64, 1, "1024x512x10"
        args.forward_cases, args.forward_batches, args.forward_repeat = "resnet18@32", "8,16", 1
    C.set_threads(args.threads)
    info = C.machine_info()
    C.print_header("Evaluation: feature extraction and linear sweep", info)
    from moco_zoo.config import parse_overrides
    from moco_zoo.evaluation.config import make_config

    parts = [p for p in args.parts.split(",") if p]
    ours_sets = parse_overrides(args.set) if args.set else {}
    extract_rows: List[Dict[str, Any]] = []
    linear_rows: List[Dict[str, Any]] = []
    breakdown_rows: List[Dict[str, Any]] = []
    forward_rows: List[Dict[str, Any]] = []
    if "extract" in parts or "breakdown" in parts:
        from moco_zoo.pretrain.data import resolve_data_root

        data = str(resolve_data_root("synthetic", args.images, 64))
    if "extract" in parts:
        for case in [c for c in args.cases.split(",") if c]:
            arch_size, preset = case.split(":")
            arch, size = arch_size.split("@")

            def spec(side, arch=arch, size=int(size), preset=preset):
                return dict(part="extract", side=side, arch=arch, size=size, preset=preset, data=data,
                            workers=args.workers, batch=args.batch, threads=args.threads,
                            sets=ours_sets if side == "ours" else {})

            runs = _alternate(spec, args.rounds, args.timeout, case)
            o, t = runs["ours"], runs["theirs"]
            ok = [r for r in o if "error" not in r]
            row = {"case": case, "batch": ok[0]["batch"] if ok else None,
                   "ours": ("bf16" if ok and ok[0]["precision"] in ("auto", "bf16") else (ok[0]["precision"] if ok
                            else "-")) + (" + channels_last" if ok and ok[0]["channels_last"] else ""),
                   "ours_img_s": _median(o, "img_s"), "plain_img_s": _median(t, "img_s"),
                   "ours_rss": _median(o, "peak_rss_mb"), "plain_rss": _median(t, "peak_rss_mb"),
                   "images": ok[0]["images"] if ok else None, "runs": runs}
            if row["ours_img_s"] and row["plain_img_s"]:
                row["ratio"] = row["ours_img_s"] / row["plain_img_s"]
            extract_rows.append(row)
        print("Feature extraction (img/s; ratio ours / plain fp32 no_grad loop)\n")
        print(C.markdown_table(extract_rows, ["case", "images", "batch", "ours", "ours_img_s", "plain_img_s", "ratio",
                                              "ours_rss", "plain_rss"],
                               ["backbone @ px : preset", "images", "batch", "ours", "ours img/s",
                                "plain fp32 img/s", "ratio", "ours peak RSS MiB", "plain peak RSS MiB"], digits=2))
        print()
    if "breakdown" in parts:
        for case in [c for c in args.cases.split(",") if c]:
            arch_size, preset = case.split(":")
            arch, size = arch_size.split("@")
            r = C.run_worker(__file__, dict(part="breakdown", side="ours", arch=arch, size=int(size), preset=preset,
                                            data=data, workers=args.workers, batch=args.batch,
                                            threads=args.threads, sets=ours_sets), args.timeout)
            row: Dict[str, Any] = {"case": case, **r}
            if "error" not in r:
                sec = r["seconds"]
                row.update({k: sec[k] for k in ("build", "data", "forward", "cache", "extract_cached")})
                row["sum"] = sum(sec[k] for k in ("build", "data", "forward", "cache"))
                row["forward_share"] = 100.0 * sec["forward"] / row["sum"]
            breakdown_rows.append(row)
        print("Ours' extraction by phase (seconds, wall; one subprocess per case; the phases are run separately "
              "and then extract_cached end to end)\n")
        print(C.markdown_table(breakdown_rows, ["case", "images", "batch", "build", "data", "forward", "cache", "sum",
                                                "forward_share", "extract_cached", "same_features", "error"],
                               ["backbone @ px : preset", "images", "batch", "model build s", "DataLoader s",
                                "forward s", "cache write + read s", "sum s", "forward % of sum",
                                "extract_cached s", "features equal", "error"], digits=2))
        print()
    if "forward" in parts:
        batches = [int(b) for b in args.forward_batches.split(",") if b]
        for case in [c for c in args.forward_cases.split(",") if c]:
            arch, size = case.split("@")
            r = C.run_worker(__file__, dict(part="forward", arch=arch, size=int(size), batches=batches,
                                            repeat=args.forward_repeat, threads=args.threads), args.timeout)
            if "error" in r:
                forward_rows.append({"case": case, "error": r["error"]})
                continue
            ms = r["ms_per_image"]
            for variant, per_batch in ms.items():
                row = {"case": case, "variant": variant, "raw": per_batch}
                for b in batches:
                    row[f"ms_{b}"] = per_batch[str(b)]
                    row[f"x_{b}"] = ms["fp32"][str(b)] / per_batch[str(b)]
                forward_rows.append(row)
        cols = ["case", "variant"] + [f"{k}_{b}" for b in batches for k in ("ms", "x")]
        heads = ["backbone @ px", "forward variant"] + [h for b in batches
                                                         for h in (f"CPU ms/img @ b{b}", f"vs fp32 @ b{b}")]
        print("The backbone's forward alone (CPU milliseconds per image, min over repeats; random input)\n")
        print(C.markdown_table(forward_rows, cols + ["error"], heads + ["error"], digits=2))
        print()
    if "linear" in parts:
        n, d, c = (int(v) for v in args.linear.split("x"))
        paper = make_config("paper", backbone="random")
        lrs, wds = list(paper.linear_lrs), list(paper.linear_wds)

        def lspec(side):
            return dict(part="linear", side=side, n=n, dim=d, classes=c, lrs=lrs, wds=wds,
                        epochs=args.linear_epochs, batch=args.linear_batch, threads=args.threads)

        runs = _alternate(lspec, args.rounds, args.timeout, "linear")
        o, t = runs["ours"], runs["theirs"]
        row = {"features": f"{n} x {d}, {c} classes", "heads": len(lrs) * len(wds), "epochs": args.linear_epochs,
               "batch": args.linear_batch, "ours_s": _median(o, "seconds"), "plain_s": _median(t, "seconds"),
               "ours_s_head": _median(o, "s_per_head"), "plain_s_head": _median(t, "s_per_head"),
               "ours_rss": _median(o, "peak_rss_mb"), "plain_rss": _median(t, "peak_rss_mb"), "runs": runs}
        if row["ours_s"] and row["plain_s"]:
            row["speedup"] = row["plain_s"] / row["ours_s"]
        linear_rows.append(row)
        print("Linear-probe sweep (lr x wd grid of the paper preset; seconds)\n")
        print(C.markdown_table(linear_rows, ["features", "heads", "epochs", "batch", "ours_s", "ours_s_head",
                                             "plain_s", "plain_s_head", "speedup", "ours_rss", "plain_rss"],
                               ["features", "heads", "epochs", "batch", "ours s (all heads)", "ours s/head",
                                "one at a time s", "one at a time s/head", "speedup", "ours peak RSS MiB",
                                "one at a time peak RSS MiB"], digits=2))
    for row in extract_rows + linear_rows:
        for side, rs in row["runs"].items():
            for r in rs:
                if "error" in r:
                    print(f"\n{row.get('case', 'linear')} {side} round {r['round']}: {r['error']}")
    path = C.write_json("eval_throughput", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k != "_worker"}, "extract": extract_rows,
        "breakdown": breakdown_rows, "forward": forward_rows, "linear": linear_rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
