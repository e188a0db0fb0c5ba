"""The torchvision detection engine: build, train (warmup + step lr, multi-scale, DDP + SyncBN, atomic checkpoints,
``--resume``), precise BN, test, and write the run's outputs.

One :class:`DetectionRun` is one (config, weights) pair; :func:`moco_zoo.transfer.engine.cli.main` runs several for a
comparison table. Under ``torchrun`` every rank executes the same code; rank 0 writes files.
"""
from __future__ import annotations

import bisect
import copy
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from moco_zoo import device as devlib
from moco_zoo.checkpoint import KIND_TRANSFER, CheckpointError, atomic_torch_save, safe_torch_load
from moco_zoo.precise_bn import recompute_bn_stats

from ..modeling import batchnorm_modules, build_detector, convert_sync_batchnorm
from . import report
from .config import dump, effective_batch
from .data import InfiniteSampler, build_datasets, collate, shard

CHECKPOINT_NAME = "checkpoint_last.pth"
FORMAT_VERSION = 1


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not devlib.is_main_process(), dynamic_ncols=True, **kw)


def lr_factor(it: int, cfg: Dict[str, Any]) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based): linear warmup, then x gamma at each step."""
    f = float(cfg["gamma"]) ** bisect.bisect_right(list(cfg["steps"]), it)
    warm = int(cfg["warmup_iters"])
    if it < warm:
        alpha = it / warm
        f *= float(cfg["warmup_factor"]) * (1 - alpha) + alpha
    return f


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> List[Dict[str, Any]]:
    norm_params, other = [], []
    seen = set()
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (norm_params if isinstance(module, norm_types) else other).append(p)
    groups = [{"params": other, "weight_decay": weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": weight_decay_norm})
    return groups


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _set_sizes(model: nn.Module, cfg: Dict[str, Any], train: bool) -> None:
    m = model.module if hasattr(model, "module") else model
    m.transform.min_size = tuple(int(s) for s in cfg["min_size_train"]) if train else (int(cfg["min_size_test"]),)


def _all_reduce_mean(values: Dict[str, float], device) -> Dict[str, float]:
    if not devlib.is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= devlib.world_size()
    return dict(zip(keys, t.tolist()))


class DetectionRun:
    """Fine-tune and test one detector from one backbone ``weights`` spec; outputs go to ``out_dir``."""

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
        self.device = devlib.init_distributed_from_env(None if cfg["device"] == "auto" else cfg["device"])
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        self.rank, self.world = devlib.rank(), devlib.world_size()
        self.total_batch, self.per_rank, self.lr = effective_batch(cfg, self.world)
        cfg["resolved"] = {"world_size": self.world, "global_batch": self.total_batch,
                           "batch_per_rank": self.per_rank, "lr": self.lr, "device": str(self.device)}
        self.train_set, self.test_set, self.class_names = build_datasets(cfg, self.data_root)
        model, info = build_detector(
            len(self.class_names), weights=self.weights, arch=cfg["arch"], detector=cfg["detector"],
            mask=bool(cfg["mask"]), norm=cfg["norm"], seed=int(cfg["seed"]), allow_pickle=bool(cfg["allow_pickle"]),
            min_size=cfg["min_size_train"], max_size=cfg["max_size"], anchor_sizes=cfg["anchor_sizes"],
            anchor_ratios=cfg["anchor_ratios"], rpn_pre_nms_top_n_train=cfg["rpn_pre_nms_top_n_train"],
            rpn_pre_nms_top_n_test=cfg["rpn_pre_nms_top_n_test"],
            rpn_post_nms_top_n_train=cfg["rpn_post_nms_top_n_train"],
            rpn_post_nms_top_n_test=cfg["rpn_post_nms_top_n_test"],
            rpn_batch_size_per_image=cfg["rpn_batch_size_per_image"],
            box_batch_size_per_image=cfg["box_batch_size_per_image"],
            box_detections_per_img=cfg["box_detections_per_img"], box_score_thresh=cfg["box_score_thresh"],
            box_nms_thresh=cfg["box_nms_thresh"], roi_resolution=cfg["roi_resolution"])
        self.info = info
        cfg["resolved"]["arch"] = info.arch
        model.to(self.device)
        if cfg["norm"] == "syncbn" and self.world > 1:
            model = convert_sync_batchnorm(model, self.device)
        self.model = model
        self.optimizer = torch.optim.SGD(param_groups(model, cfg["weight_decay"], cfg["weight_decay_norm"]),
                                         lr=self.lr, momentum=cfg["momentum"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, cfg))
        self.amp_dtype = devlib.autocast_dtype(self.device, cfg["precision"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if self.resume:
            path = self._resume_path()
            if self.resume == "auto" and not path.exists() and not self.eval_only:
                # `--resume` without a value means "continue if there is something to continue": a fresh start
                print(f"[{self.weights}] no checkpoint at {path}: starting from iteration 0", flush=True)
            else:
                self.load_checkpoint(path)
        if self.world > 1:
            kw = {"device_ids": [self.device]} if self.device.type == "cuda" else {}
            self.ddp = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=bool(cfg["find_unused_parameters"]), **kw)
        else:
            self.ddp = model

    def _resume_path(self) -> Path:
        if self.resume in ("auto", "last", True):
            return self.out_dir / CHECKPOINT_NAME
        return Path(self.resume)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> Dict[str, Any]:
        return {
            "kind": KIND_TRANSFER, "format_version": FORMAT_VERSION, "task": self.cfg["task"],
            "weights": self.weights, "arch": self.info.arch, "detector": self.cfg["detector"],
            "class_names": list(self.class_names), "config": self.cfg,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "iteration": self.iteration, "history": self.history,
        }

    def save_checkpoint(self) -> Optional[Path]:
        if not devlib.is_main_process():
            return None
        return atomic_torch_save(self.checkpoint_state(), self.out_dir / CHECKPOINT_NAME)

    def load_checkpoint(self, path: Path) -> None:
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND_TRANSFER:
            raise CheckpointError(f"{path}: not a transfer checkpoint (kind {ckpt.get('kind') if isinstance(ckpt, dict) else None!r})")
        for key in ("task", "detector"):
            if ckpt.get(key) != self.cfg[key]:
                raise CheckpointError(f"{path}: checkpoint is for {key} {ckpt.get(key)!r}, this run is {self.cfg[key]!r}")
        if list(ckpt.get("class_names", [])) != list(self.class_names):
            raise CheckpointError(f"{path}: checkpoint classes {ckpt.get('class_names')} differ from the dataset's")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: checkpoint does not fit this model ({str(e).splitlines()[0]})") from e
        if not self.eval_only:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.history = list(ckpt.get("history", []))
        self.resumed_from = str(path)

    # ------------------------------------------------------------------ training
    def _train_loader(self) -> DataLoader:
        sampler = InfiniteSampler(len(self.train_set), seed=int(self.cfg["seed"]), rank=self.rank,
                                  world_size=self.world, start=self.iteration * self.per_rank)
        workers = int(self.cfg["workers"])
        return DataLoader(self.train_set, batch_size=self.per_rank, sampler=sampler, collate_fn=collate,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, drop_last=True)

    def train(self) -> None:
        cfg = self.cfg
        total = int(cfg["iters"])
        if self.iteration >= total:
            return
        # Per-rank, per-start RNG: augmentation and scale choices differ across ranks and resumes stay reproducible.
        torch.manual_seed(int(cfg["seed"]) + 1000 * self.rank + 7919 * self.iteration)
        loader = iter(self._train_loader())
        self.ddp.train()
        _set_sizes(self.model, cfg, train=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        bar = _progress(total=total, initial=self.iteration, desc=f"train {self.weights}", unit="it")
        window: Dict[str, List[float]] = {}
        t0 = time.time()
        while self.iteration < total:
            images, targets = next(loader)
            images, targets = _to_device(images, targets, self.device)
            with devlib.autocast(self.device, self.amp_dtype):
                losses = self.ddp(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {self.iteration} "
                                         f"({ {k: float(v) for k, v in losses.items()} }); lower the lr")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.get("clip_grad_norm"):
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, float(cfg["clip_grad_norm"]))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.iteration += 1
            window.setdefault("loss", []).append(float(loss.detach()))
            for k, v in losses.items():
                window.setdefault(k, []).append(float(v.detach()))
            bar.update(1)
            if self.iteration % int(cfg["log_period"]) == 0 or self.iteration == total:
                mean = _all_reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, self.device)
                window = {}
                entry = {"iter": self.iteration, "lr": lr, **mean}
                self.history.append(entry)
                bar.set_postfix(loss=f"{mean['loss']:.3f}", lr=f"{lr:.2e}")
            if self.iteration % int(cfg["checkpoint_period"]) == 0 and self.iteration < total:
                self.save_checkpoint()
        bar.close()
        self.train_seconds = time.time() - t0
        self.save_checkpoint()

    @torch.no_grad()
    def precise_bn(self) -> None:
        """Recompute BN running statistics as true averages over ``precise_bn_iters`` training batches."""
        iters = int(self.cfg["precise_bn_iters"])
        bns = batchnorm_modules(self.model)
        if iters <= 0 or not bns or self.eval_only:
            return
        loader = iter(self._train_loader())
        _set_sizes(self.model, self.cfg, train=True)

        def forward(model: nn.Module, _: int) -> None:
            images, targets = _to_device(*next(loader), self.device)
            with devlib.autocast(self.device, self.amp_dtype):
                model(images, targets)

        for bn in recompute_bn_stats(self.model, _progress(range(iters), desc="precise BN", unit="it"), forward):
            if devlib.is_distributed():
                for buf in (bn.running_mean, bn.running_var):
                    dist.all_reduce(buf)
                    buf /= devlib.world_size()

    # ------------------------------------------------------------------ testing
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        cfg = self.cfg
        model = self.model
        model.eval()
        _set_sizes(model, cfg, train=False)
        part = shard(self.test_set, self.rank, self.world, cfg.get("max_test_images"))
        loader = DataLoader(part, batch_size=int(cfg["test_batch_size"]), collate_fn=collate,
                            num_workers=min(int(cfg["workers"]), 2))
        if cfg["task"] == "voc_det":
            from ..evaluation.voc import VOCEvaluator

            evaluator = VOCEvaluator(self.test_set, self.class_names, use_07_metric=bool(cfg["use_07_metric"]))
        else:
            from ..evaluation.coco import CocoEvaluator

            evaluator = CocoEvaluator(self.test_set.coco, ("bbox", "segm") if cfg["mask"] else ("bbox",),
                                      cat_ids=self.test_set.cat_ids)
        self.samples = []
        t0 = time.time()
        for images, targets in _progress(loader, desc="test", unit="batch"):
            with devlib.autocast(self.device, self.amp_dtype):
                outputs = model([im.to(self.device) for im in images])
            outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
                       for o in outputs]
            ids = [t["image_id"] for t in targets]
            if cfg["task"] == "voc_det":
                evaluator.update(ids, outputs)
            else:
                evaluator.update(dict(zip(ids, outputs)))
            if devlib.is_main_process() and len(self.samples) < int(cfg["num_vis"]):
                for im, o in zip(images, outputs):
                    if len(self.samples) < int(cfg["num_vis"]):
                        self.samples.append((im, o))
        metrics = evaluator.compute()
        self.test_seconds = time.time() - t0
        n = len(self.test_set) if not cfg.get("max_test_images") else min(len(self.test_set), int(cfg["max_test_images"]))
        metrics["num_test_images"] = n
        return metrics

    # ------------------------------------------------------------------ outputs
    def write_outputs(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        result = {
            "task": self.cfg["task"], "weights": self.weights, "arch": self.info.arch,
            "detector": self.cfg["detector"], "norm": self.cfg["norm"], "iters": self.iteration,
            "preset": self.cfg.get("preset"), "metrics": metrics,
            "train_seconds": round(getattr(self, "train_seconds", 0.0), 1),
            "test_seconds": round(getattr(self, "test_seconds", 0.0), 1),
            "out_dir": str(self.out_dir), "checkpoint": str(self.out_dir / CHECKPOINT_NAME),
            "final_loss": self.history[-1]["loss"] if self.history else None,
        }
        if not devlib.is_main_process():
            return result
        out = self.out_dir
        report.write_json(out / "metrics.json", result)
        report.write_json(out / "history.json", self.history)
        table = report.markdown_table(self.cfg["task"], [result])
        md = [f"# {self.cfg['task']}: {self.weights}", "",
              f"{self.info.arch} {self.cfg['detector'].upper()} {'Mask' if self.cfg['mask'] else 'Faster'} R-CNN, "
              f"norm {self.cfg['norm']}, preset {self.cfg.get('preset')}, {self.iteration} iterations, global batch "
              f"{self.total_batch}, lr {self.lr:g}, {self.world} process(es), {metrics.get('num_test_images')} test "
              f"images.", "", table]
        if self.cfg["task"] == "voc_det" and isinstance(metrics.get("per_class"), dict):
            md += ["", "| class | AP50 |", "|---|---|"]
            for name, v in metrics["per_class"].items():
                val = v.get("AP50") if isinstance(v, dict) else v
                md.append(f"| {name} | {'-' if val is None else f'{float(val):.1f}'} |")
        report.atomic_write_text(out / "results.md", "\n".join(md) + "\n")
        report.plot_losses(self.history, out / "loss_curve.png", title=f"{self.cfg['task']} {self.weights}")
        for i, (im, o) in enumerate(self.samples):
            report.save_image(report.draw_prediction(im, o, self.class_names, float(self.cfg["vis_score_thresh"])),
                              out / "predictions" / f"sample_{i:02d}.png")
        return result

    def run(self) -> Dict[str, Any]:
        self.setup()
        if devlib.is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            report.atomic_write_text(self.out_dir / "config.json",
                                     dump({**self.cfg, "weights": self.weights, "data_root": str(self.data_root)}))
        if not self.eval_only:
            self.train()
            self.precise_bn()
        metrics = self.evaluate()
        return self.write_outputs(metrics)
