"""Linear classification protocol (arXiv:1911.05722 Sec. 4.1; the official main_lincls recipes).

A linear classifier on frozen features: the backbone is frozen with BN in eval mode, the classifier (``fc`` of a
ResNet, ``head`` on the class token of a ViT) is initialised N(0, 0.01) with bias 0 and trained with momentum SGD;
evaluation uses a center crop (resize to size x 256/224, crop size). At the end a sanity check verifies that no
backbone tensor changed. Two recipes (``--recipe``; explicit flags override them):

* ``moco`` (MoCo v1/v2, facebookresearch/moco main_lincls.py): lr 30 (not scaled with the batch), momentum 0.9,
  wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80 (scaled to ``--epochs``).
* ``moco-v3`` (arXiv:2104.02057, facebookresearch/moco-v3 main_lincls.py and CONFIG.md): base lr 0.1 for ResNets and
  3 for ViTs, scaled by batch/256, momentum 0.9, wd 0, batch 1024, 90 epochs, cosine lr per epoch.

The backbone comes from :func:`moco_zoo.load_backbone_state_dict` (pretraining checkpoint, converted file, zoo name,
``random`` ...). Writes ``checkpoint.pth`` (kind "linear-probe", resumable, every epoch) and ``metrics.json`` to
``--output-dir``. Single process (one device).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn
from tqdm import tqdm

from moco_zoo import load_backbone_state_dict
from moco_zoo.checkpoint import KIND_LINEAR_PROBE, atomic_torch_save, atomic_write_bytes, require_kind, safe_torch_load
from moco_zoo.config import ConfigError, load_yaml, parse_overrides, resolve_dataclass, user_layers
from moco_zoo.convert import adapt_pos_embed
from moco_zoo.device import autocast, autocast_dtype, default_device
from moco_zoo.logs import TensorBoardScalars

from .augment import eval_transform, linear_train_transform
from .data import ImageFolderDataset, ResumableBatchSampler, make_loader, resolve_data_root
from .engine import get_rng_state, seed_everything, set_rng_state
from .knn import KNNMonitor

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class LinclsConfig:
    data: str = ""
    pretrained: str = ""  # backbone spec (checkpoint path, zoo name, hf-hub:..., random, torchvision-supervised)
    arch: str = ""  # needed for "random"; otherwise inferred from the weights
    recipe: str = "moco"  # moco (v1/v2) | moco-v3; see the module docstring
    epochs: int = 100
    batch_size: int = 256
    lr: Optional[float] = 30.0  # None: the recipe's lr for the architecture (moco-v3: 0.1 ResNet, 3 ViT)
    lr_scaling: str = "none"  # none | linear (lr x batch / 256)
    lr_schedule: str = "step"  # step (lr_steps) | cosine
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


# The recipes' values of the keys they set (the dataclass defaults are the ``moco`` recipe).
RECIPES: Dict[str, Dict[str, Any]] = {
    "moco": dict(epochs=100, batch_size=256, lr=30.0, lr_scaling="none", lr_schedule="step", lr_steps=[60, 80],
                 weight_decay=0.0, momentum=0.9),
    "moco-v3": dict(epochs=90, batch_size=1024, lr=None, lr_scaling="linear", lr_schedule="cosine",
                    weight_decay=0.0, momentum=0.9),
}
V3_BASE_LR = {"vit": 3.0, "resnet": 0.1}  # moco-v3 CONFIG.md: main_lincls.py --lr=3 for ViTs, the default 0.1 for R-50


def lincls_config(recipe: str = "moco", **overrides: Any) -> LinclsConfig:
    """A config of ``recipe`` with ``overrides`` applied (what the CLI does with explicit flags)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown linear recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    values = dict(RECIPES[recipe], recipe=recipe)
    values.update(overrides)
    return LinclsConfig(**values)


def base_lr(cfg: LinclsConfig, classifier: str) -> float:
    """The lr before batch scaling: ``--lr``, else the recipe's lr of the architecture family."""
    if cfg.lr is not None:
        return cfg.lr
    return V3_BASE_LR["vit" if classifier == "head" else "resnet"]


def initial_lr(cfg: LinclsConfig, classifier: str, batch: int) -> float:
    lr = base_lr(cfg, classifier)
    return lr * batch / 256.0 if cfg.lr_scaling == "linear" else lr


def lr_factor(epoch: int, cfg: LinclsConfig) -> float:
    """lr multiplier in ``epoch``: x0.1 at each scaled milestone (step) or a half-cycle cosine (moco-v3)."""
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return 0.1 ** sum(int(epoch >= m) for m in scaled_milestones(cfg))


# The original main_lincls.py's flags (+ image size, precision, device, output dir): flag -> (key, type, help).
_FLAGS = (
    ("--recipe", "recipe", str, "moco: the v1/v2 protocol (lr 30, 100 epochs, steps at 60/80); moco-v3: base lr 0.1 "
     "ResNet / 3 ViT x batch/256, batch 1024, 90 epochs, cosine (flags and --set override the recipe)"),
    ("--pretrained", "pretrained", str, "backbone: pretraining checkpoint, converted weights, zoo name, hf-hub:ORG/REPO, "
     "torchvision-supervised or random"),
    ("-a", "arch", str, "timm architecture (required for --pretrained random)"),
    ("-j", "workers", int, "DataLoader workers"),
    ("--epochs", "epochs", int, "epochs (100)"),
    ("-b", "batch_size", int, "batch size (256)"),
    ("--lr", "lr", float, "learning rate (recipe: 30 / 0.1 ResNet, 3 ViT)"),
    ("--momentum", "momentum", float, "SGD momentum (0.9)"),
    ("--wd", "weight_decay", float, "weight decay (0)"),
    ("--image-size", "image_size", int, "crop size (224)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--precision", "precision", str, "fp32 | bf16 | fp16 | auto (autocast)"),
    ("--seed", "seed", int, "random seed"),
    ("--output-dir", "output_dir", str, "checkpoint.pth and metrics.json go here"),
    ("--resume", "resume", str, "'auto' (checkpoint.pth in --output-dir) or a path"),
)
_LONG_NAMES = {"-a": "--arch", "-j": "--workers", "-b": "--batch-size"}


def build_parser() -> argparse.ArgumentParser:
    keys = ", ".join(f.name for f in dataclasses.fields(LinclsConfig)
                     if f.name not in {k for _, k, _, _ in _FLAGS} | {"data"})
    p = argparse.ArgumentParser(description="Linear classification on frozen MoCo features",
                                epilog=f"config keys without a flag (--set KEY=VALUE): {keys}")
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root with train/ and val/, or 'synthetic'")
    p.add_argument("--config-file", default=None, help="YAML file of config keys applied before the flags")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys (values parsed as YAML), e.g. --set lr_steps=[60,80] knn=false")
    p.add_argument("--debug", action="store_true", default=None, help="show the traceback of an error")
    for flag, key, kind, help_ in _FLAGS:
        extra = [_LONG_NAMES[flag]] if flag in _LONG_NAMES else []
        p.add_argument(flag, *extra, dest=key, type=kind, default=None, help=help_)
    return p


def resolve(config_file: Optional[str] = None, flags: Optional[Dict[str, Any]] = None,
            overrides: Optional[Dict[str, Any]] = None) -> LinclsConfig:
    """The recipe (``recipe`` from the flags, the config file or ``--set``; default ``moco``) < config file < flags
    < ``--set``; unknown keys and bad values name their source."""
    file_values = load_yaml(Path(config_file)) if config_file else {}
    recipe = (overrides or {}).get("recipe") or (flags or {}).get("recipe") or file_values.get("recipe") or "moco"
    if recipe not in RECIPES:
        raise ConfigError(f"unknown linear recipe {recipe!r}: expected one of {', '.join(sorted(RECIPES))}")
    layers = [(dict(RECIPES[recipe], recipe=recipe), f"recipe {recipe}")] + user_layers(config_file, flags, overrides)
    return resolve_dataclass(LinclsConfig, layers)


def config_from_args(args: argparse.Namespace) -> LinclsConfig:
    given = {k: v for k, v in vars(args).items() if v is not None and k != "debug"}
    config_file = given.pop("config_file", None)
    overrides = parse_overrides(given.pop("overrides", []))
    cfg = resolve(config_file, given, overrides)
    if not cfg.data:
        raise ConfigError("DATA is required (an ImageFolder root, or 'synthetic')")
    if not cfg.pretrained:
        raise ConfigError("--pretrained is required (a checkpoint, zoo name, hf-hub:ORG/REPO, torchvision-supervised "
                          "or random)")
    return cfg


def scaled_milestones(cfg: LinclsConfig) -> List[int]:
    return sorted({max(1, int(round(m * cfg.epochs / 100.0))) for m in cfg.lr_steps})


def classifier_name(model: nn.Module) -> str:
    """``fc`` (ResNets) or ``head`` (ViTs: a linear layer on the class token)."""
    for name in ("fc", "head"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise ValueError(f"linear probe supports ResNet-style models (fc) and ViTs (head); got {type(model).__name__}")


def _backbone_state(model: nn.Module, classifier: str = "fc") -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(classifier + ".")}


def build_linear_model(spec: str, arch: str, num_classes: int, image_size: int = 224, seed: int = 0) -> tuple:
    """(timm model with frozen backbone from ``spec`` and a fresh N(0, 0.01) classifier, timm arch name); ``seed``
    picks the weights of ``spec="random"``."""
    sd, arch = load_backbone_state_dict(spec, arch or None, seed=seed)
    vit = "pos_embed" in sd
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes,
                              **({"img_size": image_size} if vit else {}))
    head = classifier_name(model)
    missing, unexpected = model.load_state_dict(adapt_pos_embed(sd, model) if vit else sd, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise ValueError(f"{spec}: backbone weights do not fit {arch}: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
    nn.init.normal_(getattr(model, head).weight, mean=0.0, std=0.01)
    nn.init.zeros_(getattr(model, head).bias)
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
    model, arch = build_linear_model(cfg.pretrained, cfg.arch, len(classes), cfg.image_size, seed=cfg.seed)
    head = classifier_name(model)
    classifier = getattr(model, head)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    reference = {k: v.to("cpu") for k, v in _backbone_state(model, head).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only the classifier's weight and bias are trained"
    batch = min(cfg.batch_size, len(train_set))
    lr0 = initial_lr(cfg, head, cfg.batch_size)  # scaled by the configured batch, as the original scripts
    optimizer = torch.optim.SGD(params, lr0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))
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
    tensorboard = TensorBoardScalars(out / "tb", purge_step=start_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        model.eval()  # frozen BN statistics: the backbone runs in eval mode throughout
        sampler.set_epoch(epoch)
        it = train_loader
        if cfg.progress:
            it = tqdm(train_loader, desc=f"lincls epoch {epoch}", leave=False, file=sys.stderr)
        loss_sum, n = torch.zeros((), device=device), 0
        for images, target, _ in it:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                with torch.no_grad():
                    feats = model.forward_head(model.forward_features(images), pre_logits=True)
                logits = classifier(feats.float() if amp_dtype is None else feats)
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
        tensorboard.write("lincls", {**history[-1], "lr": optimizer.param_groups[0]["lr"]}, epoch + 1)
    tensorboard.close()

    # Sanity check (as the protocol requires): the frozen backbone must be exactly the loaded one.
    now = _backbone_state(model, head)
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
