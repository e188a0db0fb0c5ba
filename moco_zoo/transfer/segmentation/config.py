"""VOC semantic segmentation configs: defaults, presets and overrides (same resolution rules as detection).

Resolution order: defaults -> preset -> YAML file (``--config``) -> explicit CLI flags -> ``--set key=value`` (value
parsed as YAML). Unknown keys and values of the wrong type are errors naming the key. The resolved config is saved
with every run (``config.json``) and in its checkpoints.

Presets:
- ``paper``: the FCN protocol commonly used to evaluate self-supervised backbones on VOC (as in mmsegmentation's
  ``fcn_r50-d8`` VOC2012 config used by SSL papers): dilated ResNet (output stride 8), FCN head (2 x 3x3 conv of 512
  channels, input concatenation, dropout 0.1), 512x512 crops of images randomly rescaled x0.5..2.0, flip, batch 16,
  SGD lr 0.01 momentum 0.9 wd 5e-4, poly lr (power 0.9), 20k iterations, VOC2012 ``train`` -> ``val`` (with SBD
  augmentation use ``--set train_sets=[2012-train_aug] mask_dir=SegmentationClassAug``), single-scale test on the
  full image. The MoCo papers themselves do not report VOC segmentation; this is a well-defined common protocol.
- ``cpu``: a few-minute run on the synthetic VOC set: output stride 16, a 1-conv 128-channel head, 96 px crops,
  batch 8, 120 iterations, VOC2007 ``trainval`` -> ``test``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

DEFAULTS: Dict[str, Any] = {
    "task": "voc_seg",
    "preset": "paper",
    # data
    "train_sets": ["2012-train"],
    "val_sets": ["2012-val"],
    "mask_dir": "SegmentationClass",
    "crop_size": 512,
    "scale_range": [0.5, 2.0],
    "flip_prob": 0.5,
    "max_train_images": None,
    "max_test_images": None,
    # model
    "arch": None,  # None: the architecture the (first) weights report, else resnet50
    "output_stride": 8,
    "head_channels": 512,
    "head_convs": 2,
    "concat_input": True,
    "dropout": 0.1,
    "norm": "syncbn",
    # solver
    "iters": 20000,
    "batch_size": 16,  # global batch over all ranks
    "lr": 0.01,  # for lr_reference_batch images; scaled linearly with the global batch
    "lr_reference_batch": 16,
    "head_lr_mult": 1.0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "poly_power": 0.9,
    "warmup_iters": 0,
    "seed": 0,
    # run
    "device": None,
    "precision": "auto",
    "threads": None,
    "workers": 4,
    "log_period": 20,
    "checkpoint_period": 2000,
    "num_samples": 4,
    "allow_pickle": False,
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "train_sets": ["2007-trainval"],
        "val_sets": ["2007-test"],
        "crop_size": 96,
        "scale_range": [0.75, 1.25],
        "output_stride": 16,
        "head_channels": 128,
        "head_convs": 1,
        "concat_input": False,
        "norm": "bn",
        "iters": 120,
        "batch_size": 8,
        "lr": 0.02,
        "lr_reference_batch": 8,
        "warmup_iters": 10,
        "workers": 0,
        "log_period": 10,
        "checkpoint_period": 50,
        "num_samples": 3,
    },
}

_OPTIONAL = {"arch": str, "device": str, "threads": int, "max_train_images": int, "max_test_images": int}
_CHOICES = {"norm": ("bn", "syncbn", "frozen"), "precision": ("auto", "fp32", "bf16", "fp16"),
            "output_stride": (8, 16, 32)}


# One error type and one --set / YAML parser for every transfer script (the detection engine's).
from moco_zoo.transfer.engine.config import ConfigError, parse_set  # noqa: E402
from moco_zoo.transfer.engine.config import load_yaml as _load_yaml  # noqa: E402


def preset_names():
    return list(PRESETS)


def _check(key: str, value: Any, source: str) -> Any:
    where = f"{source}: " if source else ""
    ref = DEFAULTS[key]
    if value is None:
        if key in _OPTIONAL:
            return None
        raise ConfigError(f"{where}config key {key!r} cannot be null")
    expected = _OPTIONAL.get(key, type(ref))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if expected is list and isinstance(value, (tuple, str)):
        value = list(value) if isinstance(value, tuple) else [value]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}config key {key!r} expects {expected.__name__}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where}config key {key!r} must be one of {_CHOICES[key]}, got {value!r}")
    return value


def apply(cfg: Dict[str, Any], updates: Dict[str, Any], source: str = "") -> Dict[str, Any]:
    for key, value in updates.items():
        if key not in DEFAULTS or key in ("task", "preset"):
            raise ConfigError(f"{source + ': ' if source else ''}unknown config key {key!r}; valid keys: "
                              f"{', '.join(sorted(k for k in DEFAULTS if k not in ('task', 'preset')))}")
        cfg[key] = _check(key, value, source)
    return cfg


def load_yaml(path: str) -> Dict[str, Any]:
    data = _load_yaml(path)
    data.pop("task", None)
    data.pop("preset", None)
    return data


def resolve(preset: Optional[str] = None, config_file: Optional[str] = None,
            overrides: Optional[Dict[str, Any]] = None, sets: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    preset = preset or "paper"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    cfg["preset"] = preset
    apply(cfg, copy.deepcopy(PRESETS[preset]), f"preset {preset}")
    if config_file:
        apply(cfg, load_yaml(config_file), str(config_file))
    apply(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    apply(cfg, sets or {}, "--set")
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    for key in ("iters", "batch_size", "crop_size", "lr_reference_batch"):
        if cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    if cfg["lr"] <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    lo_hi = cfg["scale_range"]
    if len(lo_hi) != 2 or not (0 < lo_hi[0] <= lo_hi[1]):
        raise ConfigError(f"scale_range must be [min, max] with 0 < min <= max, got {lo_hi}")
    if not cfg["train_sets"] or not cfg["val_sets"]:
        raise ConfigError("train_sets and val_sets must not be empty")


def effective_batch(cfg: Dict[str, Any], world_size: int):
    """(global batch, per-rank batch, lr after the linear scaling rule)."""
    total = int(cfg["batch_size"])
    if total % world_size:
        raise ConfigError(f"batch_size {total} is not divisible by the {world_size} processes")
    return total, total // world_size, float(cfg["lr"]) * total / float(cfg["lr_reference_batch"])


def dump(cfg: Dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True)
