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
    res = (worker_extract if spec["part"] == "extract" else worker_linear)(spec)
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
    parser.add_argument("--parts", default="extract,linear", help="comma list of extract, linear")
    parser.add_argument("--cases", default="resnet50@224:paper,resnet18@64:cpu-small",
                        help="extraction cases arch@image_size:preset")
    parser.add_argument("--images", type=int, default=320, help="synthetic ImageFolder images (train + val)")
    parser.add_argument("--batch", type=int, default=0, help="extraction batch for both (default: the preset's)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="eval config override for OUR extraction only (e.g. precision=fp32)")
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
    C.set_threads(args.threads)
    info = C.machine_info()
    C.print_header("Evaluation: feature extraction and linear sweep", info)
    from moco_zoo.config import parse_overrides
    from moco_zoo.evaluation.config import make_config

    parts = [p for p in args.parts.split(",") if p]
    ours_sets = parse_overrides(args.set) if args.set else {}
    extract_rows: List[Dict[str, Any]] = []
    linear_rows: List[Dict[str, Any]] = []
    if "extract" in parts:
        from moco_zoo.pretrain.data import resolve_data_root

        data = str(resolve_data_root("synthetic", args.images, 64))
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
        "linear": linear_rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
