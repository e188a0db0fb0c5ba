"""One transfer run: (resolved config, weights spec) -> trained, tested model and the run's outputs.

Outputs in ``out_dir`` (rank 0 writes): ``config.yaml`` (the resolved config), ``metrics.json``, ``history.json``,
``metrics.jsonl`` and TensorBoard events under ``tb/``, ``results.md``, ``loss_curve.png``, ``eval_curve.png``
(with ``eval_period``), sample predictions under ``predictions/`` and ``checkpoint_last.pth`` (kind
``"transfer"``, loadable with ``weights_only=True``). Under ``torchrun`` every rank executes the same code.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moco_zoo import device as devlib
from moco_zoo.checkpoint import KIND_TRANSFER, CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from moco_zoo.pretrain.engine import fused_sgd_supported

from .. import config as cfglib
from .. import report
from ..data import InfiniteSampler, SeededDataset, shard
from ..modeling import convert_sync_batchnorm, resolve_arch
from ..tasks import build_task, model_name
from .trainer import Checkpointer, LRScheduler, MetricsWriter, PeriodicEval, PreciseBN, Trainer, lr_factor, param_groups

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_last.pth"
FORMAT_VERSION = 2


def _list_collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class TransferRun:
    """Fine-tune from ``weights`` and test; ``resume`` is ``None``, ``"auto"`` (``out_dir``'s checkpoint if there is
    one) or a checkpoint path; ``eval_only`` tests the resumed checkpoint without training."""

    def __init__(self, cfg: DictConfig, weights: str, data_root: str, out_dir: str, *,
                 resume: Optional[str] = None, eval_only: bool = False):
        self.cfg = cfg.copy()
        self.weights = weights
        self.data_root = data_root
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.eval_only = eval_only
        self.task = build_task(self.cfg)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.device = devlib.init_distributed_from_env(None if cfg.device == "auto" else cfg.device)
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.rank, self.world = devlib.rank(), devlib.world_size()
        self.total_batch, self.per_rank, self.lr = cfglib.effective_batch(cfg, self.world)
        self.train_set, self.test_set, self.class_names = self.task.build_datasets(self.data_root)
        if len(self.train_set) == 0:
            raise ValueError(f"{self.data_root}: the training set is empty")
        if not cfg.arch:
            cfg.arch = resolve_arch([self.weights], None, allow_pickle=bool(cfg.allow_pickle))
        torch.manual_seed(int(cfg.seed) + self.rank)
        model = self.task.build_model(self.weights, len(self.class_names), cfg.arch, self.device).to(self.device)
        if cfg.norm == "syncbn" and self.world > 1 and cfg.task != "voc_seg":
            model = convert_sync_batchnorm(model, self.device)
        if cfg.channels_last:  # the first convolution's NHWC weight makes every later activation NHWC
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.amp_dtype = devlib.autocast_dtype(self.device, cfg.precision)
        groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_norm, self.task.lr_mults())
        # the fused kernel: one pass over each parameter instead of four (same update, same momentum_buffer state)
        fused = fused_sgd_supported([p for g in groups for p in g["params"]])
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=cfg.momentum, fused=fused or None)
        train_model: nn.Module = model
        if self.world > 1:
            kw = {"device_ids": [self.device]} if self.device.type == "cuda" else {}
            train_model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=bool(cfg.find_unused_parameters), **kw)
        self.trainer = Trainer(model, train_model, optimizer, self._batches,
                               lambda m, b: self.task.losses(m, b, self.device), max_iter=cfg.iters,
                               device=self.device, amp_dtype=self.amp_dtype, clip_grad_norm=cfg.clip_grad_norm)
        self.writer = MetricsWriter(self.out_dir, cfg.log_period, f"{cfg.task} {self.weights}")
        self.trainer.register_hooks([
            LRScheduler(self.lr, lambda it: lr_factor(it, cfg)),
            self.writer,
            PeriodicEval(self.evaluate, cfg.eval_period, self._on_eval) if cfg.eval_period > 0 else None,
            # precise BN before the final checkpoint, so that --eval-only on it tests the same model
            PreciseBN(cfg.precise_bn_iters, lambda m, b: self.task.losses(m, b, self.device)),
            Checkpointer(self.save_checkpoint, cfg.checkpoint_period),
        ])

    def _batches(self, start_iter: int):
        """The training batch stream from iteration ``start_iter`` on (the same batches on a resumed run)."""
        sampler = InfiniteSampler(len(self.train_set), seed=int(self.cfg.seed), rank=self.rank,
                                  world_size=self.world, start=start_iter * self.per_rank)
        workers = int(self.cfg.workers)
        self.task.set_train_sizes(self.model, train=True)
        loader = DataLoader(SeededDataset(self.train_set), batch_size=self.per_rank, sampler=sampler,
                            collate_fn=self.task.collate, num_workers=workers, drop_last=True,
                            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                            generator=torch.Generator())  # the loader must not draw from the global RNG
        return iter(loader)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if devlib.is_main_process():
            state = {"kind": KIND_TRANSFER, "format_version": FORMAT_VERSION, "task": self.cfg.task,
                     "weights": self.weights, "arch": self.cfg.arch, "class_names": list(self.class_names),
                     "config": cfglib.to_dict(self.cfg), **self.trainer.state_dict()}
            atomic_torch_save(state, self.out_dir / CHECKPOINT_NAME)
        if devlib.is_distributed():
            torch.distributed.barrier()

    def load_checkpoint(self, path: Path) -> None:
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND_TRANSFER:
            found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path}: not a transfer checkpoint (kind {found!r})")
        if ckpt.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: transfer checkpoint format {ckpt.get('format_version')!r}, this version "
                                  f"reads format {FORMAT_VERSION}")
        for key in ("task", "arch"):
            if ckpt.get(key) != self.cfg[key]:
                raise CheckpointError(f"{path}: checkpoint is for {key} {ckpt.get(key)!r}, this run is "
                                      f"{self.cfg[key]!r}")
        if list(ckpt.get("class_names", [])) != list(self.class_names):
            raise CheckpointError(f"{path}: checkpoint classes {ckpt.get('class_names')} differ from the dataset's "
                                  f"{list(self.class_names)}")
        try:
            self.trainer.load_state_dict(ckpt, model_only=self.eval_only)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: checkpoint does not fit this model ({str(e).splitlines()[0]})") from None
        logger.info("resumed from %s at iteration %d", path, self.trainer.iter)

    def maybe_resume(self) -> None:
        if not self.resume:
            return
        path = self.out_dir / CHECKPOINT_NAME if self.resume in ("auto", "last") else Path(self.resume)
        if self.resume in ("auto", "last") and not path.is_file() and not self.eval_only:
            logger.info("no checkpoint at %s: starting from iteration 0", path)
            return
        self.load_checkpoint(path)

    # ------------------------------------------------------------------ testing
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        model = self.model
        model.eval()
        self.task.set_train_sizes(model, train=False)
        part = shard(self.test_set, self.rank, self.world)
        loader = DataLoader(part, batch_size=int(self.cfg.test_batch_size), collate_fn=_list_collate,
                            num_workers=min(int(self.cfg.workers), 2))
        evaluator = self.task.build_evaluator(self.test_set, self.class_names, self.device)
        evaluator.reset()
        self.samples = []

        t0 = time.perf_counter()
        for images, targets in tqdm(loader, desc="test", unit="batch", dynamic_ncols=True, leave=False,
                                    disable=not devlib.is_main_process()):
            with devlib.autocast(self.device, self.amp_dtype):
                outputs = self.task.predict(model, images, self.device)
            evaluator.process(targets, outputs)
            for sample in zip(images, targets, outputs):
                if len(self.samples) < int(self.cfg.num_vis):
                    self.samples.append(sample)
        metrics = evaluator.evaluate()
        self.task.set_train_sizes(model, train=True)
        self.test_seconds = time.perf_counter() - t0
        metrics["num_test_images"] = len(self.test_set)
        return metrics

    def _on_eval(self, iteration: int, metrics: Dict[str, Any]) -> None:
        row = report.metric_row(self.cfg.task, metrics)
        logger.info("iteration %d: %s", iteration, ", ".join(f"{k} {v:.1f}" for k, v in row.items() if v is not None))
        self.writer.write_eval(iteration, metrics)

    # ------------------------------------------------------------------ outputs
    def model_name(self) -> str:
        return model_name(self.cfg)

    def write_outputs(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        cfg, t = self.cfg, self.trainer
        result = {
            "task": cfg.task, "engine": "torchvision", "weights": self.weights, "arch": cfg.arch,
            "model": self.model_name(), "norm": cfg.norm, "iters": t.iter, "preset": cfg.preset, "seed": cfg.seed,
            "metrics": {k: v for k, v in metrics.items() if k != "confusion"},
            "eval_history": t.eval_history, "train_seconds": round(t.train_seconds, 1),
            "test_seconds": round(getattr(self, "test_seconds", 0.0), 1), "out_dir": str(self.out_dir),
            "checkpoint": str(self.out_dir / CHECKPOINT_NAME),
            "final_loss": t.history[-1]["loss"] if t.history else None,
        }
        if not devlib.is_main_process():
            return result
        out = self.out_dir
        report.write_run(out, result, metrics, t.history, self.class_names,
                         f"{cfg.arch} {self.model_name()}, norm {cfg.norm}, preset {cfg.preset}, {t.iter} iterations, "
                         f"global batch {self.total_batch}, lr {self.lr:g}, {self.world} process(es), "
                         f"{metrics.get('num_test_images')} test images.")
        for i, (image, target, output) in enumerate(getattr(self, "samples", [])):
            self.task.visualize(image, target, output, self.class_names, out / "predictions" / f"sample_{i:02d}.png")
        return result

    def run(self) -> Dict[str, Any]:
        self.setup()
        if devlib.is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = OmegaConf.merge(self.cfg, {})
            atomic_write_text(self.out_dir / "config.yaml", cfglib.to_yaml(resolved) + OmegaConf.to_yaml(OmegaConf.create({
                "run": {"weights": self.weights, "data_root": str(self.data_root), "world_size": self.world,
                        "global_batch": self.total_batch, "batch_per_rank": self.per_rank, "lr": self.lr,
                        "device": str(self.device)}})))
        self.maybe_resume()
        if self.eval_only:
            if self.trainer.iter == 0:
                raise CheckpointError("--eval-only needs a trained checkpoint (--resume CKPT)")
        else:
            self.trainer.train()
        metrics = self.evaluate()
        return self.write_outputs(metrics)
