"""Frozen-backbone features, extracted once and cached on disk.

The cache of one (backbone, dataset split, transform, BN policy, precision) lives in
``<cache_dir>/<key>/<split>/chunk_NNNNN.safetensors`` (``features`` NxD float32, ``labels`` N int64); ``key`` is a
hash of those inputs (a checkpoint path contributes its size and modification time, ``random`` its seed). Chunks are
written atomically, so an interrupted extraction resumes at the first missing chunk and a rerun reads everything
from disk without building the model. Under ``torchrun`` rank ``r`` extracts chunks ``r, r + W, ...``.

BN policy (explicit, as the protocols disagree on it): ``eval`` uses the backbone's running statistics (MoCo's
linear protocol and kNN monitor); ``recalibrate`` first re-estimates them on the train images ("precise BN",
:func:`moco_zoo.pretrain.knn.recalibrate_bn`), which matters for a random init whose statistics are mean 0 / var 1.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.utils.data import Subset
from tqdm import tqdm

from moco_zoo import load_backbone
from moco_zoo.checkpoint import atomic_write_bytes, atomic_write_text
from moco_zoo.device import autocast, autocast_dtype, default_device, is_distributed, rank, world_size
from moco_zoo.pretrain.augment import eval_transform
from moco_zoo.pretrain.data import ImageFolderDataset, make_loader, resolve_data_root
from moco_zoo.pretrain.knn import extract_features, recalibrate_bn

from .config import EvalConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SPLITS = ("train", "val")  # val/ is the test split of the protocols


@dataclass
class FeatureSet:
    """Frozen features of the train and test splits (NxD float32, not normalised) with their labels."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    classes: List[str]
    key: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def data_root(cfg: EvalConfig) -> Path:
    root = resolve_data_root(cfg.data, cfg.synthetic_images, cfg.synthetic_size)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root}: the evaluation needs an ImageFolder with train/ and val/ sub-directories "
                                f"(missing {', '.join(missing)})")
    return root


def eval_datasets(cfg: EvalConfig, transform=None) -> Dict[str, ImageFolderDataset]:
    root = data_root(cfg)
    tf = transform or eval_transform(cfg.image_size)
    sets = {s: ImageFolderDataset(root / s, tf) for s in SPLITS}
    if sets["train"].classes != sets["val"].classes:
        raise ValueError(f"{root}: train/ and val/ have different class directories")
    return sets


def backbone_identity(spec: str, arch: str, seed: int) -> Dict[str, Any]:
    """What the backbone's weights depend on: a file's size and mtime, the seed of ``random``."""
    ident: Dict[str, Any] = {"spec": str(spec), "arch": arch or ""}
    if os.path.exists(spec):
        p = Path(spec).resolve()
        files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file())
        ident["spec"] = str(p)
        ident["files"] = [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]
    if spec == "random":
        ident["seed"] = int(seed)
    return ident


def cache_key(cfg: EvalConfig, datasets: Dict[str, ImageFolderDataset], seed: int,
              amp_dtype: Optional[torch.dtype]) -> Tuple[str, Dict[str, Any]]:
    files = hashlib.sha256()
    for s in SPLITS:
        ds = datasets[s]
        for path, target in ds.samples:
            files.update(f"{s}/{os.path.relpath(path, ds.root)}\t{target}\t{os.path.getsize(path)}\n".encode())
    meta = {
        "format": CACHE_FORMAT,
        "backbone": backbone_identity(cfg.backbone, cfg.arch, seed),
        "data": str(Path(datasets["train"].root).parent.resolve()),
        "files": files.hexdigest(),
        "transform": repr(datasets["train"].transform),
        "bn": cfg.bn,
        "precision": str(amp_dtype),
        "chunk_size": cfg.chunk_size,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    return key, meta


def _chunk_path(folder: Path, split: str, i: int) -> Path:
    return folder / split / f"chunk_{i:05d}.safetensors"


def _read_chunk(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: feature chunk missing after extraction") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise ValueError(f"{path}: unreadable feature chunk ({e}); delete it to extract it again") from None


def build_frozen_backbone(cfg: EvalConfig, seed: int, device: torch.device, train_set=None,
                          amp_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The backbone of ``cfg.backbone`` in eval mode (pooled features), BN per ``cfg.bn``."""

    model = load_backbone(cfg.backbone, cfg.arch or None, num_classes=0, seed=seed, image_size=cfg.image_size).to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.bn == "recalibrate":
        loader = make_loader(train_set, batch_size=cfg.batch_size, workers=cfg.workers)

        def batches():
            for x, _, _ in loader:
                yield x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

        with autocast(device, amp_dtype):
            model = recalibrate_bn(model, batches(), device)
    return model


def extract_cached(cfg: EvalConfig, seed: int = 0, device: Optional[torch.device] = None) -> FeatureSet:
    """Features of train/ and val/ for ``cfg.backbone`` (extracted now or read from the cache)."""

    device = device or default_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.precision)
    datasets = eval_datasets(cfg)
    key, meta = cache_key(cfg, datasets, seed, amp_dtype)
    folder = Path(cfg.cache_dir or Path(cfg.output_dir) / "feature_cache") / key
    r, w = rank(), world_size()
    todo = []
    for s in SPLITS:
        n_chunks = -(-len(datasets[s]) // cfg.chunk_size)
        for i in range(n_chunks):
            if i % w == r and not _chunk_path(folder, s, i).is_file():  # chunks are written atomically
                todo.append((s, i))
    if todo:
        if r == 0:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
        logger.info("extracting features of %s (%d chunks, cache %s)", cfg.backbone, len(todo), folder)
        model = build_frozen_backbone(cfg, seed, device, datasets["train"], amp_dtype)
        bar = None
        if cfg.progress and r == 0:
            total = sum(min(cfg.chunk_size, len(datasets[s]) - i * cfg.chunk_size) for s, i in todo)
            bar = tqdm(total=total, desc="features", unit="img", file=sys.stderr, leave=False)
        for s, i in todo:
            ds = datasets[s]
            idx = list(range(i * cfg.chunk_size, min(len(ds), (i + 1) * cfg.chunk_size)))
            loader = make_loader(Subset(ds, idx), batch_size=cfg.batch_size, workers=cfg.workers)
            feats, labels = extract_features(model, loader, device, amp_dtype, cfg.channels_last, normalize=False,
                                             progress=bar)
            _chunk_path(folder, s, i).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(_chunk_path(folder, s, i), save({"features": feats.cpu().contiguous(),
                                                                "labels": labels.cpu().long()}))
        if bar is not None:
            bar.close()
        del model
    else:
        logger.info("features of %s read from the cache %s", cfg.backbone, folder)
    if is_distributed():
        torch.distributed.barrier()
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for s in SPLITS:
        chunks = [_read_chunk(_chunk_path(folder, s, i)) for i in range(-(-len(datasets[s]) // cfg.chunk_size))]
        out[s] = (torch.cat([c["features"] for c in chunks]), torch.cat([c["labels"] for c in chunks]))
        expected = torch.tensor(datasets[s].targets, dtype=torch.long)
        if not torch.equal(out[s][1], expected):
            raise ValueError(f"{folder / s}: cached labels do not match {datasets[s].root}; delete the cache folder")
    return FeatureSet(out["train"][0], out["train"][1], out["val"][0], out["val"][1],
                      list(datasets["train"].classes), key)
