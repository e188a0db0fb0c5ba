"""``run_eval``: every configured protocol for every seed, each (protocol, seed) result stored as it finishes (a
rerun skips what is done, and the feature cache and the training checkpoints resume what was interrupted), then
the aggregated tables. Under ``torchrun`` feature extraction is split over the ranks, the linear sweep and the
low-shot fine-tuning train with all ranks (DDP), and kNN / few-shot run on rank 0."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from moco_zoo.checkpoint import atomic_write_text
from moco_zoo.device import init_distributed_from_env, is_distributed, rank, world_size
from moco_zoo.pretrain.data import ImageFolderDataset
from moco_zoo.pretrain.lincls import LinclsConfig, run_linear_probe

from .config import ConfigError, EvalConfig
from .features import FeatureSet, data_root, extract_cached
from .fewshot import run_fewshot as fewshot
from .knn import knn_eval
from .linear import run_linear_sweep
from .lowshot import finetune, read_split_file, subset_indices, write_split_file
from .results import ResultRow, make_row, write_results

logger = logging.getLogger(__name__)

# The settings every protocol's numbers depend on, and each protocol's own (by key prefix): a (protocol, seed)
# result or training checkpoint is reused only when these are unchanged.
_COMMON_KEYS = ("backbone", "arch", "data", "image_size", "precision", "channels_last", "bn", "synthetic_images",
                "synthetic_size")
_PROTOCOL_KEYS = {"knn": ("knn_",), "linear": ("linear_", "val_fraction", "split_seed"), "fewshot": ("fewshot_",),
                  "lowshot": ("lowshot_",), "linear-moco": ("moco_linear_",)}


def fingerprint(cfg: EvalConfig, protocol: str) -> str:
    d = {k: v for k, v in cfg.to_dict().items()
         if k in _COMMON_KEYS or k.startswith(_PROTOCOL_KEYS[protocol])}
    return hashlib.sha256(json.dumps([protocol, d], sort_keys=True).encode()).hexdigest()[:12]


class _Store:
    """``<out>/per_seed/<protocol>/seed<S>.json``: metrics of one finished (protocol, seed)."""

    def __init__(self, out: Path, cfg: EvalConfig) -> None:
        self.out, self.cfg = out / "per_seed", cfg

    def work_dir(self, protocol: str, seed: int) -> Path:
        """Checkpoints of an unfinished (protocol, seed) under these settings."""
        return self.out.parent / "work" / protocol / f"{fingerprint(self.cfg, protocol)}_seed{seed}"

    def path(self, protocol: str, seed: int) -> Path:
        return self.out / protocol / f"seed{seed}.json"

    def get(self, protocol: str, seed: int) -> Optional[Dict[str, Any]]:
        p = self.path(protocol, seed)
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if data.get("fingerprint") != fingerprint(self.cfg, protocol):
            logger.info("%s: computed with other settings; running %s seed %d again", p, protocol, seed)
            return None
        return data

    def put(self, protocol: str, seed: int, metrics: Dict[str, Any], seconds: float, details: Any = None) -> None:
        if rank() == 0:
            p = self.path(protocol, seed)
            p.parent.mkdir(parents=True, exist_ok=True)
            record = {"fingerprint": fingerprint(self.cfg, protocol), "protocol": protocol, "seed": seed,
                      "metrics": metrics, "seconds": seconds, "details": details}
            atomic_write_text(p, json.dumps(record, indent=2))


def _barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def _lowshot_sets(cfg: EvalConfig) -> List[Dict[str, Any]]:
    if cfg.lowshot_split_files:
        sets = [{"name": Path(f).stem, "file": f} for f in cfg.lowshot_split_files]
    else:
        sets = [{"name": f"{p:g}pct", "percent": p} for p in cfg.lowshot_percents]
    for i, s in enumerate(sets):
        s["epochs"] = cfg.lowshot_epochs[i if len(cfg.lowshot_epochs) > 1 else 0]
    return sets


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    """Run the evaluation; returns the ``results.json`` content (also written to ``cfg.output_dir``)."""
    cfg.validate()
    device = init_distributed_from_env(cfg.device)
    if "linear-moco" in cfg.protocols and world_size() > 1:
        raise ConfigError("protocol linear-moco runs in one process (moco_zoo.pretrain.lincls); run it without "
                          "torchrun or drop it from --protocols")
    out = Path(cfg.output_dir)
    root = data_root(cfg)
    store = _Store(out, cfg)
    feature_seconds: List[float] = []
    features: Dict[int, FeatureSet] = {}

    def feats(seed: int) -> FeatureSet:
        key_seed = seed if cfg.backbone == "random" else 0  # other backbones do not depend on the seed
        if key_seed not in features:
            t0 = time.perf_counter()
            features.clear()
            features[key_seed] = extract_cached(cfg, key_seed, device)
            feature_seconds.append(time.perf_counter() - t0)
        fs = features[key_seed]
        return FeatureSet(fs.train.to(device), fs.train_labels.to(device), fs.test.to(device),
                          fs.test_labels.to(device), fs.classes, fs.key)

    def run_knn(seed: int):
        fs = feats(seed)
        return knn_eval(fs.train, fs.train_labels, fs.test, fs.test_labels, fs.num_classes, cfg.knn_k,
                        cfg.knn_t), None

    def run_linear(seed: int):
        fs = feats(seed)
        res = run_linear_sweep(fs.train, fs.train_labels, fs.test, fs.test_labels, lrs=cfg.linear_lrs,
                               wds=cfg.linear_wds, epochs=cfg.linear_epochs, batch_size=cfg.linear_batch_size,
                               momentum=cfg.linear_momentum, val_fraction=cfg.val_fraction,
                               split_seed=cfg.split_seed, seed=seed,
                               checkpoint=store.work_dir("linear", seed) / "sweep.pth", progress=cfg.progress)
        metrics = {"top1": res["top1"], "top5": res["top5"]}
        return metrics, {k: v for k, v in res.items() if k not in metrics}

    def run_fewshot(seed: int):
        fs = feats(seed)
        return fewshot(fs.train.cpu(), fs.train_labels.cpu(), fs.test.cpu(), fs.test_labels.cpu(),
                       shots=cfg.fewshot_shots, percents=cfg.fewshot_percents, tries=cfg.fewshot_tries, seed=seed,
                       c=cfg.fewshot_c), None

    def run_lowshot(seed: int):
        train_ds = ImageFolderDataset(root / "train")
        metrics, details = {}, {}
        for s in _lowshot_sets(cfg):
            if "file" in s:
                split_file = Path(s["file"])
                idx = read_split_file(split_file, train_ds)
            else:
                split_file = out / "lowshot_subsets" / f"{s['percent']:g}percent_seed{seed}.txt"
                idx = subset_indices(train_ds, s["percent"], seed).tolist()
                if rank() == 0:
                    write_split_file(split_file, train_ds, idx)
            res = finetune(backbone=cfg.backbone, arch=cfg.arch, train_root=root / "train", test_root=root / "val",
                           indices=idx, epochs=s["epochs"], batch_size=cfg.lowshot_batch_size, lr=cfg.lowshot_lr,
                           momentum=cfg.lowshot_momentum, weight_decay=cfg.lowshot_weight_decay,
                           image_size=cfg.image_size, seed=seed, device=device, precision=cfg.precision,
                           workers=cfg.workers, channels_last=cfg.channels_last,
                           checkpoint=store.work_dir("lowshot", seed) / f"{s['name']}.pth", progress=cfg.progress)
            metrics[f"top1_{s['name']}"] = res["top1"]
            details[s["name"]] = {"split_file": str(split_file), "train_images": res["train_images"],
                                  "epochs": s["epochs"], "top5": res["top5"]}
        return metrics, details

    def run_linear_moco(seed: int):
        res = run_linear_probe(LinclsConfig(
            data=str(root), pretrained=cfg.backbone, arch=cfg.arch, epochs=cfg.moco_linear_epochs,
            batch_size=cfg.moco_linear_batch_size, image_size=cfg.image_size, workers=cfg.workers,
            device=cfg.device, precision=cfg.precision, channels_last=cfg.channels_last, seed=seed,
            output_dir=str(store.work_dir("linear-moco", seed)), resume="auto", progress=cfg.progress, knn=False))
        return {"top1": res["top1"], "top5": res["top5"]}, {"checkpoint": res["checkpoint"]}

    runners: Dict[str, Callable[[int], tuple]] = {
        "knn": run_knn, "linear": run_linear, "fewshot": run_fewshot, "lowshot": run_lowshot,
        "linear-moco": run_linear_moco}
    distributed_protocols = {"linear", "lowshot"}  # all ranks train; the others run on rank 0
    per_seed: Dict[str, Dict[int, Dict[str, Any]]] = {p: {} for p in cfg.protocols}
    for seed in cfg.seeds:
        for protocol in cfg.protocols:
            done = store.get(protocol, seed)
            if done is None:
                if protocol in distributed_protocols or rank() == 0:
                    if protocol in ("knn", "linear", "fewshot"):
                        feats(seed)  # extraction (all ranks share it) is not part of the protocol's time
                    logger.info("%s, seed %d ...", protocol, seed)
                    t0 = time.perf_counter()
                    metrics, details = runners[protocol](seed)
                    seconds = time.perf_counter() - t0
                    store.put(protocol, seed, metrics, seconds, details)
                    logger.info("%s, seed %d: %s (%.1f s)", protocol, seed,
                                ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()), seconds)
                elif protocol in ("knn", "fewshot"):
                    feats(seed)  # keep the ranks' collective extraction in step
                _barrier()
                done = store.get(protocol, seed)
            per_seed[protocol][seed] = done
    rows: List[ResultRow] = []
    for protocol in cfg.protocols:
        entries = [per_seed[protocol][s] for s in cfg.seeds]
        for metric in entries[0]["metrics"]:
            values: List[float] = []
            for e in entries:
                v = e["metrics"][metric]
                values.extend(v if isinstance(v, list) else [v])
            rows.append(make_row(protocol, metric, values, [e["seconds"] for e in entries]))
    default_name = (f"moco-zoo-synthetic-{cfg.synthetic_images}-{cfg.synthetic_size}px" if cfg.data == "synthetic"
                    else root.name)
    meta = {"backbone": cfg.backbone, "arch": cfg.arch, "dataset": cfg.dataset_name or default_name,
            "data": str(root), "seeds": list(cfg.seeds), "world_size": world_size(),
            "feature_extraction_seconds": feature_seconds, "config": cfg.to_dict(),
            "details": {p: {str(s): per_seed[p][s].get("details") for s in cfg.seeds} for p in cfg.protocols}}
    if rank() == 0:
        write_results(out, rows, meta)
    _barrier()

    return {**meta, "results": [asdict(r) for r in rows]}


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return f"{sum(v) / len(v):.2f} (mean of {len(v)})"
    return f"{v:.2f}" if isinstance(v, float) else str(v)
