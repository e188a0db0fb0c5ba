#!/usr/bin/env python
"""MoCo pretraining throughput: ours vs the original facebookresearch/moco code path, side by side.

    python bench/pretrain_throughput.py --reference /path/to/moco          # full comparison (see bench/README.md)
    python bench/pretrain_throughput.py --quick --reference /path/to/moco  # smoke run, tiny sizes
    python bench/pretrain_throughput.py --variants fp32,bf16-cl            # ours only, two precisions

Two modes per configuration (``--configs``, default ResNet-50 at 224 px and ResNet-18 at 64 px):

* ``e2e``: JPEG decode + two augmented views in DataLoader workers + the MoCo step, on an ImageFolder of JPEGs
  generated with ``moco_zoo.data.write_imagefolder`` (cached under ``$MOCO_ZOO_DATA/bench`` or ``~/.cache/moco_zoo/data/bench``; ``--data-dir``).
* ``step``: the MoCo step alone on in-memory tensors (forward of both encoders, InfoNCE loss, backward, SGD step,
  momentum update, queue update).
* ``step-ab``: the step of ours (every variant) and of every peer built in ONE process, single steps alternating
  round-robin: the per-round ratio is meaningful even on a machine shared with other jobs.
* ``e2e-ab``: the same, each step first taking its next batch from its own 0-worker DataLoader (decode and the
  whole augmentation inside the timed, alternating steps; CPU time then covers all the work).

Peers (``--peers``, the alternatives a user would pick): ``moco-fp32`` is the original code as shipped;
``moco-bf16-cl`` the same code with bf16 autocast around its train loop and a channels_last model and inputs, added
by this harness (two lines a user would add); ``lightly-bf16-cl`` (and ``lightly-fp32``) is MoCo v2 assembled from
lightly's own building blocks (``MoCoProjectionHead``, ``NTXentLoss`` with its ``MemoryBankModule`` queue of K keys,
``update_momentum``, ``batch_shuffle``) in a plain PyTorch loop as lightly's examples/pytorch/moco.py and
benchmarks/imagenet/resnet50/mocov2.py do, with lightly's ``MoCoV2Transform`` (the MoCo v2 recipe) and a
torchvision ResNet of the same arch. Every implementation uses the same batch, crop size, queue size K, SGD
(lr 0.03 x batch / 256, momentum 0.9, weight decay 1e-4), images and DataLoader worker count.

Every measurement runs in its own subprocess (so ``ru_maxrss`` is that configuration's peak memory and nothing
leaks between runs), with the same torch threads and the same number of DataLoader workers for ours and the
reference. ``--rounds N`` alternates ours/reference N times and keeps each one's best, which evens out load drift.

Reference mode (``--reference PATH``, a checkout of facebookresearch/moco at commit 4397a04, never copied here):
their ``moco.builder.MoCo`` with ``torchvision.models.<arch>``, their ``moco.loader.TwoCropsTransform`` and
``GaussianBlur`` with the augmentation lists of their main_moco.py (rebuilt here with the crop size as the only
parameter), wrapped in ``DistributedDataParallel`` as their main_worker does, with their ``train()`` loop
(CrossEntropy, top-1/top-5 accuracy, ``loss.item()``, SGD) driving it. Their main_moco.py imports the package as
``deeplearning.cross_image_ssl.moco``; the runner aliases that name to PATH's ``moco`` package in ``sys.modules``.
To run their CUDA code on a CPU, the reference subprocess (only it) makes ``torch.Tensor.cuda`` and
``torch.nn.Module.cuda`` return ``self`` unchanged, and initialises a single-process gloo group
(world_size=1, rank=0, file:// init) for their ``concat_all_gather`` / ``_batch_shuffle_ddp``. Their
``accuracy()`` uses ``.view(-1)`` on a non-contiguous tensor, which current PyTorch rejects; it is replaced by the
same top-1/top-5 computation written with ``reshape``. Those four shims are the only changes to their code path.

Model FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode``; FLOPs / step time, divided by
the bf16 matmul peak from bench/results/machine_peak.json (run bench/machine_peak.py first), gives "% of peak".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import _common as C

# ------------------------------------------------------------------------------------------------ configuration
DEFAULT_CONFIGS = "resnet50@224:b32,resnet18@64:b128"
QUICK_CONFIGS = "resnet18@64:b16"
# Our variants: precision + memory format (+ torch.compile). The reference always runs its own fp32 NCHW code.
VARIANTS = {
    "fp32": dict(precision="fp32", channels_last=False, compile=False),
    "fp32-cl": dict(precision="fp32", channels_last=True, compile=False),
    "bf16": dict(precision="bf16", channels_last=False, compile=False),
    "bf16-cl": dict(precision="bf16", channels_last=True, compile=False),
    "bf16-cl-compile": dict(precision="bf16", channels_last=True, compile=True),
    # --augment batched: workers crop/resize/flip uint8 views, colour jitter + grayscale + blur batched in the step's
    # process (e2e only; in step mode there is no augmentation to time)
    "bf16-cl-batched": dict(precision="bf16", channels_last=True, compile=False, augment="batched"),
    "bf16-cl-batched-compile": dict(precision="bf16", channels_last=True, compile=True, augment="batched"),
    # glibc's default allocator behaviour (--no-keep-host-memory): freed activations go back to the OS every step
    "bf16-cl-malloc-default": dict(precision="bf16", channels_last=True, compile=False, keep_host_memory=False),
}
# The alternatives a user would pick instead of ours (``--peers``), each also run the strongest way we know on this
# CPU: bf16 autocast + channels_last model and inputs, added by this harness around their unchanged code. The fp32
# rows are the code as shipped.
PEERS = {
    "moco-fp32": dict(impl="reference", precision="fp32", channels_last=False),
    "moco-bf16-cl": dict(impl="reference", precision="bf16", channels_last=True),
    "lightly-bf16-cl": dict(impl="lightly", precision="bf16", channels_last=True),
    "lightly-fp32": dict(impl="lightly", precision="fp32", channels_last=False),
}
DEFAULT_PEERS = "moco-fp32,moco-bf16-cl,lightly-bf16-cl"


def parse_config(spec: str) -> Dict[str, Any]:
    """``resnet50@224:b32`` -> arch, image size, batch; optional ``:k4096`` queue size and ``:s256`` source px."""
    parts = spec.split(":")
    arch, size = parts[0].split("@")
    cfg = {"arch": arch, "image_size": int(size), "batch_size": 32, "K": 65536, "source_size": 0}
    for p in parts[1:]:
        if p.startswith("b"):
            cfg["batch_size"] = int(p[1:])
        elif p.startswith("k"):
            cfg["K"] = int(p[1:])
        elif p.startswith("s"):
            cfg["source_size"] = int(p[1:])
        else:
            raise ValueError(f"bad config part {p!r} in {spec!r}")
    if not cfg["source_size"]:  # JPEG size: ImageNet-like for 224 crops, the synthetic set's 64 px otherwise
        cfg["source_size"] = 256 if cfg["image_size"] >= 128 else cfg["image_size"]
    cfg["name"] = spec
    return cfg


# ------------------------------------------------------------------------------------------------ timing helpers
class TimedLoader:
    """Yields ``warmup + steps`` batches of ``loader`` and records when each was handed out (and when the loop
    asked for the next one after the last), so time per step includes waiting for data, as training sees it."""

    def __init__(self, loader, warmup: int, steps: int) -> None:
        self.loader, self.warmup, self.steps = loader, warmup, steps
        self.stamps: List[float] = []
        self.cpu_stamps: List[float] = []  # this process's CPU time (all its threads), robust-ish under load

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.warmup + self.steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(self.loader)
                batch = next(it)
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
            yield batch
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def timed_seconds(self) -> float:
        """Wall time of the timed steps (from handing out batch ``warmup`` to the end of the last step)."""
        return self.stamps[-1] - self.stamps[self.warmup]

    def cpu_seconds(self) -> float:
        """CPU time of this process (not of DataLoader workers) over the timed steps."""
        return self.cpu_stamps[-1] - self.cpu_stamps[self.warmup]


class ChannelsLastLoader:
    """Hands out ``loader``'s ``(views, target)`` batches with every view in channels_last memory format (what our
    engine does to its inputs), for the peers run with a channels_last model."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        import torch

        for views, target in self.loader:
            yield [v.contiguous(memory_format=torch.channels_last) for v in views], target


def peer_autocast(precision: str):
    """bf16 autocast on the CPU for a peer's forward/backward (``contextlib.nullcontext`` in fp32)."""
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MemoryLoader:
    """An endless 'loader' of one fixed in-memory batch in the (images, target) format of each code path."""

    def __init__(self, batch) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def count_step_flops(step_fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_fn()
    return int(fc.get_total_flops())


def bf16_peak_gflops() -> Optional[float]:
    data = C.read_json(C.RESULTS_DIR / "machine_peak.json")
    if not data or data.get("quick"):
        return None
    return float(data["peak_gflops"]["bf16"])


# ------------------------------------------------------------------------------------------------ data
def ensure_imagefolder(data_dir: Path, num_images: int, image_size: int) -> Path:
    """An ImageFolder of synthetic JPEGs (moco_zoo.data.write_imagefolder); returns its train/ directory."""
    from moco_zoo.data import write_imagefolder

    out = data_dir / f"imagefolder-n{num_images}-px{image_size}"
    if not (out / "train").is_dir():
        with contextlib.suppress(FileExistsError):
            write_imagefolder(out, num_images=num_images, image_size=image_size, seed=0)
    return out / "train"


# ------------------------------------------------------------------------------------------------ our engine
def run_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Our engine (pretrain/), driven through its public API: ``moco_zoo.pretrain.engine.Trainer`` built from a
    ``moco_zoo.pretrain.config.make_config`` config, its DataLoader (``trainer.loader``) and ``trainer.train_step``."""
    import torch

    from moco_zoo.pretrain.config import make_config
    from moco_zoo.pretrain.engine import Trainer

    v = VARIANTS[spec["variant"]]
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(
            data=str(Path(spec["data"]).parent), arch=spec["arch"], moco_version=spec["moco_version"],
            image_size=spec["image_size"], batch_size=spec["batch_size"], moco_k=spec["K"],
            shuffle_bn=spec["shuffle_bn"], shuffle_groups=spec["shuffle_groups"], workers=spec["workers"],
            pin_memory=spec["pin_memory"], persistent_workers=spec["persistent_workers"], device="cpu",
            precision=v["precision"], channels_last=v["channels_last"], compile=v["compile"],
            augment_backend=v.get("augment", "pil") if spec["mode"] == "e2e" else "pil",
            keep_host_memory=v.get("keep_host_memory", True), epochs=1000,
            knn_every=0, progress=False, plots=False, output_dir=out, seed=0)
        trainer = Trainer(cfg)
        trainer.model.train()
        losses: List[torch.Tensor] = []

        if spec["mode"] == "step":
            g = torch.Generator().manual_seed(0)
            b, s = spec["batch_size"], spec["image_size"]
            images = [torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)]
            loader = MemoryLoader((images, None, torch.arange(b)))
        else:
            trainer.sampler.set_epoch(0)
            loader = trainer.loader

        flops = None
        if spec["mode"] == "step" and spec.get("count_flops", True):
            imgs, _, idx = loader.batch
            flops = count_step_flops(lambda: trainer.train_step(imgs, idx))
        timed = TimedLoader(loader, spec["warmup"], spec["steps"])
        for images, _, index in timed:
            losses.append(trainer.train_step(images, index))  # detached, no host sync
        seconds, cpu_seconds = timed.timed_seconds(), timed.cpu_seconds()
        final_loss = float(torch.stack(losses[-spec["steps"]:]).mean())
        del timed, loader, trainer
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "flops_per_step": flops, "loss": final_loss}


# ------------------------------------------------------------------------------------------------ reference
def setup_reference(ref_path: str, tmpdir: str):
    """Import facebookresearch/moco from ``ref_path`` with the four documented shims; return its modules."""
    import types

    import torch
    import torch.distributed as dist
    import torch.nn as nn

    ref = str(Path(ref_path).resolve())
    if not (Path(ref) / "moco" / "builder.py").is_file():
        raise SystemExit(f"--reference {ref_path}: not a facebookresearch/moco checkout (moco/builder.py missing)")
    if ref not in sys.path:
        sys.path.insert(0, ref)
    # Shim 1: CUDA calls are no-ops in this (CPU) process.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    # Shim 2: a single-process gloo group for concat_all_gather / _batch_shuffle_ddp / DDP.
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmpdir}/pg", world_size=1, rank=0)
    import moco
    import moco.builder
    import moco.loader

    # Shim 3: main_moco.py at 4397a04 imports the package under Meta's internal name.
    for name in ("deeplearning", "deeplearning.cross_image_ssl"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["deeplearning.cross_image_ssl.moco"] = moco
    sys.modules["deeplearning.cross_image_ssl.moco.builder"] = moco.builder
    sys.modules["deeplearning.cross_image_ssl.moco.loader"] = moco.loader
    import main_moco

    # Shim 4: their accuracy() calls .view(-1) on a non-contiguous slice, which current PyTorch rejects
    # ("view size is not compatible with input tensor's size and stride"). Replace it with the same top-k count
    # (topk over the N x (1+K) logits, compare with the targets) using reshape; the work done is unchanged.
    main_moco.accuracy = topk_accuracy
    return moco, main_moco


def topk_accuracy(output, target, topk=(1,)):
    """Percentage of rows whose target is among the top-k logits, for each k (as their train loop reports)."""
    import torch

    with torch.no_grad():
        _, pred = output.topk(max(topk), 1, True, True)  # N x maxk
        hit = pred.eq(target.reshape(-1, 1))  # N x maxk
        return [hit[:, :k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)) for k in topk]


def reference_augmentation(moco_loader, aug_plus: bool, size: int):
    """The augmentation list of their main_moco.py (v1, or aug+ for v2), crop size as the only parameter."""
    import torchvision.transforms as transforms

    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if aug_plus:
        return [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([moco_loader.GaussianBlur([0.1, 2.0])], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    return [
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]


def run_reference(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torch.nn as nn
    import torchvision.datasets as datasets
    import torchvision.models as models
    import torchvision.transforms as transforms

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        moco, main_moco = setup_reference(spec["reference"], tmp)
        arch = spec["arch"].split(":")[-1]  # torchvision name (timm and torchvision ResNets are the same nets)
        mlp = spec["moco_version"] == "v2"
        # As main_worker: MoCo(models.__dict__[arch], dim, K, m, T, mlp); model.cuda(); DDP(model).
        model = moco.builder.MoCo(models.__dict__[arch], 128, spec["K"], 0.999, 0.2 if mlp else 0.07, mlp)
        model.cuda()
        peer = PEERS[spec.get("peer", "moco-fp32")]
        if peer["channels_last"]:  # the harness's addition (with bf16 autocast around their train loop)
            model = model.to(memory_format=torch.channels_last)
        if spec.get("ref_ddp", True):
            model = torch.nn.parallel.DistributedDataParallel(model)
        criterion = nn.CrossEntropyLoss().cuda(None)
        lr = 0.03 * spec["batch_size"] / 256
        optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
        args = argparse.Namespace(gpu=None, print_freq=10 ** 9, epochs=1, lr=lr, cos=mlp, schedule=[120, 160])

        flops = None
        if spec["mode"] == "step":
            g = torch.Generator().manual_seed(0)
            b, s = spec["batch_size"], spec["image_size"]
            batch = ([torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)],
                     torch.zeros(b, dtype=torch.long))
            loader = MemoryLoader(batch)
        else:
            train_dataset = datasets.ImageFolder(
                spec["data"], moco.loader.TwoCropsTransform(
                    transforms.Compose(reference_augmentation(moco.loader, mlp, spec["image_size"]))))
            loader = torch.utils.data.DataLoader(
                train_dataset, batch_size=spec["batch_size"], shuffle=True, num_workers=spec["workers"],
                pin_memory=True, sampler=None, drop_last=True)
        if peer["channels_last"]:
            loader = ChannelsLastLoader(loader)
        timed = TimedLoader(loader, spec["warmup"], spec["steps"])
        # Their train loop prints a progress line at i == 0: keep it off our stdout (which carries the JSON).
        with contextlib.redirect_stdout(sys.stderr), peer_autocast(peer["precision"]):
            main_moco.train(timed, model, criterion, optimizer, 0, args)
        seconds, cpu_seconds = timed.timed_seconds(), timed.cpu_seconds()
        del timed, loader
        torch.distributed.destroy_process_group()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "flops_per_step": flops, "loss": None}


# ------------------------------------------------------------------------------------------------ lightly
def build_lightly(spec: Dict[str, Any], precision: str, channels_last: bool):
    """MoCo v2 from lightly's building blocks, as its examples/pytorch/moco.py and benchmarks/imagenet/resnet50/
    mocov2.py assemble them: a torchvision ResNet with ``fc = Identity`` as backbone, ``MoCoProjectionHead``, a
    deep-copied key encoder with ``deactivate_requires_grad``, ``NTXentLoss(temperature=0.2, memory_bank_size=(K,
    128))`` (its ``MemoryBankModule`` queue), ``update_momentum`` between the query and key forwards and
    ``batch_shuffle`` / ``batch_unshuffle`` around the key encoder; SGD as the paper (lr 0.03 x batch / 256, momentum
    0.9, weight decay 1e-4). Returns ``step(x_q, x_k) -> detached loss``."""
    import copy

    import torch
    import torch.nn as nn
    import torchvision.models as models
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum

    if spec["moco_version"] != "v2":
        raise SystemExit("lightly peers: only --moco-version v2 (lightly's MoCo example is v2: MLP head, blur)")
    resnet = models.__dict__[spec["arch"].split(":")[-1]]()
    dim = resnet.fc.in_features
    resnet.fc = nn.Identity()
    backbone, head = resnet, MoCoProjectionHead(dim, dim, 128)
    backbone_k, head_k = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_k)
    deactivate_requires_grad(head_k)
    modules = nn.ModuleList([backbone, head, backbone_k, head_k])
    if channels_last:
        modules.to(memory_format=torch.channels_last)
    modules.train()
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(spec["K"], 128))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.03 * spec["batch_size"] / 256, momentum=0.9, weight_decay=1e-4)

    def step(x_q, x_k):
        with peer_autocast(precision):
            query = head(backbone(x_q).flatten(start_dim=1))
            update_momentum(backbone, backbone_k, m=0.999)
            update_momentum(head, head_k, m=0.999)
            with torch.no_grad():
                x_k, shuffle = batch_shuffle(x_k)
                key = batch_unshuffle(head_k(backbone_k(x_k).flatten(start_dim=1)), shuffle)
            loss = criterion(query, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def lightly_transform(image_size: int):
    """lightly's ``MoCoV2Transform`` at the crop size: the MoCo v2 recipe (random resized crop scale 0.2-1, colour
    jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2 p 0.5, flip, ImageNet normalisation)."""
    from lightly.transforms import MoCoV2Transform

    return MoCoV2Transform(input_size=image_size)


def run_lightly(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torchvision.datasets as datasets

    torch.manual_seed(0)
    peer = PEERS[spec["peer"]]
    step = build_lightly(spec, peer["precision"], peer["channels_last"])
    if spec["mode"] == "step":
        g = torch.Generator().manual_seed(0)
        b, s = spec["batch_size"], spec["image_size"]
        loader = MemoryLoader(([torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)],
                               torch.zeros(b, dtype=torch.long)))
    else:  # as their example: a torchvision data set with the multi-view transform, a plain DataLoader
        dataset = datasets.ImageFolder(spec["data"], transform=lightly_transform(spec["image_size"]))
        loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True, drop_last=True,
                                             num_workers=spec["workers"])
    if peer["channels_last"]:
        loader = ChannelsLastLoader(loader)
    timed = TimedLoader(loader, spec["warmup"], spec["steps"])
    losses = [step(*views) for views, _ in timed]
    seconds, cpu_seconds = timed.timed_seconds(), timed.cpu_seconds()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "flops_per_step": None,
            "loss": float(torch.stack(losses[-spec["steps"]:]).float().mean())}


# ------------------------------------------------------------------------------------------------ interleaved A/B
class Batches:
    """``next()`` over a DataLoader forever (a new pass when one ends), optionally with channels_last views."""

    def __init__(self, loader, channels_last: bool = False) -> None:
        self.loader, self.channels_last, self.it = loader, channels_last, iter(loader)

    def next(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            batch = next(self.it)
        if self.channels_last:
            import torch

            views, target = batch
            batch = [v.contiguous(memory_format=torch.channels_last) for v in views], target
        return batch


def run_ab(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Ours (each variant) and the peers in ONE process, single steps alternating round-robin.

    ``step-ab``: the step alone on fixed in-memory tensors. ``e2e-ab``: each step first takes its next batch from its
    own DataLoader (0 workers: JPEG decode and augmentation in this process, inside the timed step), so a step's
    wall and CPU time cover the whole pipeline. On a loaded machine, sequential runs see different load; alternating
    single steps gives every implementation the same conditions, so the per-round ratio is meaningful even when
    absolute img/s are not, and CPU time (this process does all the work) does not count time spent descheduled.
    """
    import statistics

    import torch
    import torch.nn as nn
    import torchvision.datasets as datasets
    import torchvision.models as models
    import torchvision.transforms as transforms

    from moco_zoo.pretrain.config import make_config
    from moco_zoo.pretrain.engine import Trainer

    e2e = spec["mode"] == "e2e-ab"
    g = torch.Generator().manual_seed(0)
    b, s = spec["batch_size"], spec["image_size"]
    images = [torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g)]
    steps: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = []
        for v in spec["variants"]:
            var = VARIANTS[v]
            cfg = make_config(
                data=str(Path(spec["data"]).parent), arch=spec["arch"], moco_version=spec["moco_version"],
                image_size=s, batch_size=b, moco_k=spec["K"], shuffle_bn=spec["shuffle_bn"],
                shuffle_groups=spec["shuffle_groups"], workers=0, device="cpu", precision=var["precision"],
                channels_last=var["channels_last"], compile=var["compile"], epochs=1000, knn_every=0,
                augment_backend=var.get("augment", "pil") if e2e else "pil",
                keep_host_memory=var.get("keep_host_memory", True),
                progress=False, plots=False, output_dir=f"{tmp}/{v}", seed=0)
            tr = Trainer(cfg)
            tr.model.train()
            trainers.append(tr)
            if e2e:
                tr.sampler.set_epoch(0)

                def ours_step(tr=tr, batches=Batches(tr.loader)):
                    views, _, index = batches.next()
                    return tr.train_step(views, index)
            else:
                def ours_step(tr=tr):
                    return tr.train_step(images, torch.arange(b))
            steps[f"ours {v}"] = ours_step
        peers = spec.get("peers") or []
        if any(PEERS[p]["impl"] == "reference" for p in peers):
            # After our Trainers are built (the gloo group below makes moco_zoo.device report "distributed" with
            # world size 1, which our code treats as a single process anyway).
            moco, main_moco = setup_reference(spec["reference"], tmp)
        for p in peers:
            peer = PEERS[p]
            cl = peer["channels_last"]
            fixed = ([x.contiguous(memory_format=torch.channels_last) for x in images] if cl else images,
                     torch.zeros(b, dtype=torch.long))
            if peer["impl"] == "lightly":
                lightly_step = build_lightly(spec, peer["precision"], cl)
                if e2e:
                    loader = torch.utils.data.DataLoader(
                        datasets.ImageFolder(spec["data"], transform=lightly_transform(s)), batch_size=b,
                        shuffle=True, drop_last=True, num_workers=0)

                    def peer_step(fn=lightly_step, batches=Batches(loader, cl)):
                        return fn(*batches.next()[0])
                else:
                    def peer_step(fn=lightly_step, views=fixed[0]):
                        return fn(*views)
                steps[p] = peer_step
                continue
            mlp = spec["moco_version"] == "v2"
            model = moco.builder.MoCo(models.__dict__[spec["arch"].split(":")[-1]], 128, spec["K"], 0.999,
                                      0.2 if mlp else 0.07, mlp)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            if spec.get("ref_ddp", True):
                model = torch.nn.parallel.DistributedDataParallel(model)
            criterion = nn.CrossEntropyLoss()
            optimizer = torch.optim.SGD(model.parameters(), 0.03 * b / 256, momentum=0.9, weight_decay=1e-4)
            args = argparse.Namespace(gpu=None, print_freq=10 ** 9)
            batches = None
            if e2e:
                batches = Batches(torch.utils.data.DataLoader(
                    datasets.ImageFolder(spec["data"], moco.loader.TwoCropsTransform(
                        transforms.Compose(reference_augmentation(moco.loader, mlp, s)))),
                    batch_size=b, shuffle=True, num_workers=0, pin_memory=True, drop_last=True), cl)

            def ref_step(model=model, criterion=criterion, optimizer=optimizer, args=args, batches=batches,
                         fixed=fixed, precision=peer["precision"]):
                batch = batches.next() if batches is not None else fixed
                with contextlib.redirect_stdout(sys.stderr), peer_autocast(precision):
                    main_moco.train(TimedLoader(MemoryLoader(batch), 0, 1), model, criterion, optimizer, 0, args)

            steps[p] = ref_step
        primary = next(iter(steps))
        flops = count_step_flops(steps[primary]) if spec.get("count_flops", True) and not e2e else None
        peak_flops = None
        if spec.get("ab_peak") and flops:
            # The machine's bf16 matmul rate measured in the same rounds (bench/machine_peak.py's 1024^3 bf16
            # matmul, repeated for about the FLOPs of one step): "% of peak" per round is then robust to other
            # jobs on the machine, which slow the matmul as much as the step.
            a = torch.randn(1024, 1024).to(torch.bfloat16)
            m = torch.randn(1024, 1024).to(torch.bfloat16)
            out_mm = torch.empty(1024, 1024, dtype=torch.bfloat16)
            reps = max(1, int(flops / (2 * 1024 ** 3)))
            peak_flops = reps * 2.0 * 1024 ** 3

            def matmul_peak(reps=reps):
                for _ in range(reps):
                    torch.matmul(a, m, out=out_mm)

            steps["bf16 matmul (peak)"] = matmul_peak
        first_s: Dict[str, float] = {}  # the first step of each (torch.compile: includes compiling)
        for i in range(spec["warmup"]):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                if i == 0:
                    first_s[k] = time.perf_counter() - t0
        walls: Dict[str, List[float]] = {k: [] for k in steps}
        cpus: Dict[str, List[float]] = {k: [] for k in steps}
        for _ in range(spec["steps"]):
            for k, fn in steps.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                walls[k].append(time.perf_counter() - t0)
                cpus[k].append(time.process_time() - c0)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    out: Dict[str, Any] = {"impls": {}, "primary": primary, "flops_per_step": flops}
    for k in steps:
        out["impls"][k] = {"img_s_median": b / statistics.median(walls[k]), "img_s_best": b / min(walls[k]),
                           "img_per_cpu_s": b / statistics.median(cpus[k]), "walls": walls[k], "cpus": cpus[k],
                           "first_step_s": first_s.get(k),
                           # how many times faster the primary (first) ours variant ran than this implementation:
                           # median over rounds of the two steps' wall (and CPU) time ratio in that round
                           "primary_ratio_median": statistics.median(
                               [t / o for o, t in zip(walls[primary], walls[k])]),
                           "primary_ratio_cpu_median": statistics.median(
                               [t / o for o, t in zip(cpus[primary], cpus[k])])}
        if flops:
            out["impls"][k]["gflops_median"] = flops / statistics.median(walls[k]) / 1e9
            # CPU-time rate: FLOPs over (CPU seconds / threads), i.e. the rate while this process actually ran on
            # its cores; on a machine shared with other jobs it estimates the unshared rate (wall time does not)
            out["impls"][k]["gflops_cpu_median"] = flops / (statistics.median(cpus[k]) / torch.get_num_threads()) / 1e9
            if peak_flops:  # this step's FLOP rate over the matmul's in the same round, median over rounds
                mm = walls["bf16 matmul (peak)"]
                f = peak_flops if k == "bf16 matmul (peak)" else flops
                out["impls"][k]["pct_round_peak_median"] = 100.0 * statistics.median(
                    [(f / w) / (peak_flops / p) for w, p in zip(walls[k], mm)])
                out["impls"][k]["peak_gflops_median"] = peak_flops / statistics.median(mm) / 1e9
    out["seconds"] = sum(sum(w) for w in walls.values())
    out["cpu_seconds"] = sum(sum(c) for c in cpus.values())
    return out


# ------------------------------------------------------------------------------------------------ worker process
def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    if spec["impl"] == "ab":
        res = run_ab(spec)
        res.update(peak_rss_mb=C.peak_rss_mb(), threads=torch.get_num_threads(), wall_s=time.perf_counter() - t0)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    runner = {"reference": run_reference, "lightly": run_lightly, "ours": run_ours}[spec["impl"]]
    with C.ChildMemorySampler() as workers_memory:
        res = runner(spec)
    res.update(workers_memory.result())
    res["img_s"] = spec["batch_size"] * spec["steps"] / res["seconds"]
    res["step_s"] = res["seconds"] / spec["steps"]
    # images per CPU-second of the main process: less sensitive to other processes than wall time (step mode)
    res["img_per_cpu_s"] = spec["batch_size"] * spec["steps"] / max(res["cpu_seconds"], 1e-9)
    res["peak_rss_mb"] = C.peak_rss_mb()
    res["workers_peak_rss_mb"] = C.children_peak_rss_mb()
    res["threads"] = torch.get_num_threads()
    res["wall_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(res), flush=True)
    return 0



def best(a: Optional[Dict[str, Any]], b: Dict[str, Any]) -> Dict[str, Any]:
    if a is None or "error" in a:
        return b
    if "error" in b:
        return a
    keep = dict(a if a["img_s"] >= b["img_s"] else b)
    keep["all_runs"] = a.get("all_runs", [{"workers": a.get("workers"), "img_s": a["img_s"]}]) + \
        [{"workers": b.get("workers"), "img_s": b["img_s"]}]
    return keep


# ------------------------------------------------------------------------------------------------ driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "pretrain_throughput")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None,
                        help="path to a facebookresearch/moco checkout at commit 4397a04 (adds reference runs)")
    parser.add_argument("--configs", default=None,
                        help=f"comma list of ARCH@SIZE[:bBATCH][:kK][:sSOURCE_PX] (default {DEFAULT_CONFIGS})")
    parser.add_argument("--modes", default="e2e,step",
                        help="e2e (JPEG decode + augment + step), step (in-memory tensors), step-ab (ours and the "
                             "peers in one process, alternating steps: the ratio to trust on a loaded machine), "
                             "e2e-ab (the same with each step taking its next batch from its own 0-worker "
                             "DataLoader: decode + augmentation inside the alternating steps)")
    parser.add_argument("--variants", default="fp32,bf16-cl", help=f"our variants: {','.join(VARIANTS)}")
    parser.add_argument("--peers", default=DEFAULT_PEERS,
                        help=f"alternatives to compare with: {','.join(PEERS)} (moco-* need --reference, lightly-* "
                             "need `pip install lightly`, the bench extra)")
    parser.add_argument("--ab-peak", action="store_true",
                        help="step-ab: also time bench/machine_peak.py's bf16 matmul in the alternating rounds and "
                             "report each step's FLOP rate as a share of it (robust to other jobs on the machine)")
    parser.add_argument("--moco-version", default="v2", choices=("v1", "v2"), help="head, T and augmentation")
    parser.add_argument("--shuffle-bn", default="split", choices=("split", "off"),
                        help="our single-process shuffle BN (the reference runs its DDP shuffle on one rank)")
    parser.add_argument("--shuffle-groups", type=int, default=8)
    parser.add_argument("--workers", default="2",
                        help="DataLoader workers; a comma list (e.g. 0,1,2) runs ours and the reference at each "
                             "count and reports each one's best, with the count it needed")
    parser.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, default=True,
                        help="ours (the engine's default); the reference's DataLoader has none")
    parser.add_argument("--ref-ddp", action=argparse.BooleanOptionalAction, default=True,
                        help="wrap the reference in DistributedDataParallel as its main_worker does")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (DataLoader start-up, allocator)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 3 at >=128 px, 8 below)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/reference this many times, keep best")
    parser.add_argument("--data-dir", default=C.default_data_dir(), help="where the JPEG ImageFolders go")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-run timeout in seconds")
    args = parser.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)

    if args.quick:
        args.configs = args.configs or QUICK_CONFIGS
        args.warmup, args.steps = 1, 2
    configs = [parse_config(s) for s in (args.configs or DEFAULT_CONFIGS).split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    modes = [m for m in args.modes.split(",") if m]
    try:
        worker_counts = [int(w) for w in str(args.workers).split(",") if w != ""]
    except ValueError:
        parser.error(f"--workers: expected integers separated by commas, got {args.workers!r}")
    C.set_threads(args.threads)
    info = C.machine_info()
    C.print_header("MoCo pretraining throughput (ours vs facebookresearch/moco@4397a04)", info)
    peak = bf16_peak_gflops()

    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
    if not args.reference and any(PEERS[p]["impl"] == "reference" for p in peers):
        print("  (no --reference: the facebookresearch/moco peers are skipped)", file=sys.stderr)
        peers = [p for p in peers if PEERS[p]["impl"] != "reference"]
    if any(PEERS[p]["impl"] == "lightly" for p in peers):
        try:
            import lightly  # noqa: F401
        except ImportError:
            print("  (lightly is not installed: pip install -e '.[bench]'; its peers are skipped)", file=sys.stderr)
            peers = [p for p in peers if PEERS[p]["impl"] != "lightly"]
    impls = [("ours", v) for v in variants] + [("peer", p) for p in peers]
    labels = [f"ours {n}" if k == "ours" else n for k, n in impls]
    primary = labels[0]

    rows: List[Dict[str, Any]] = []
    ab_rows: List[Dict[str, Any]] = []
    for cfg in configs:
        steps = args.steps or (3 if cfg["image_size"] >= 128 else 8)
        # One epoch must cover warm-up + timed steps (no DataLoader restart inside the timing); the engine's
        # Trainer needs the ImageFolder in step mode too (it builds its data set).
        n_train = max(4 * cfg["batch_size"] * (args.warmup + steps) // 3, 64)
        data = str(ensure_imagefolder(Path(args.data_dir), int(n_train / 0.75) + 16, cfg["source_size"]))
        for mode in modes:
            if mode in ("step-ab", "e2e-ab"):
                spec = dict(arch=cfg["arch"], image_size=cfg["image_size"], batch_size=cfg["batch_size"],
                            K=cfg["K"], moco_version=args.moco_version, data=data, warmup=max(1, args.warmup),
                            steps=max(steps, 3), threads=args.threads, shuffle_bn=args.shuffle_bn,
                            shuffle_groups=args.shuffle_groups, reference=args.reference, ref_ddp=args.ref_ddp,
                            variants=variants, peers=peers, impl="ab", mode=mode, ab_peak=args.ab_peak)
                r = C.run_worker(__file__, spec, args.timeout, tail_lines=15)
                if "error" in r:
                    print(f"  {mode} {cfg['name']}: {r['error']}", file=sys.stderr)
                    ab_rows.append({"config": cfg["name"], "mode": mode, "impl": "-", "error": r["error"]})
                    continue
                for k, v in r["impls"].items():
                    if k == "bf16 matmul (peak)":  # not a MoCo step: no step ratio, its own FLOP rate
                        v = dict(v, gflops_median=v.get("peak_gflops_median"), gflops_cpu_median=None,
                                 img_s_median=None, img_s_best=None, img_per_cpu_s=None,
                                 primary_ratio_median=None, primary_ratio_cpu_median=None)
                    gf = v.get("gflops_median")
                    ab_rows.append({"config": cfg["name"], "mode": mode, "impl": k, "img_s_median": v["img_s_median"],
                                    "img_s_best": v["img_s_best"], "img_per_cpu_s": v["img_per_cpu_s"],
                                    "gflops": gf, "pct_peak": 100.0 * gf / peak if gf and peak else None,
                                    "pct_peak_cpu": 100.0 * v["gflops_cpu_median"] / peak
                                    if v.get("gflops_cpu_median") and peak else None,
                                    "pct_round_peak": v.get("pct_round_peak_median"),
                                    "first_step_s": v.get("first_step_s"), "ratio_median": v.get("primary_ratio_median"),
                                    "ratio_cpu_median": v.get("primary_ratio_cpu_median"), "raw": v})
                continue
            base = dict(arch=cfg["arch"], image_size=cfg["image_size"], batch_size=cfg["batch_size"], K=cfg["K"],
                        moco_version=args.moco_version, aug=args.moco_version, mode=mode, data=data,
                        pin_memory=args.pin_memory,
                        persistent_workers=args.persistent_workers, warmup=args.warmup, steps=steps,
                        threads=args.threads, shuffle_bn=args.shuffle_bn, shuffle_groups=args.shuffle_groups,
                        reference=args.reference, ref_ddp=args.ref_ddp)
            overall: Dict[str, Optional[Dict[str, Any]]] = {lab: None for lab in labels}
            rounds: Dict[str, List[Optional[float]]] = {lab: [] for lab in labels}
            for _ in range(args.rounds):
                this_round: Dict[str, Optional[Dict[str, Any]]] = {lab: None for lab in labels}
                for w in (worker_counts if mode == "e2e" else worker_counts[:1]):
                    for (kind, name), lab in zip(impls, labels):
                        who = dict(impl="ours", variant=name) if kind == "ours" else \
                            dict(impl=PEERS[name]["impl"], peer=name, variant=name)
                        r = dict(C.run_worker(__file__, dict(base, workers=w, **who), args.timeout, tail_lines=15), workers=w)
                        overall[lab] = best(overall[lab], r)
                        this_round[lab] = best(this_round[lab], r)
                        print(f"  {lab:24s} {cfg['name']} {mode} workers {w}: " +
                              (r["error"] if "error" in r else f"{r['img_s']:.1f} img/s"), file=sys.stderr)
                for lab in labels:
                    r = this_round[lab]
                    rounds[lab].append(r["img_s"] if r and "error" not in r else None)
            flops = next((r.get("flops_per_step") for r in overall.values() if r and r.get("flops_per_step")), None)
            top = overall[primary]
            for lab in labels:
                r = overall[lab]
                row: Dict[str, Any] = {"config": cfg["name"], "mode": mode, "impl": lab, "result": r,
                                       "round_img_s": rounds[lab], "flops_per_step": flops}
                if not r or "error" in r:
                    row["error"] = (r or {}).get("error")
                    rows.append(row)
                    continue
                row.update(img_s=r["img_s"], workers=r.get("workers"), img_cpu_s=r.get("img_per_cpu_s"),
                           rss_mb=r["peak_rss_mb"], workers_rss_mb=r.get("workers_peak_rss_mb") or None,
                           workers_uss_mb=r.get("workers_uss_mb"), workers_pss_mb=r.get("workers_pss_mb"))
                if flops and mode == "step":
                    row["gflops"] = flops / r["step_s"] / 1e9
                    row["pct_peak"] = 100.0 * row["gflops"] / peak if peak else None
                if top and "error" not in top:
                    row["ratio"] = top["img_s"] / r["img_s"]
                    per_round = [o / t for o, t in zip(rounds[primary], rounds[lab]) if o and t]
                    row["ratio_rounds"] = statistics.median(per_round) if per_round else None
                rows.append(row)

    if rows:
        print(f"ratio = {primary} / this implementation: best run of each, and the median over rounds of each "
              "round's ratio (rounds alternate the implementations)\n")
        print(C.markdown_table(rows, ["config", "mode", "impl", "img_s", "workers", "ratio", "ratio_rounds",
                                      "rss_mb", "workers_rss_mb", "workers_uss_mb", "workers_pss_mb", "gflops",
                                      "pct_peak", "img_cpu_s"],
                               ["config", "mode", "implementation", "img/s (best)", "workers", "ours / this (best)",
                                "ours / this (median of rounds)", "peak RSS MiB (main)",
                                "peak RSS MiB (largest worker)", "peak USS MiB (largest worker)",
                                "peak PSS MiB (largest worker)", "step model GFLOP/s", "% bf16 matmul peak",
                                "img/CPU-s (main proc)"], digits=2))
    if ab_rows:
        print(f"\n### step-ab / e2e-ab: every implementation in one process, single steps alternating; ratio = "
              f"{primary} / this (median of per-round ratios)\n")
        print(C.markdown_table(ab_rows, ["config", "mode", "impl", "img_s_median", "img_s_best", "img_per_cpu_s",
                                         "gflops", "pct_peak", "pct_peak_cpu", "pct_round_peak", "ratio_median",
                                         "ratio_cpu_median",
                                         "first_step_s", "error"],
                               ["config", "mode", "implementation", "img/s (median step)", "img/s (best step)",
                                "img/CPU-s", "model GFLOP/s (median step)", "% bf16 matmul peak (wall)",
                                "% bf16 matmul peak (CPU time / threads)",
                                "% of the bf16 matmul measured in the same rounds",
                                "ours / this (wall)", "ours / this (CPU time)",
                                "first step s (incl. torch.compile)", "error"], digits=2))
    for r in rows:
        if r.get("error"):
            print(f"\n{r['config']} {r['mode']} {r['impl']}: {r['error']}")
    if peak is None:
        print("\n(% of peak needs bench/results/machine_peak.json from a full `python bench/machine_peak.py` run)")
    print(f"\nthreads {info['torch_threads']}, DataLoader workers {args.workers}, pin_memory {args.pin_memory}, "
          f"persistent_workers {args.persistent_workers}, shuffle BN (ours) {args.shuffle_bn}, "
          f"reference DDP {args.ref_ddp}, MoCo {args.moco_version}, rounds {args.rounds}\n")
    path = C.write_json("pretrain_throughput", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick,
        "bf16_peak_gflops": peak, "args": {k: v for k, v in vars(args).items() if k != "_worker"}, "rows": rows,
        "step_ab": ab_rows,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
