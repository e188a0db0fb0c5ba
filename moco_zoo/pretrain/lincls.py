"""Linear classification protocol (arXiv:1911.05722 Sec. 4.1; the official main_lincls recipe).

A linear classifier on frozen features: the backbone is frozen with BN in eval mode, ``fc`` is initialised
N(0, 0.01) with bias 0 and trained with SGD (lr 30, momentum 0.9, weight decay 0, batch 256) for 100 epochs with lr
x0.1 at epochs 60 and 80 (scaled to ``--epochs``); evaluation uses a center crop (resize to size x 256/224, crop
size). At the end a sanity check verifies that no backbone tensor changed. The lr is not scaled with the batch
size (the protocol's 30 is used as given; pass ``--lr`` to change it).

The backbone comes from :func:`moco_zoo.load_backbone_state_dict` (pretraining checkpoint, converted file, zoo name,
``random`` ...). Writes ``checkpoint.pth`` (kind "linear-probe", resumable, every epoch) and ``metrics.json`` to
``--output-dir``. Single process (one device).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

from moco_zoo.checkpoint import KIND_LINEAR_PROBE, atomic_torch_save, atomic_write_bytes, require_kind, safe_torch_load
from moco_zoo.device import autocast, autocast_dtype, default_device

from .augment import eval_transform, linear_train_transform
from .data import ImageFolderDataset, ResumableBatchSampler, make_loader, resolve_data_root
from .engine import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class LinclsConfig:
    data: str = ""
    pretrained: str = ""  # backbone spec (checkpoint path, zoo name, hf-hub:..., random, torchvision-supervised)
    arch: str = ""  # needed for "random"; otherwise inferred from the weights
    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    lr_steps: List[int] = field(default_factory=lambda: [60, 80])  # of 100 epochs; scaled to --epochs
    weight_decay: float = 0.0
    momentum: float = 0.9
    image_size: int = 224
    workers: int = 4
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    seed: int = 0
    output_dir: str = "runs/lincls"
    resume: str = ""  # "auto" or a checkpoint path
    progress: bool = True
    synthetic_images: int = 800
    synthetic_size: int = 64
    knn: bool = True  # also report weighted kNN top-1 (k=200, t=0.1) of the frozen features, before training the fc

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Linear classification on frozen MoCo features",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = LinclsConfig()
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root with train/ and val/, or 'synthetic'")
    p.add_argument("--data", dest="data_opt", default=None, help="same as DATA")
    p.add_argument("--pretrained", required=True, help="backbone: pretraining checkpoint, converted weights, zoo "
                   "name, hf-hub:ORG/REPO, torchvision-supervised or random")
    p.add_argument("-a", "--arch", default=d.arch, help="timm architecture (required for --pretrained random)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("-b", "--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-steps", type=int, nargs="+", default=d.lr_steps, help="milestones of a 100-epoch run")
    p.add_argument("--wd", dest="weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("-j", "--workers", type=int, default=d.workers)
    p.add_argument("--device", default=d.device)
    p.add_argument("--precision", default=d.precision)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--resume", default=d.resume, help="'auto' (checkpoint.pth in --output-dir) or a path")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    p.add_argument("--synthetic-images", type=int, default=d.synthetic_images)
    p.add_argument("--synthetic-size", type=int, default=d.synthetic_size)
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=d.knn,
                   help="also report kNN top-1 (k=200, t=0.1) of the frozen backbone features")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def config_from_args(args: argparse.Namespace) -> LinclsConfig:
    values = vars(args).copy()
    values.pop("debug", None)
    data = values.pop("data_opt", None) or values.pop("data", None)
    values.pop("data", None)
    if not data:
        raise ValueError("DATA (or --data) is required")
    return LinclsConfig(data=data, **values)


def scaled_milestones(cfg: LinclsConfig) -> List[int]:
    return sorted({max(1, int(round(m * cfg.epochs / 100.0))) for m in cfg.lr_steps})


def _backbone_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def build_linear_model(spec: str, arch: str, num_classes: int, seed: int = 0) -> tuple:
    """(timm model with frozen backbone from ``spec`` and a fresh N(0, 0.01) fc, timm arch name); ``seed`` picks
    the weights of ``spec="random"``."""
    import timm

    from moco_zoo import load_backbone_state_dict

    sd, arch = load_backbone_state_dict(spec, arch or None, seed=seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise ValueError(f"linear probe supports ResNet-style models with an 'fc' classifier; got {arch!r}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{spec}: backbone weights do not fit {arch}: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    return model, arch


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None, channels_last: bool = False
             ) -> Dict[str, float]:
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    crit = nn.CrossEntropyLoss(reduction="sum")
    for images, target, _ in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images).float()
        loss_sum += crit(logits, target).item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == target).sum().item()
        correct5 += (top == target.unsqueeze(1)).any(1).sum().item()
        total += target.numel()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


def run_linear_probe(cfg: LinclsConfig) -> Dict[str, Any]:
    """Train and evaluate the linear classifier; returns the metrics (also in ``metrics.json``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("main_lincls runs in a single process; launch it with python, not torchrun")
    device = default_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.precision)
    out = Path(cfg.output_dir)
    root = resolve_data_root(cfg.data, cfg.synthetic_images, cfg.synthetic_size)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(f"{root}: the linear probe needs an ImageFolder with train/ and val/ sub-directories")
    train_set = ImageFolderDataset(root / "train", linear_train_transform(cfg.image_size))
    val_set = ImageFolderDataset(root / "val", eval_transform(cfg.image_size))
    if train_set.classes != val_set.classes:
        raise ValueError(f"{root}: train/ and val/ have different class directories")
    classes = train_set.classes

    seed_everything(cfg.seed)
    model, arch = build_linear_model(cfg.pretrained, cfg.arch, len(classes), seed=cfg.seed)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    reference = {k: v.to("cpu") for k, v in _backbone_state(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only fc.weight and fc.bias are trained"
    optimizer = torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=scaled_milestones(cfg), gamma=0.1)
    batch = min(cfg.batch_size, len(train_set))
    sampler = ResumableBatchSampler(len(train_set), batch, seed=cfg.seed)
    train_loader = make_loader(train_set, sampler, workers=cfg.workers, seed=cfg.seed)
    val_loader = make_loader(val_set, batch_size=max(batch, 64), workers=cfg.workers)

    start_epoch, history, best = 0, [], 0.0
    ckpt_path = out / "checkpoint.pth"
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        if path.exists() or cfg.resume != "auto":
            ck = safe_torch_load(path)
            require_kind(ck, KIND_LINEAR_PROBE, path)
            model.load_state_dict(ck["state_dict"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start_epoch = ck["epoch"]
            history = list(ck["metrics"].get("history", []))
            best = ck["metrics"].get("best_top1", 0.0)
            set_rng_state(ck["rng"], device)
            logger.info("resumed linear probe from %s at epoch %d", path, start_epoch)

    knn: Dict[str, float] = {}
    if cfg.knn:
        # The frozen features' kNN accuracy: a second, training-free view of the same backbone (InstDisc protocol).
        from .knn import KNNMonitor

        monitor = KNNMonitor(root, cfg.image_size, device, workers=cfg.workers, amp_dtype=amp_dtype,
                             channels_last=cfg.channels_last)
        model.eval()  # frozen BN statistics, as in training below
        with torch.no_grad():
            knn = monitor.evaluate(lambda x: model.forward_head(model.forward_features(x), pre_logits=True))
            # Same features with BN statistics re-estimated on the train images: for a random init (whose eval-mode
            # BN has mean 0 / var 1 and so does not normalise) this is the baseline with a trained network's kind
            # of BN; for a pretrained backbone it is close to the plain number.
            calib = monitor.recalibrate_bn(model)
            knn["knn_top1_data_bn"] = monitor.evaluate(
                lambda x: calib.forward_head(calib.forward_features(x), pre_logits=True))["knn_top1"]
            del calib
        logger.info("kNN on frozen features: top-1 %.2f (BN statistics re-estimated on the train images: %.2f)",
                    knn["knn_top1"], knn["knn_top1_data_bn"])

    crit = nn.CrossEntropyLoss()
    metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.eval()  # frozen BN statistics: the backbone runs in eval mode throughout
        sampler.set_epoch(epoch)
        it = train_loader
        if cfg.progress:
            from tqdm import tqdm

            it = tqdm(train_loader, desc=f"lincls epoch {epoch}", leave=False, file=sys.stderr)
        loss_sum, n = torch.zeros((), device=device), 0
        for images, target, _ in it:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                with torch.no_grad():
                    feats = model.forward_head(model.forward_features(images), pre_logits=True)
                logits = model.fc(feats.float() if amp_dtype is None else feats)
            loss = crit(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * target.numel()
            n += target.numel()
        scheduler.step()
        val = evaluate(model, val_loader, device, amp_dtype, cfg.channels_last)
        best = max(best, val["top1"])
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / max(1, n), **val})
        metrics = {"top1": val["top1"], "top5": val["top5"], "best_top1": best, "history": history}
        atomic_torch_save({
            "kind": KIND_LINEAR_PROBE, "format_version": FORMAT_VERSION, "arch": arch,
            "num_classes": len(classes), "class_names": list(classes),
            "state_dict": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
            "source": str(cfg.pretrained), "metrics": metrics, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": get_rng_state(device),
            "config": cfg.to_dict(),
        }, ckpt_path)
        logger.info("lincls epoch %d: train loss %.3f, val top-1 %.2f, top-5 %.2f", epoch, history[-1]["train_loss"],
                    val["top1"], val["top5"])

    # Sanity check (as the protocol requires): the frozen backbone must be exactly the loaded one.
    now = _backbone_state(model)
    changed = [k for k, v in reference.items() if not torch.equal(v, now[k].to("cpu"))]
    if changed:
        raise RuntimeError(f"linear probe sanity check failed: backbone tensors changed during training: {changed[:5]}")
    if not metrics and history:
        h = history[-1]
        metrics = {"top1": h["top1"], "top5": h["top5"], "best_top1": best, "history": history}
    result = {"arch": arch, "source": str(cfg.pretrained), "num_classes": len(classes), **metrics, **knn,
              "sanity_check": "passed", "checkpoint": str(ckpt_path)}
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=2).encode())
    return result
