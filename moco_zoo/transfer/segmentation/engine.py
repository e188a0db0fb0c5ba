"""VOC semantic segmentation run: build, train (poly lr, DDP + SyncBN, atomic checkpoints, ``--resume``), evaluate
mIoU, write the run's outputs.

One :class:`SegmentationRun` is one (config, weights) pair. Under ``torchrun`` every rank runs the same code (each
rank trains on its shard of every global batch and evaluates its share of the validation images; the confusion
matrix is summed over ranks); rank 0 writes files. Outputs in ``out_dir``: ``config.json``, ``metrics.json``,
``results.md``, ``loss_curve.png``, ``samples/*.png`` (image | ground truth | prediction) and
``checkpoint_last.pth`` (kind ``"transfer"``, loadable with ``weights_only=True``).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from moco_zoo import device as devlib
from moco_zoo.checkpoint import KIND_TRANSFER, CheckpointError, atomic_torch_save, safe_torch_load
from moco_zoo.data.voc import VOC_IGNORE_INDEX

from . import report
from .config import dump, effective_batch
from .data import InfiniteShardedSampler, build_datasets, collate_stack
from .metrics import SegmentationMeter
from .model import build_segmenter

TASK = "voc_seg"
CHECKPOINT_NAME = "checkpoint_last.pth"
FORMAT_VERSION = 1


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not devlib.is_main_process(), dynamic_ncols=True, **kw)


def lr_factor(it: int, cfg: Dict[str, Any]) -> float:
    """Poly decay ``(1 - it / iters) ** power`` after an optional linear warmup from 0.1x."""
    f = (1.0 - it / float(cfg["iters"])) ** float(cfg["poly_power"])
    warm = int(cfg["warmup_iters"])
    if it < warm:
        f *= 0.1 + 0.9 * it / warm
    return f


def resolve_arch(specs: List[str], arch: Optional[str], allow_pickle: bool = False) -> str:
    """``arch`` if given, else the architecture of the first weights spec that reports one, else resnet50."""
    if arch:
        return arch
    from moco_zoo import load_backbone_state_dict

    for spec in specs:
        if spec not in ("random", "torchvision-supervised"):
            return load_backbone_state_dict(spec, None, allow_pickle=allow_pickle)[1]
    return "resnet50"


class SegmentationRun:
    """Fine-tune and evaluate an FCN segmenter from one backbone ``weights`` spec; outputs go to ``out_dir``."""

    def __init__(self, cfg: Dict[str, Any], weights: str, data_root: str, out_dir: str, *,
                 resume: Optional[str] = None, eval_only: bool = False):
        self.cfg = copy.deepcopy(cfg)
        self.weights = weights
        self.data_root = data_root
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.eval_only = eval_only
        self.history: List[Dict[str, float]] = []
        self.iteration = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.device = devlib.init_distributed_from_env(cfg["device"])
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        self.rank, self.world = devlib.rank(), devlib.world_size()
        self.total_batch, self.per_rank, self.lr = effective_batch(cfg, self.world)
        cfg["resolved"] = {"world_size": self.world, "global_batch": self.total_batch, "per_rank_batch": self.per_rank,
                           "lr": self.lr, "device": str(self.device)}
        self.amp_dtype = devlib.autocast_dtype(self.device, cfg["precision"])
        torch.manual_seed(int(cfg["seed"]) + self.rank)
        self.train_set, self.val_set = build_datasets(cfg, self.data_root)
        self.class_names = ["background"] + list(self.train_set.class_names)
        self.num_classes = len(self.class_names)
        model, arch = build_segmenter(
            self.weights, self.num_classes, cfg["arch"], output_stride=cfg["output_stride"],
            head_channels=cfg["head_channels"], head_convs=cfg["head_convs"], concat_input=cfg["concat_input"],
            dropout=cfg["dropout"], norm=cfg["norm"], seed=int(cfg["seed"]), allow_pickle=bool(cfg["allow_pickle"]),
            device=self.device)
        cfg["arch"] = arch
        self.model = model.to(self.device)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        head = list(self.model.head.parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        self.optimizer = torch.optim.SGD(
            [{"params": backbone, "lr_mult": 1.0},
             {"params": [p for p in head if p.requires_grad], "lr_mult": float(cfg["head_lr_mult"])}],
            lr=self.lr, momentum=float(cfg["momentum"]), weight_decay=float(cfg["weight_decay"]))

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> Dict[str, Any]:
        return {
            "kind": KIND_TRANSFER, "format_version": FORMAT_VERSION, "task": TASK, "weights": self.weights,
            "arch": self.cfg["arch"], "config": json_safe(self.cfg), "class_names": self.class_names,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "iter": self.iteration,
            "history": self.history, "rng": {"torch": torch.get_rng_state()},
        }

    def save_checkpoint(self) -> None:
        if devlib.is_main_process():
            atomic_torch_save(self.state(), self.ckpt_path)
        if devlib.is_distributed():
            dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        ckpt = safe_torch_load(path, allow_pickle=False)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND_TRANSFER or ckpt.get("task") != TASK:
            raise CheckpointError(f"{path}: not a {TASK} transfer checkpoint (kind {ckpt.get('kind')!r}, "
                                  f"task {ckpt.get('task')!r})" if isinstance(ckpt, dict) else
                                  f"{path}: not a {TASK} transfer checkpoint")
        if ckpt.get("class_names") != self.class_names:
            raise CheckpointError(f"{path}: trained for classes {ckpt.get('class_names')}, the data has "
                                  f"{self.class_names}")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: model does not fit this config ({str(e).splitlines()[0]})") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.iteration = int(ckpt["iter"])
        self.history = list(ckpt.get("history", []))
        if "rng" in ckpt and "torch" in ckpt["rng"]:
            torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt.get("weights") != self.weights and devlib.is_main_process():
            print(f"voc_seg: note: {path} was trained from weights {ckpt.get('weights')!r}, continuing it under "
                  f"{self.weights!r}", flush=True)

    def maybe_resume(self) -> None:
        if not self.resume:
            return
        path = self.ckpt_path if self.resume == "auto" else Path(self.resume)
        if self.resume == "auto" and not path.is_file():
            if devlib.is_main_process():
                print(f"voc_seg: no checkpoint at {path}; starting from iteration 0", flush=True)
            return
        self.load_checkpoint(path)
        if devlib.is_main_process():
            print(f"voc_seg: resumed {path} at iteration {self.iteration}/{self.cfg['iters']}", flush=True)

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        cfg = self.cfg
        iters = int(cfg["iters"])
        if self.iteration >= iters:
            return
        sampler = InfiniteShardedSampler(len(self.train_set), seed=int(cfg["seed"]), rank=self.rank,
                                         world_size=self.world, start=self.iteration * self.per_rank)
        workers = int(cfg["workers"])
        loader = DataLoader(self.train_set, batch_size=self.per_rank, sampler=sampler, num_workers=workers,
                            collate_fn=collate_stack, pin_memory=self.device.type == "cuda",
                            persistent_workers=workers > 0)
        net = self.ddp or self.model
        net.train()
        it_loader = iter(loader)
        bar = _progress(total=iters, initial=self.iteration, desc=f"voc_seg train [{self.weights}]")
        running, count, t0 = 0.0, 0, time.time()
        while self.iteration < iters:
            images, masks = next(it_loader)
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
            factor = lr_factor(self.iteration, cfg)
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr * factor * g.get("lr_mult", 1.0)
            with devlib.autocast(self.device, self.amp_dtype):
                logits = net(images)
            loss = F.cross_entropy(logits.float(), masks, ignore_index=VOC_IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"voc_seg: loss is {loss.item()} at iteration {self.iteration} "
                                         f"(weights {self.weights}); lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.iteration += 1
            running += float(loss.detach())
            count += 1
            bar.update(1)
            if self.iteration % int(cfg["log_period"]) == 0 or self.iteration == iters:
                mean = torch.tensor([running / count], dtype=torch.float64, device=self.device)
                if devlib.is_distributed():
                    dist.all_reduce(mean)
                    mean /= self.world
                entry = {"iter": self.iteration, "loss": float(mean.item()), "lr": self.lr * factor,
                         "sec_per_iter": (time.time() - t0) / count}
                self.history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{entry['lr']:.4f}")
                running, count, t0 = 0.0, 0, time.time()
            if self.iteration % int(cfg["checkpoint_period"]) == 0 or self.iteration == iters:
                self.save_checkpoint()
        bar.close()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        self.model.eval()
        meter = SegmentationMeter(self.num_classes, self.class_names, VOC_IGNORE_INDEX)
        indices = list(range(self.rank, len(self.val_set), self.world))
        self.samples = []
        for i in _progress(indices, desc=f"voc_seg eval [{self.weights}]"):
            image, mask = self.val_set[i]
            with devlib.autocast(self.device, self.amp_dtype):
                logits = self.model(image[None].to(self.device))
            pred = logits.float().argmax(1)[0].cpu()
            meter.update(pred, mask)
            if i < int(self.cfg["num_samples"]):
                self.samples.append((i, image, mask, pred))
        return meter.compute(self.device)

    # ------------------------------------------------------------------ outputs
    def write_outputs(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        result = {"task": TASK, "weights": self.weights, "arch": self.cfg["arch"], "iters": self.iteration,
                  "out_dir": str(self.out_dir), "metrics": {k: v for k, v in metrics.items() if k != "confusion"}}
        if not devlib.is_main_process():
            return result
        report.write_json(self.out_dir / "metrics.json", {**result, "confusion": metrics.get("confusion"),
                                                          "class_names": self.class_names})
        report.atomic_write_text(self.out_dir / "results.md", report.run_markdown(result, self.class_names))
        report.plot_losses(self.history, self.out_dir / "loss_curve.png", title=f"voc_seg {self.weights}")
        for i, image, mask, pred in self.samples:
            report.save_sample(image, mask, pred, self.out_dir / "samples" / f"{i:04d}.png")
        return result

    def run(self) -> Dict[str, Any]:
        self.setup()
        if devlib.is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            report.atomic_write_text(self.out_dir / "config.json", dump(json_safe(self.cfg)) + "\n")
        self.maybe_resume()
        if self.eval_only and self.iteration == 0:
            raise CheckpointError("--eval-only needs a trained checkpoint (--resume CKPT)")
        if not self.eval_only:
            self.train()
        metrics = self.evaluate()
        return self.write_outputs(metrics)


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
