"""Low-shot (semi-supervised) fine-tuning: the whole network fine-tuned on a per-class balanced 1% / 10% subset of
the train labels, evaluated on the test split (the protocol of SimCLR, arXiv:2002.05709 App. B.5: SGD with Nesterov
momentum 0.9, lr 0.05 x batch/256, no weight decay, random crop + flip, 60 epochs on 1% and 30 on 10%; here with a
per-epoch cosine decay; BN in train mode).

Subsets are written as split files in the format of the ImageNet 1% / 10% subsets (SimCLR's ``1percent.txt``: one
train image file name per line, e.g. ``n01440764_10026.JPEG``); ``<class_dir>/<file name>`` lines are accepted too
and written when file names repeat across classes. A real subset file drops in through ``lowshot_split_files``.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from moco_zoo import load_backbone
from moco_zoo.checkpoint import atomic_torch_save, atomic_write_text, safe_torch_load
from moco_zoo.device import autocast, autocast_dtype, is_distributed, rank, world_size
from moco_zoo.pretrain.augment import eval_transform, linear_train_transform
from moco_zoo.pretrain.data import ImageFolderDataset, ResumableBatchSampler, make_loader
from moco_zoo.pretrain.engine import seed_everything
from moco_zoo.pretrain.lincls import evaluate

from .fewshot import draw_per_class

logger = logging.getLogger(__name__)


def _names(dataset: ImageFolderDataset) -> List[str]:
    return [os.path.relpath(p, dataset.root).replace(os.sep, "/") for p, _ in dataset.samples]


def subset_indices(dataset: ImageFolderDataset, percent: float, seed: int = 0) -> torch.Tensor:
    """Per-class balanced ``percent`` of the images (at least one per class), deterministic given ``seed``."""
    return draw_per_class(torch.tensor(dataset.targets), seed, percent=percent)


def write_split_file(path: Path, dataset: ImageFolderDataset, indices: Sequence[int]) -> Path:
    """One image per line, as the ImageNet subset files: the file name, or ``class/file`` when names repeat."""
    rel = _names(dataset)
    base = [r.rsplit("/", 1)[-1] for r in rel]
    unique = len(set(base)) == len(base)
    lines = [base[i] if unique else rel[i] for i in sorted(int(i) for i in indices)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_split_file(path: Path, dataset: ImageFolderDataset) -> List[int]:
    """Indices into ``dataset`` of the images a split file lists (file names or ``class/file`` lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: split file not found") from None
    rel = _names(dataset)
    by_rel = {r: i for i, r in enumerate(rel)}
    by_base: Dict[str, List[int]] = defaultdict(list)
    for i, r in enumerate(rel):
        by_base[r.rsplit("/", 1)[-1]].append(i)
    out: List[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if "/" in name:
            if name not in by_rel:
                raise ValueError(f"{path}:{lineno}: {name!r} is not an image of {dataset.root}")
            out.append(by_rel[name])
            continue
        hits = by_base.get(name, [])
        if not hits:
            raise ValueError(f"{path}:{lineno}: {name!r} is not an image of {dataset.root}")
        if len(hits) > 1:
            raise ValueError(f"{path}:{lineno}: {name!r} names {len(hits)} images in different classes of "
                             f"{dataset.root}; write it as <class_dir>/{name}")
        out.append(hits[0])
    if not out:
        raise ValueError(f"{path}: split file lists no images")
    if len(set(out)) != len(out):
        raise ValueError(f"{path}: lists an image more than once")
    return sorted(out)


def finetune(*, backbone: str, arch: str, train_root: Path, test_root: Path, indices: Sequence[int], epochs: int,
             batch_size: int, lr: float, momentum: float, weight_decay: float, image_size: int, seed: int,
             device: torch.device, precision: str = "fp32", workers: int = 0, channels_last: bool = False,
             checkpoint: Optional[Path] = None, progress: bool = False) -> Dict[str, Any]:
    """Fine-tune the whole network of ``backbone`` (+ a fresh classifier) on ``indices`` of ``train_root``;
    returns test ``top1``/``top5`` (%). ``batch_size`` is global over the ranks; ``lr`` is for a batch of 256."""

    amp_dtype = autocast_dtype(device, precision)
    train_set = ImageFolderDataset(train_root, linear_train_transform(image_size))
    test_set = ImageFolderDataset(test_root, eval_transform(image_size))
    num_classes = len(train_set.classes)
    train_set.samples = [train_set.samples[i] for i in indices]
    train_set.targets = [t for _, t in train_set.samples]
    w = world_size()
    global_batch = max(w, min(batch_size, len(train_set)) // w * w)
    sampler = ResumableBatchSampler(len(train_set), global_batch // w, rank=rank(), world_size=w, seed=seed)
    loader = make_loader(train_set, sampler, workers=workers, seed=seed)

    seed_everything(seed)
    model = load_backbone(backbone, arch or None, num_classes=num_classes, seed=seed, image_size=image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = lr * global_batch / 256.0
    optimizer = torch.optim.SGD(model.parameters(), base_lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=momentum > 0)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        ck = safe_torch_load(checkpoint)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start = int(ck["epoch"])
        logger.info("low-shot fine-tuning resumed from %s at epoch %d", checkpoint, start)
    net: nn.Module = model
    if is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    crit = nn.CrossEntropyLoss()
    it = range(start, epochs)
    if progress and rank() == 0:
        it = tqdm(it, desc=f"low-shot fine-tuning ({len(train_set)} images)", leave=False, file=sys.stderr)
    for epoch in it:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        net.train()
        sampler.set_epoch(epoch)
        for images, target, _ in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                loss = crit(net(images).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if checkpoint is not None and rank() == 0:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                              checkpoint)
    test_loader = make_loader(test_set, batch_size=max(64, global_batch), workers=workers)
    result = evaluate(model, test_loader, device, amp_dtype, channels_last)
    return {"top1": result["top1"], "top5": result["top5"], "train_images": len(train_set)}
