"""MoCo v3 training step: ours (``moco_zoo.pretrain.builder_v3``) against facebookresearch/moco-v3's own builder,
side by side in one process.

Both step the same model (ours builds it; the original's ``MoCo_ResNet`` / ``MoCo_ViT`` get the same weights), the
same inputs, the same momentum and the paper's optimizer (LARS for ResNets: the original's ``moco/optimizer.py``
against ours; AdamW for ViTs), in fp32 and in bf16 autocast (+ channels_last for ResNets, applied to both). Steps
alternate between the two implementations round by round, so they share the machine's load; the best round of each
counts. FLOPs of one step come from ``torch.utils.flop_counter``; % of peak is against the bf16 matmul peak measured by
``bench/machine_peak.py`` (``bench/results/machine_peak.json``).

The original is read from a checkout of https://github.com/facebookresearch/moco-v3 (``--reference DIR`` holding
``moco/builder.py`` and ``moco/optimizer.py``), never copied here. It needs ``torch.distributed`` (a one-process gloo
group is started) and moves its labels with ``.cuda()`` (mapped to the tensor itself on CPU).

    python bench/v3_step.py --reference /path/to/moco-v3
    python bench/v3_step.py --reference /path/to/moco-v3 --configs resnet18:64:64,vit_tiny:64:64 --quick
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from functools import partial
from typing import Any, Dict, List

import _common as C
import timm
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from moco_zoo.pretrain.builder_v3 import MoCoV3, is_vit_arch, timm_arch
from moco_zoo.pretrain.optim import make_v3_optimizer

DEFAULT_CONFIGS = "resnet50:224:16,vit_small:224:16,resnet18:64:64,vit_tiny:64:64"


def load_reference(path: str):
    if not os.path.isfile(os.path.join(path, "moco", "builder.py")):
        raise SystemExit(f"v3_step.py: error: {path}: no moco/builder.py (pass a facebookresearch/moco-v3 checkout)")
    sys.path.insert(0, path)
    import moco.builder as ref_builder
    import moco.optimizer as ref_optimizer

    return ref_builder, ref_optimizer


def build_pair(arch: str, size: int, ref_builder, ref_optimizer):
    """(ours, theirs, our optimizer, their optimizer) with identical weights."""
    torch.manual_seed(0)
    vit = is_vit_arch(arch)
    T = 0.2 if vit else 1.0  # the paper's temperatures
    ours = MoCoV3.from_arch(arch, dim=256, mlp_dim=4096, T=T, image_size=size)
    kwargs = {"img_size": size} if vit else {}
    cls = ref_builder.MoCo_ViT if vit else ref_builder.MoCo_ResNet
    theirs = cls(partial(timm.create_model, timm_arch(arch), **kwargs), dim=256, mlp_dim=4096, T=T)
    if vit:  # moco-v3's vits.py freezes the patch projection and the sin-cos position embedding
        theirs.base_encoder.patch_embed.proj.requires_grad_(False)
        theirs.base_encoder.pos_embed.requires_grad_(False)
    theirs.load_state_dict(ours.state_dict())
    if vit:
        opt_ours = make_v3_optimizer(ours, "adamw", 1.5e-4, 0.1)
        opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], 1.5e-4, weight_decay=0.1)
    else:
        opt_ours = make_v3_optimizer(ours, "lars", 0.6, 1e-6)
        opt_theirs = ref_optimizer.LARS(theirs.parameters(), 0.6, weight_decay=1e-6, momentum=0.9)
    return ours, theirs, opt_ours, opt_theirs


def step_fn(model, optimizer, x1, x2, bf16: bool):
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        with ctx():
            loss = model(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(arch: str, size: int, batch: int, precision: str, args, refs) -> Dict[str, Any]:
    ours, theirs, o_ours, o_theirs = build_pair(arch, size, *refs)
    bf16 = precision == "bf16"
    x1, x2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    if bf16 and not is_vit_arch(arch):
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
        x1, x2 = (t.contiguous(memory_format=torch.channels_last) for t in (x1, x2))
    steps = {"ours": step_fn(ours.train(), o_ours, x1, x2, bf16),
             "moco-v3": step_fn(theirs.train(), o_theirs, x1, x2, bf16)}
    flops = count_step_flops(steps["ours"])
    best = {name: float("inf") for name in steps}
    for _ in range(args.rounds):  # alternate: both see the same load
        for name, fn in steps.items():
            t = C.time_fn(fn, warmup=1, repeat=args.steps)
            best[name] = min(best[name], t["best_s"])
    peak = bf16_peak_gflops()
    row: Dict[str, Any] = {"arch": arch, "size": size, "batch": batch, "precision": precision,
                           "gflop_per_step": flops / 1e9}
    for name, s in best.items():
        row[f"{name}_img_s"] = batch / s
        row[f"{name}_peak_pct"] = 100.0 * flops / s / 1e9 / peak if peak else None
    row["ratio"] = row["ours_img_s"] / row["moco-v3_img_s"]
    return row


def count_step_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def bf16_peak_gflops():
    data = C.read_json(C.RESULTS_DIR / "machine_peak.json")
    return float(data["peak_gflops"]["bf16"]) if data and not data.get("quick") else None


def main(argv=None) -> int:
    parser = C.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "v3_step")
    parser.add_argument("--reference", required=True, help="a facebookresearch/moco-v3 checkout")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="ARCH:SIZE:BATCH,... (default: %(default)s)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = parser.parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.configs, args.rounds, args.steps = "resnet18:32:8,vit_tiny:32:8", 1, 1
    refs = load_reference(args.reference)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    dist.init_process_group("gloo", rank=0, world_size=1)  # the original gathers keys with all_gather
    torch.Tensor.cuda = lambda self, *a, **k: self  # the original's labels go to .cuda(); stay on CPU here
    info = C.machine_info()
    C.print_header("MoCo v3 step: ours vs facebookresearch/moco-v3 builder", info)
    rows: List[Dict[str, Any]] = []
    for spec in args.configs.split(","):
        arch, size, batch = spec.split(":")
        for precision in args.precisions.split(","):
            rows.append(measure(arch, int(size), int(batch), precision, args, refs))
            print(C.markdown_table(rows[-1:], ["arch", "size", "batch", "precision", "ours_img_s", "moco-v3_img_s",
                                              "ratio", "ours_peak_pct", "moco-v3_peak_pct"]), flush=True)
    print(C.markdown_table(rows, ["arch", "size", "batch", "precision", "gflop_per_step", "ours_img_s",
                                  "moco-v3_img_s", "ratio", "ours_peak_pct", "moco-v3_peak_pct"]))
    path = C.write_json("v3_step", {"machine": info, "args": vars(args), "rows": rows}, args.out)
    print(f"\nwrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
