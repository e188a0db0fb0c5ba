"""MoCo pretraining loop: schedules, DDP, checkpoints with exact resumption, logging, kNN monitor, plots.

v1/v2 train :class:`~moco_zoo.pretrain.builder.MoCo`; ``moco_version: v3`` trains
:class:`~moco_zoo.pretrain.builder_v3.MoCoV3` (both crops through both encoders, LARS / AdamW, BN synchronised over
ranks, no dictionary) through the same loop, checkpoints and resume.

Exact resumption: a checkpoint holds the MoCo module (both encoders, queue / memory bank), optimizer, scheduler,
epoch, step in epoch, global step, the RNG states of every rank (torch, CUDA, numpy, python) and the full config.
Batches are reproducible from (seed, epoch, step) alone (see :mod:`moco_zoo.pretrain.data`), so a run killed at any step and
resumed with ``--resume auto`` ends with the same weights, bit for bit on CPU, as an uninterrupted run.

DDP: gradients are all-reduced by DistributedDataParallel; keys (and memory-bank updates) are all-gathered so every
rank holds the same dictionary; the query encoder's BN buffers are broadcast from rank 0 before every step (like
DDP's ``broadcast_buffers``, but without also broadcasting the queue), so the key encoders stay identical too.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from moco_zoo.checkpoint import (
    KIND_PRETRAIN,
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    checkpoint_kind,
    remove_stale_temporaries,
    safe_torch_load,
)
from moco_zoo.data.verify import find_bad_images, report_bad_images
from moco_zoo.device import (
    autocast,
    autocast_dtype,
    init_distributed_from_env,
    is_distributed,
    is_main_process,
    is_main_process_env,
    keep_host_memory_mapped,
    rank,
    world_size,
)
from moco_zoo.logs import TensorBoardScalars
from moco_zoo.plots import new_figure, save_png
from moco_zoo.runlock import RunLock

from .augment import pretrain_views
from .batched_augment import BatchedPhotometric, GeometricViews, PhotometricCollate
from .builder import MoCo
from .builder_v3 import MoCoV3, convert_sync_bn
from .config import MocoConfig
from .data import (
    CorruptImageError,
    ImageFolderDataset,
    ResumableBatchSampler,
    make_loader,
    resolve_data_root,
    resolve_split,
)
from .knn import KNNMonitor
from .optim import make_v3_optimizer
from .shuffle_bn import resolve_shuffle_mode

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint_(\d+)\.pth$")


# ---------------------------------------------------------------------------------------------------- schedules
def lr_factor(step: int, steps_per_epoch: int, cfg: MocoConfig) -> float:
    """Multiplier of the initial lr at global ``step`` (per step; warmup, then cosine or step decay)."""
    epoch_f = step / steps_per_epoch
    if cfg.lr_schedule == "warmup_cosine":  # moco-v3: linear from 0, then half-cycle cosine over the other epochs
        if epoch_f < cfg.warmup_epochs:
            return epoch_f / cfg.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * (epoch_f - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)))
    if cfg.warmup_epochs > 0 and epoch_f < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch_f / cfg.epochs))
    # step: milestones given for a 200-epoch run, scaled to cfg.epochs (120,160 of 200 -> 60%, 80%)
    milestones = [m * cfg.epochs / 200.0 for m in cfg.lr_steps]
    return 0.1 ** sum(int(epoch_f >= m) for m in milestones)


def momentum_at(step: int, total_steps: int, cfg: MocoConfig) -> float:
    """Key-encoder momentum: fixed m, or cosine from m to 1 over training (as in BYOL / MoCo v3)."""
    if cfg.momentum_schedule == "fixed":
        return cfg.momentum
    return 1.0 - (1.0 - cfg.momentum) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0


def scaled_lr(cfg: MocoConfig) -> float:
    """lr actually used: base lr x global batch / 256 (linear scaling rule) unless lr_scaling=none."""
    return cfg.lr * cfg.batch_size / 256.0 if cfg.lr_scaling == "linear" else cfg.lr


def fused_sgd_supported(params: List[torch.Tensor]) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` can run on these parameters (floating point, on a device type with
    fused optimizer kernels: CUDA, and CPU in recent PyTorch)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def make_sgd(params: List[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay; the fused kernel (one pass over each parameter) when supported, else
    PyTorch's default implementation. Same update rule, same state (``momentum_buffer``) either way."""
    fused = fused_sgd_supported(params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


# ---------------------------------------------------------------------------------------------------- RNG state
def get_rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states as weights_only-loadable values (tensors, ints, lists)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    v, internal, gauss = random.getstate()
    state["python"] = [v, list(internal), gauss]
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(cfg: MocoConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def list_checkpoints(directory: Path) -> List[Tuple[int, Path]]:
    """(global step, path) of ``checkpoint_<step>.pth`` files, newest first (temp files of atomic writes ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def _check_pretrain_checkpoint(ckpt: Any, path: Path) -> Dict[str, Any]:
    if checkpoint_kind(ckpt) != KIND_PRETRAIN:
        raise CheckpointError(f"{path}: not a MoCo pretraining checkpoint (kind {checkpoint_kind(ckpt) or 'missing'!r}"
                              f", expected {KIND_PRETRAIN!r})")
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "rng")
               if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: incomplete pretraining checkpoint, missing {missing}")
    return ckpt


def load_checkpoint_file(path: Path) -> Dict[str, Any]:
    """``safe_torch_load`` + kind/completeness check; every failure is a :class:`CheckpointError` naming the file."""
    try:
        ckpt = safe_torch_load(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises IndexError/KeyError/... for garbage files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    return _check_pretrain_checkpoint(ckpt, path)


def find_resume_checkpoint(cfg: MocoConfig) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``--resume auto``: the newest checkpoint that loads and is complete; corrupt ones are skipped with a warning.
    ``--resume PATH``: that file (errors are fatal)."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        return path, load_checkpoint_file(path)
    for _, path in list_checkpoints(checkpoint_dir(cfg)):
        try:
            return path, load_checkpoint_file(path)
        except CheckpointError as e:
            warnings.warn(f"--resume auto: skipping unusable checkpoint {path}: {e}", stacklevel=2)
    return None


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------- logging
class MetricsLog:
    """Append-only JSONL metrics + TensorBoard events in ``tb/`` (rank 0); on resume, records after the resumed step
    are dropped from both."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.records: List[Dict[str, Any]] = []
        self.tensorboard: Optional[TensorBoardScalars] = None

    def load(self, upto_step: int) -> None:
        if not self.enabled:
            return
        if self.tensorboard is None:
            self.tensorboard = TensorBoardScalars(self.path.parent / "tb", purge_step=upto_step + 1 if upto_step else None)
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("global_step", 0) <= upto_step:
                kept.append(rec)
        self.records = kept
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tensorboard is not None:
            scalars = {k: v for k, v in rec.items() if k not in ("epoch", "step", "global_step", "time", "type")}
            self.tensorboard.write("train" if rec.get("type") == "step" else "eval", scalars, rec["global_step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def write_plots(records: List[Dict[str, Any]], out_dir: Path) -> List[Path]:
    """loss.png (training loss vs step) and knn.png (kNN top-1 vs epoch), written atomically."""
    written = []
    steps = [(r["global_step"], r["loss"]) for r in records if r.get("type") == "step"]
    knn = [(r["epoch"], r["knn_top1"]) for r in records if r.get("type") == "epoch" and "knn_top1" in r]
    for name, pts, xlabel, ylabel in (("loss.png", steps, "step", "InfoNCE loss"),
                                      ("knn.png", knn, "epoch", "kNN top-1 (%)")):
        if not pts:
            continue
        fig, ax = new_figure(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        written.append(save_png(fig, out_dir / name))
    return written


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, data, optimizer and bookkeeping of one pretraining run. ``fit()`` runs it."""

    def __init__(self, cfg: MocoConfig) -> None:
        self.cfg = cfg.validate()
        if cfg.keep_host_memory:
            keep_host_memory_mapped()  # before the DataLoader forks its workers, which inherit it
        self.device = init_distributed_from_env(cfg.device)
        self.rank, self.world = rank(), world_size()
        self.main = is_main_process()
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by the world size "
                             f"{self.world}")
        self.local_batch = cfg.batch_size // self.world
        self.amp_dtype = autocast_dtype(self.device, cfg.precision)
        self.out_dir = Path(cfg.output_dir)

        # data
        self.data_root = resolve_data_root(cfg.data, cfg.synthetic_images, cfg.synthetic_size, seed=0) \
            if self.main or cfg.data != "synthetic" else None
        if cfg.data == "synthetic" and is_distributed():
            dist.barrier()  # rank 0 generated the data; the others now find it in the cache
            if self.data_root is None:
                self.data_root = resolve_data_root(cfg.data, cfg.synthetic_images, cfg.synthetic_size, seed=0)
        assert self.data_root is not None
        self.photometric: Optional[BatchedPhotometric] = None
        if cfg.augment_backend == "batched":  # the loader yields (uint8 views, parameters); colour ops run in _views
            transform: Callable = GeometricViews(cfg.aug, cfg.image_size, scale=(cfg.crop_min, 1.0))
            self.photometric = BatchedPhotometric(cfg.aug)
        else:
            transform = pretrain_views(cfg.aug, cfg.image_size, cfg.crop_min)
        self.dataset = ImageFolderDataset(resolve_split(self.data_root, "train"), transform)
        if cfg.verify_images or cfg.skip_bad_images:
            self._drop_bad_images()
        self.sampler = ResumableBatchSampler(len(self.dataset), self.local_batch, rank=self.rank,
                                             world_size=self.world, seed=cfg.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        collate = None
        if self.photometric is not None and self.device.type == "cpu" and cfg.workers > 0:
            # CPU training with loader workers: the batched colour ops run in the workers (one thread each, in
            # parallel with the step) rather than between steps in this process; the output is the same
            collate = PhotometricCollate(self.photometric, cfg.channels_last)
            self.photometric = None
        self.loader = make_loader(self.dataset, self.sampler, workers=cfg.workers, pin_memory=cfg.pin_memory,
                                  persistent_workers=cfg.persistent_workers, seed=cfg.seed, collate_fn=collate)

        # model: identical initialisation on every rank
        seed_everything(cfg.seed)
        self.shuffle_mode = resolve_shuffle_mode(cfg.shuffle_bn, self.world > 1, cfg.mechanism)
        self.v3 = cfg.moco_version == "v3"
        self.model: nn.Module
        if self.v3:  # MoCo v3: no dictionary; BN synchronised over ranks (the paper's SyncBN)
            model = MoCoV3.from_arch(cfg.arch, cfg.dim, cfg.mlp_dim, cfg.temperature, cfg.image_size,
                                     cfg.stop_grad_patch)
            self.model = (convert_sync_bn(model, self.device) if self.world > 1 else model).to(self.device)
        else:
            self.model = MoCo(cfg.arch, cfg.dim, cfg.moco_k, cfg.momentum, cfg.temperature, cfg.mlp,
                              cfg.mechanism, self.shuffle_mode, cfg.shuffle_groups, bank_size=len(self.dataset),
                              bank_momentum=cfg.bank_momentum).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            for name in ("encoder_q", "encoder_k", "base_encoder", "momentum_encoder"):
                if hasattr(self.model, name):
                    getattr(self.model, name).compile()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.lr = scaled_lr(cfg)
        if cfg.optimizer == "sgd":
            self.optimizer = make_sgd(params, self.lr, cfg.sgd_momentum, cfg.weight_decay)
        else:  # v3: LARS (ResNet) / AdamW (ViT)
            self.optimizer = make_v3_optimizer(self.model, cfg.optimizer, self.lr, cfg.weight_decay,
                                               cfg.sgd_momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps_per_epoch, cfg))
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            # The queue / memory bank are identical on every rank by construction and BN buffers are broadcast by
            # _broadcast_bn_buffers, so DDP must not broadcast all buffers (the queue!) at every forward.

            sync_kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(nn.parallel.DistributedDataParallel).parameters else
                       {"broadcast_buffers": False})
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None, **sync_kw)
        self.criterion = nn.CrossEntropyLoss()
        seed_everything(cfg.seed + 1000 * self.rank + 1)  # per-rank streams (shuffle perms, bank negatives)

        # bookkeeping
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.log = MetricsLog(self.out_dir / "metrics.jsonl", self.main)
        self.knn = self._build_knn() if self.main else None
        self.resumed_from: Optional[Path] = None

    # ----------------------------------------------------------------------------------------- setup helpers
    def _drop_bad_images(self) -> None:
        """Decode every training image first: list all bad files at once, or skip them (``skip_bad_images``)."""

        ds = self.dataset
        bad = find_bad_images([p for p, _ in ds.samples], progress=self.main and self.cfg.progress)
        if not bad:
            return
        if not self.cfg.skip_bad_images:
            raise CorruptImageError(report_bad_images(bad, len(ds.samples)) + "\nremove or replace them, or set "
                                    "skip_bad_images=true")
        skip = {p for p, _ in bad}
        ds.samples = [s for s in ds.samples if s[0] not in skip]
        ds.targets = [t for _, t in ds.samples]
        logger.warning("skipping %d of %d training images that do not decode (skip_bad_images): %s", len(bad),
                       len(bad) + len(ds.samples), ", ".join(p for p, _ in bad[:5]) + (" ..." if len(bad) > 5 else ""))

    def _build_knn(self):
        cfg = self.cfg
        if cfg.knn_every <= 0:
            return None
        root = Path(cfg.knn_data) if cfg.knn_data else self.data_root
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            if cfg.knn_data:
                raise FileNotFoundError(f"knn_data {root}: expected train/ and val/ sub-directories")
            warnings.warn(f"kNN monitor disabled: {root} has no train/ and val/ sub-directories (set knn_data=ROOT)")
            return None

        return KNNMonitor(root, cfg.image_size, self.device, k=cfg.knn_k, t=cfg.knn_t,
                          batch_size=max(64, self.local_batch), workers=cfg.workers, max_train=cfg.knn_max_train,
                          amp_dtype=self.amp_dtype, channels_last=cfg.channels_last)

    def state(self) -> Dict[str, Any]:
        """The checkpoint dict (contract: kind "moco-pretrain", weights_only-loadable)."""
        rng = get_rng_state(self.device)
        if is_distributed():
            all_rng: List[Any] = [None] * self.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        return {
            "kind": KIND_PRETRAIN,
            "format_version": FORMAT_VERSION,
            "arch": self.cfg.arch,
            "moco_version": self.cfg.moco_version,
            "mechanism": self.cfg.mechanism,
            "config": self.cfg.to_dict(),
            "state_dict": {k: v.detach().clone() if self.device.type != "cpu" else v
                           for k, v in strip_module_prefix(self.model.state_dict()).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "sampler": {"epoch": self.epoch, "start_step": self.step_in_epoch, "seed": self.cfg.seed,
                        "steps_per_epoch": self.steps_per_epoch, "world_size": self.world},
            "rng": {"per_rank": all_rng, "world_size": self.world},
            "metrics": {"last": self.log.records[-1] if self.log.records else {}},
        }

    def save_checkpoint(self) -> Optional[Path]:
        state = self.state()  # collective (RNG gather): every rank calls it
        if not self.main:
            return None
        d = checkpoint_dir(self.cfg)
        path = atomic_torch_save(state, d / f"checkpoint_{self.global_step:09d}.pth")
        for _, old in list_checkpoints(d)[max(1, self.cfg.keep_checkpoints):]:
            with _ignore_missing():
                old.unlink()
        return path

    def resume(self) -> bool:
        found = find_resume_checkpoint(self.cfg)
        if is_distributed():  # all ranks must agree on the file: rank 0 decides
            box = [str(found[0]) if found else ""]
            dist.broadcast_object_list(box, src=0)
            if box[0] and (found is None or str(found[0]) != box[0]):
                path = Path(box[0])
                found = (path, load_checkpoint_file(path))
            elif not box[0]:
                found = None
        if found is None:
            if self.cfg.resume and self.main:
                logger.info("--resume %s: no checkpoint in %s, starting fresh", self.cfg.resume,
                            checkpoint_dir(self.cfg))
            return False
        path, ckpt = found
        for key in ("arch", "mechanism"):
            if ckpt.get(key) != getattr(self.cfg, key):
                raise CheckpointError(f"{path}: checkpoint has {key}={ckpt.get(key)!r} but this run uses "
                                      f"{getattr(self.cfg, key)!r}")
        self.model.load_state_dict(strip_module_prefix(ckpt["state_dict"]))
        impl = {k: self.optimizer.param_groups[0].get(k) for k in ("fused", "foreach")}
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the kernel choice is this machine's, not the checkpoint's
            group.update(impl)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        per_rank = ckpt["rng"]["per_rank"]
        if len(per_rank) == self.world:
            set_rng_state(per_rank[self.rank], self.device)
        else:
            warnings.warn(f"{path}: saved with {len(per_rank)} ranks, resuming with {self.world}: RNG streams "
                          f"re-seeded (the run continues but is not bit-identical)")
            seed_everything(self.cfg.seed + 1000 * self.rank + 1 + self.global_step)
        self.log.load(self.global_step)
        self.resumed_from = path
        if self.main:
            logger.info("resumed from %s at global step %d (epoch %d, step %d)", path, self.global_step, self.epoch,
                        self.step_in_epoch)
        return True

    # ----------------------------------------------------------------------------------------- training
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _views(self, images: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """A loader batch -> [queries, keys] on the device (``augment_backend: batched``: after the batched colour ops)."""
        if self.photometric is not None:
            with torch.no_grad():
                return self.photometric(images, self.device, self.cfg.channels_last)
        return [self._to_device(images[0]), self._to_device(images[1])]

    @torch.no_grad()
    def _broadcast_bn_buffers(self) -> None:
        """Rank 0's BN running statistics of the query encoder to every rank (one coalesced broadcast per dtype)."""
        bufs = [b for b in self.model.encoder_q.buffers()]
        for dtype in sorted({b.dtype for b in bufs}, key=str):  # same order on every rank (set order is not)
            group = [b for b in bufs if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            torch._foreach_copy_(group, [f.view_as(b) for f, b in zip(flat.split([b.numel() for b in group]), group)])

    def train_step(self, images: List[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the (detached) loss without synchronising with the device."""
        if self.v3:
            return self._train_step_v3(images)
        if self.world > 1:
            self._broadcast_bn_buffers()
        self.model.m = momentum_at(self.global_step, self.total_steps, self.cfg)
        im_q, im_k = self._views(images)
        with autocast(self.device, self.amp_dtype):
            out = self.ddp_model(im_q, im_k, index.to(self.device, non_blocking=True))
        loss = self.criterion(out.logits.float(), out.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.model.update_dictionary(out)  # after backward: the queue is never cloned
        return loss.detach()

    def _train_step_v3(self, images: List[torch.Tensor]) -> torch.Tensor:
        """MoCo v3: both crops through both encoders, symmetric loss, momentum m of this step (moco-v3 order:
        momentum update inside the forward, then backward and the optimizer step)."""
        m = momentum_at(self.global_step, self.total_steps, self.cfg)
        x1, x2 = self._views(images)
        with autocast(self.device, self.amp_dtype):
            loss = self.ddp_model(x1, x2, m)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def knn_eval(self) -> Dict[str, float]:
        if self.knn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            return self.knn.evaluate(self.model.features)
        finally:
            self.model.train(was_training)

    PREFILL_EPOCH = -1  # sampler "epoch" of the prefill pass: its own sample order and augmentation seeds

    def prefill_dictionary(self) -> int:
        """Before step 0 (``dict_init=prefill``): fill the queue with K real keys (moco: ceil(K / global batch)
        batches, more than one pass over a data set smaller than K) or write every visited sample's feature into the
        memory bank (one pass), in train mode with shuffled BN as in a step. No optimizer step; deterministic, so a
        run killed during the prefill restarts it identically. See :meth:`MoCo.prefill_dictionary` for why."""
        cfg = self.cfg
        if cfg.dict_init != "prefill" or cfg.mechanism == "end2end" or self.v3:
            return 0
        gb = self.local_batch * self.world
        batches = -(-cfg.moco_k // gb) if cfg.mechanism == "moco" else self.steps_per_epoch
        bar = None
        if self.main and cfg.progress:
            bar = tqdm(total=batches, desc="prefill dictionary", dynamic_ncols=True, leave=False, file=sys.stderr)
        self.model.train()
        stored, done, rnd = 0, 0, 0
        while done < batches:
            self.sampler.set_epoch(self.PREFILL_EPOCH - rnd)  # another pass if K exceeds the data set
            for images, _, index in self.loader:
                keys = self._views(images)[1]
                with torch.no_grad(), autocast(self.device, self.amp_dtype):
                    stored += self.model.prefill_dictionary(keys,
                                                            index.to(self.device, non_blocking=True))
                done += 1
                if bar is not None:
                    bar.update(1)
                if done >= batches:
                    break
            rnd += 1
        if bar is not None:
            bar.close()
        if self.main:
            logger.info("prefilled the %s dictionary with %d keys (%d batches)", cfg.mechanism, stored, done)
        return stored

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        if self.resumed_from is None:
            self.log.load(0)  # a fresh run starts a fresh metrics log
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
        if self.resumed_from is None and self.global_step == 0:
            self.prefill_dictionary()
        self.model.train()
        done = cfg.max_steps and self.global_step >= cfg.max_steps
        last_knn: Dict[str, float] = {}
        while self.epoch < cfg.epochs and not done:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            bar = None
            if self.main and cfg.progress:
                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                           dynamic_ncols=True, leave=False, file=sys.stderr)
            t0, n0, loss_sum, loss_n = time.perf_counter(), 0, None, 0
            for images, _, index in self.loader:
                loss = self.train_step(images, index)
                loss_sum = loss if loss_sum is None else loss_sum + loss
                loss_n += 1
                n0 += self.local_batch * self.world
                self.global_step += 1
                self.step_in_epoch += 1
                if bar is not None:
                    bar.update(1)
                if self.global_step % max(1, cfg.log_every_steps) == 0 or self.step_in_epoch == self.steps_per_epoch:
                    dt = time.perf_counter() - t0
                    rec = {"type": "step", "epoch": self.epoch, "step": self.step_in_epoch,
                           "global_step": self.global_step, "loss": float(loss_sum) / loss_n,
                           "lr": self.optimizer.param_groups[0]["lr"], "m": self.model.m,
                           "img_per_s": n0 / max(dt, 1e-9), "time": time.time()}
                    self.log.write(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.4g}",
                                        img_s=f"{rec['img_per_s']:.1f}")
                    t0, n0, loss_sum, loss_n = time.perf_counter(), 0, None, 0
                end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                done = bool(cfg.max_steps and self.global_step >= cfg.max_steps)
                if not end_of_epoch and (done or (cfg.save_every_steps and
                                                  self.global_step % cfg.save_every_steps == 0)):
                    self.save_checkpoint()
                if done:
                    break
            if bar is not None:
                bar.close()
            if self.step_in_epoch == self.steps_per_epoch:  # epoch finished
                rec: Dict[str, Any] = {"type": "epoch", "epoch": self.epoch, "global_step": self.global_step}
                if self.knn is not None and (self.epoch + 1) % max(1, cfg.knn_every) == 0:
                    last_knn = self.knn_eval()
                    rec.update(last_knn)
                if is_distributed():
                    dist.barrier()
                self.log.write(rec)
                if self.main:
                    msg = f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items()
                                                             if k.startswith("knn"))
                    logger.info(msg)
                self.epoch += 1
                self.step_in_epoch = 0
                self.save_checkpoint()
                if self.main and cfg.plots:
                    write_plots(self.log.records, self.out_dir)
        self.log.close()
        final = list_checkpoints(checkpoint_dir(cfg))
        return {"global_step": self.global_step, "epoch": self.epoch, "knn": last_knn,
                "checkpoint": str(final[0][1]) if final else None, "resumed_from": str(self.resumed_from or "")}


class _ignore_missing:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        return exc_type is not None and issubclass(exc_type, FileNotFoundError)


def train(cfg: MocoConfig) -> Dict[str, Any]:
    """Run (or resume) a pretraining job; returns a summary (final global step, last kNN metrics, checkpoint)."""
    # one job per output directory; temporaries of writes killed in an earlier job are removed before anything reads
    lock = RunLock(cfg.output_dir).acquire() if is_main_process_env() else None
    try:
        if lock is not None:
            for p in remove_stale_temporaries(checkpoint_dir(cfg)):
                logger.warning("removed %s, left by a checkpoint write that was killed", p)
        trainer = Trainer(cfg)
        try:
            return trainer.fit()
        finally:
            if is_distributed():
                dist.barrier()
    finally:
        if lock is not None:
            lock.release()
