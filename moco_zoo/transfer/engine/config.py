"""Transfer configs: defaults, presets (``paper``, ``paper-8img``, ``cpu``, COCO ``paper-2x`` ...) and overrides.

A config is a flat dict of plain values (json-able). Resolution order: task defaults -> preset -> YAML file
(``--config``) -> explicit CLI flags -> ``--set key=value`` (value parsed as YAML). Changing ``iters`` without
giving ``steps`` scales the preset's lr steps by the same factor (e.g. ``--iters 12000`` on the VOC paper preset
gives steps 9000/11000). Unknown keys and values of the
wrong type are errors naming the key. The resolved config is saved with every run (``config.json``).

The paper values follow the MoCo detectron2 configs (see the module docs of :mod:`moco_zoo.transfer.modeling.detector`):
VOC07+12: 24k iterations, batch 16, lr 0.02, steps 18k/22k, warmup 100, train short side 480..800 step 32, test 800.
COCO: 1x = 90k iterations (steps 60k/80k), 2x = 180k (120k/160k), train short side 640..800, test 800.
``paper-8img`` halves the batch, doubles every iteration count and halves the lr (the paper's fewer-GPU recipe).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

TASKS = ("voc_det", "coco_det")


def _range(lo: int, hi: int, step: int) -> List[int]:
    return list(range(lo, hi + 1, step))


# Values shared by every task; a preset or the user overrides any of them.
COMMON: Dict[str, Any] = {
    # model
    "arch": None,  # None: the architecture the (first) weights report, else resnet50
    "detector": "c4",  # c4 | fpn
    "norm": "syncbn",  # bn | syncbn | frozen
    "mask": False,
    "roi_resolution": 14,  # C4 RoIAlign output (res5 then halves it)
    "anchor_sizes": [32, 64, 128, 256, 512],
    "anchor_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 12000,
    "rpn_pre_nms_top_n_test": 6000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_batch_size_per_image": 256,
    "box_batch_size_per_image": 512,
    "box_detections_per_img": 100,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    # input
    "min_size_train": _range(480, 800, 32),
    "min_size_test": 800,
    "max_size": 1333,
    "flip_prob": 0.5,
    # solver
    "iters": 24000,
    "batch_size": 16,  # global batch over all ranks
    "batch_per_rank": None,  # if set, the global batch is batch_per_rank x world size
    "lr": 0.02,  # the lr for lr_reference_batch images; the lr used is scaled linearly with the global batch
    "lr_reference_batch": 16,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "weight_decay_norm": 0.0,
    "warmup_iters": 100,
    "warmup_factor": 0.001,
    "steps": [18000, 22000],
    "gamma": 0.1,
    "clip_grad_norm": None,
    "precise_bn_iters": 200,  # recompute BN statistics before testing (detectron2 PreciseBN), 0 disables
    # run
    "seed": 0,
    "device": "auto",
    "precision": "auto",  # auto | fp32 | bf16 | fp16
    "threads": None,  # torch.set_num_threads per process (None: leave PyTorch's default)
    "workers": 4,
    "checkpoint_period": 2000,
    "log_period": 20,
    "test_batch_size": 1,
    "max_train_images": None,
    "max_test_images": None,
    "num_vis": 6,  # sample prediction images written after testing
    "vis_score_thresh": 0.5,
    "find_unused_parameters": False,
    "allow_pickle": False,
}

TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "voc_det": {
        "train_sets": ["2007-trainval", "2012-trainval"],
        "test_set": "2007-test",
        "train_use_difficult": True,  # detectron2's VOC loader (used by MoCo) trains on difficult objects
        "use_07_metric": True,
    },
    "coco_det": {
        "detector": "fpn",
        "mask": True,
        "train_split": "train2017",
        "test_split": "val2017",
        "min_size_train": _range(640, 800, 32),
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "iters": 90000,
        "steps": [60000, 80000],
        "warmup_iters": 1000,
        "checkpoint_period": 5000,
    },
}

_CPU = {
    "min_size_train": [128, 144, 160],
    "min_size_test": 160,
    "max_size": 267,
    "roi_resolution": 8,
    "anchor_sizes": [16, 32, 64, 128, 256],
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_train": 256,
    "rpn_post_nms_top_n_test": 100,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 16,  # the C4 res5 head runs once per RoI: the main CPU cost
    "box_detections_per_img": 20,
    "batch_size": 4,
    "lr": 0.02,
    "lr_reference_batch": 4,
    "warmup_iters": 20,
    "precise_bn_iters": 0,
    "workers": 0,
    "checkpoint_period": 100,
    "log_period": 5,
    "norm": "syncbn",
}

PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "voc_det": {
        "paper": {},
        "paper-8img": {"batch_size": 8, "lr": 0.01, "lr_reference_batch": 8, "iters": 48000,
                       "steps": [36000, 44000], "warmup_iters": 200, "checkpoint_period": 4000},
        "cpu": dict(_CPU, iters=300, steps=[220, 270]),
    },
    "coco_det": {
        "paper": {},  # 1x
        "paper-2x": {"iters": 180000, "steps": [120000, 160000]},
        "paper-8img": {"batch_size": 8, "lr": 0.01, "lr_reference_batch": 8, "iters": 180000,
                       "steps": [120000, 160000], "warmup_iters": 2000, "checkpoint_period": 10000},
        "paper-8img-2x": {"batch_size": 8, "lr": 0.01, "lr_reference_batch": 8, "iters": 360000,
                          "steps": [240000, 320000], "warmup_iters": 2000, "checkpoint_period": 10000},
        "cpu": dict(_CPU, iters=300, steps=[220, 270]),
    },
}

# Keys whose value may be None or of this type in addition to the default's type.
_OPTIONAL = {"arch": str, "batch_per_rank": int, "clip_grad_norm": float, "threads": int,
             "max_train_images": int, "max_test_images": int}
_CHOICES = {"detector": ("c4", "fpn"), "norm": ("bn", "syncbn", "frozen"),
            "precision": ("auto", "fp32", "bf16", "fp16")}


class ConfigError(ValueError):
    """Bad config key or value; the message names the key (and the file when it came from one)."""


def defaults(task: str) -> Dict[str, Any]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: expected one of {TASKS}")
    cfg = copy.deepcopy(COMMON)
    cfg.update(copy.deepcopy(TASK_DEFAULTS[task]))
    return cfg


def preset_names(task: str) -> List[str]:
    return list(PRESETS[task])


def _check_value(key: str, value: Any, reference: Any, source: str) -> Any:
    where = f"{source}: " if source else ""
    if value is None:
        if key in _OPTIONAL or reference is None:
            return None
        raise ConfigError(f"{where}config key {key!r} cannot be null")
    expected = _OPTIONAL.get(key, type(reference) if reference is not None else None)
    if expected is None:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is list and isinstance(value, tuple):
        value = list(value)
    if expected is list and not isinstance(value, list):
        value = [value]
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}config key {key!r} expects {expected.__name__}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where}config key {key!r} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


def apply(cfg: Dict[str, Any], updates: Dict[str, Any], source: str = "") -> Dict[str, Any]:
    """Set ``updates`` into ``cfg`` (in place, returned) after checking keys and types."""
    ref = defaults(cfg["task"]) if "task" in cfg else cfg
    for key, value in updates.items():
        if key not in ref:
            raise ConfigError(f"{source + ': ' if source else ''}unknown config key {key!r}; valid keys: "
                              f"{', '.join(sorted(k for k in ref if k != 'task'))}")
        cfg[key] = _check_value(key, value, ref[key], source)
    return cfg


def parse_set(items: Iterable[str]) -> Dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as YAML (``steps=[200,250]``, ``arch=resnet18``)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot parse the value ({e})") from None
    return out


def load_yaml(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys")
    return data


def resolve(task: str, preset: Optional[str] = None, config_file: Optional[str] = None,
            overrides: Optional[Dict[str, Any]] = None, sets: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The resolved config for ``task`` (see module docstring for the precedence)."""
    cfg = defaults(task)
    cfg["task"] = task
    preset = preset or "paper"
    if preset not in PRESETS[task]:
        raise ConfigError(f"unknown preset {preset!r} for {task}: expected one of {', '.join(PRESETS[task])}")
    cfg["preset"] = preset
    apply(cfg, copy.deepcopy(PRESETS[task][preset]), f"preset {preset}")
    preset_iters, preset_steps = cfg["iters"], list(cfg["steps"])
    user: Dict[str, Any] = {}
    if config_file:
        data = load_yaml(config_file)
        data.pop("task", None)
        data.pop("preset", None)
        apply(cfg, data, str(config_file))
        user.update(data)
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    apply(cfg, cli, "command line")
    apply(cfg, sets or {}, "--set")
    user.update(cli)
    user.update(sets or {})
    if "iters" in user and "steps" not in user and cfg["iters"] != preset_iters:
        # a shorter/longer schedule keeps the preset's shape: lr steps scale with the iteration count
        cfg["steps"] = [max(1, int(round(s * cfg["iters"] / preset_iters))) for s in preset_steps]
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    if cfg["iters"] < 1:
        raise ConfigError(f"iters must be >= 1, got {cfg['iters']}")
    if cfg["batch_size"] < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg['batch_size']}")
    if any(s <= 0 for s in cfg["min_size_train"]) or cfg["min_size_test"] <= 0:
        raise ConfigError("min_size_train / min_size_test must be positive")
    if cfg["lr"] <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    if sorted(cfg["steps"]) != list(cfg["steps"]):
        raise ConfigError(f"steps must be increasing, got {cfg['steps']}")


def effective_batch(cfg: Dict[str, Any], world_size: int) -> tuple:
    """(global batch, per-rank batch, lr after the linear scaling rule)."""
    if cfg.get("batch_per_rank"):
        per_rank = int(cfg["batch_per_rank"])
        total = per_rank * world_size
    else:
        total = int(cfg["batch_size"])
        if total % world_size:
            raise ConfigError(f"batch_size {total} is not divisible by the {world_size} processes; pass a multiple "
                              f"of {world_size} or set batch_per_rank")
        per_rank = total // world_size
    lr = float(cfg["lr"]) * total / float(cfg["lr_reference_batch"])
    return total, per_rank, lr


def dump(cfg: Dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True)
