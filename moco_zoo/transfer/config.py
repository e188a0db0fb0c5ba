"""Transfer configs: one typed schema per task family, YAML presets beside the code, ``KEY=VALUE`` overrides.

Built on OmegaConf structured configs. A config is merged in one place, :func:`resolve`, in this order:
schema defaults -> ``configs/<task>/<preset>.yaml`` (a preset may start from another with ``_base_: other.yaml``)
-> ``--config-file`` YAML -> explicit CLI flags -> ``KEY=VALUE`` overrides. Unknown keys and values of the wrong
type are errors naming the key and where it came from; a detection key given to segmentation is unknown too.
Changing ``iters`` without giving ``steps`` scales the preset's lr steps by the same factor (``iters=12000`` on the
VOC paper preset gives steps 9000/11000). The resolved config is saved with every run (``config.yaml``).

Paper values: the MoCo detectron2 configs (VOC07+12: 24k iterations, batch 16, lr 0.02, steps 18k/22k, warmup 100,
train short side 480..800 step 32, test 800; COCO 1x = 90k iterations, steps 60k/80k, train 640..800), and for VOC
semantic segmentation the FCN protocol of SSL papers (mmsegmentation ``fcn_r50-d8`` VOC2012: output stride 8,
512 crops, batch 16, lr 0.01, poly 0.9, 20k iterations). ``cpu`` presets are small-data aids for the embedded sets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

from omegaconf import DictConfig, OmegaConf

from moco_zoo.config import ConfigError, load_yaml, merge_layers, parse_overrides, preset_file
from moco_zoo.config import preset_names as _preset_names
from moco_zoo.config import user_layers

__all__ = ["ConfigError", "TransferConfig", "DetectionConfig", "SegmentationConfig", "resolve", "validate",
           "effective_batch", "preset_names", "parse_overrides", "schema_keys", "to_yaml", "to_dict"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TASKS = ("voc_det", "coco_det", "voc_seg")
_CHOICES = {
    "detector": ("c4", "fpn"), "norm": ("bn", "syncbn", "frozen"), "precision": ("auto", "fp32", "bf16", "fp16"),
    "lr_schedule": ("step", "poly"), "output_stride": (8, 16, 32), "engine": ("torchvision", "detectron2"),
    "class_weighting": ("none", "median_frequency"),
}


def _range(lo: int, hi: int, step: int) -> List[int]:
    return list(range(lo, hi + 1, step))


@dataclass
class TransferConfig:
    """Keys shared by every task. ``batch_size`` is global over all processes; the lr used is
    ``lr * batch_size / lr_reference_batch`` (the linear scaling rule)."""

    task: str = "voc_det"
    preset: str = "paper"
    engine: str = "torchvision"
    # model
    arch: Optional[str] = None  # None: the architecture the (first) weights report, else resnet50
    norm: str = "syncbn"
    # data
    max_train_images: Optional[int] = None
    max_test_images: Optional[int] = None
    flip_prob: float = 0.5
    # solver
    iters: int = 24000
    batch_size: int = 16
    batch_per_rank: Optional[int] = None  # if set, the global batch is batch_per_rank x world size
    lr: float = 0.02
    lr_reference_batch: int = 16
    lr_schedule: str = "step"  # step: x gamma at each of steps | poly: (1 - it/iters) ** poly_power
    steps: List[int] = field(default_factory=lambda: [18000, 22000])
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    clip_grad_norm: Optional[float] = None
    precise_bn_iters: int = 200  # recompute BN statistics before testing (detectron2 PreciseBN); 0 disables
    # run
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False  # NHWC weights and activations (oneDNN bf16 / tensor cores run NHWC natively)
    threads: Optional[int] = None
    workers: int = 4
    checkpoint_period: int = 2000
    eval_period: int = 0  # also evaluate every N iterations (learning curves); 0: only at the end
    log_period: int = 20
    test_batch_size: int = 1
    num_vis: int = 6  # sample predictions drawn after testing
    find_unused_parameters: bool = False
    allow_pickle: bool = False


@dataclass
class DetectionConfig(TransferConfig):
    """Faster / Mask R-CNN, C4 or FPN (``voc_det``, ``coco_det``)."""

    detector: str = "c4"
    mask: bool = False
    roi_resolution: int = 14
    fpn_channels: int = 256  # FPN output / RPN / box head width (FPN layout only)
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 12000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    min_size_train: List[int] = field(default_factory=lambda: _range(480, 800, 32))
    min_size_test: int = 800
    max_size: int = 1333
    vis_score_thresh: float = 0.5
    # VOC: image sets as YEAR-split; COCO: split names
    train_sets: List[str] = field(default_factory=lambda: ["2007-trainval", "2012-trainval"])
    test_sets: List[str] = field(default_factory=lambda: ["2007-test"])
    train_use_difficult: bool = True  # detectron2's VOC loader (used by MoCo) trains on difficult objects
    use_07_metric: bool = True
    train_split: str = "train2017"
    test_split: str = "val2017"


@dataclass
class SegmentationConfig(TransferConfig):
    """FCN semantic segmentation on a dilated ResNet (``voc_seg``)."""

    train_sets: List[str] = field(default_factory=lambda: ["2012-train"])
    test_sets: List[str] = field(default_factory=lambda: ["2012-val"])
    mask_dir: str = "SegmentationClass"
    crop_size: int = 512
    scale_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    output_stride: int = 8
    head_channels: int = 512
    head_convs: int = 2
    concat_input: bool = True
    dropout: float = 0.1
    head_lr_mult: float = 1.0
    class_weighting: str = "none"  # or median_frequency: cross-entropy weights from the training masks' class pixels


SCHEMAS: Dict[str, Type[TransferConfig]] = {
    "voc_det": DetectionConfig, "coco_det": DetectionConfig, "voc_seg": SegmentationConfig}


def preset_names(task: str) -> List[str]:
    _check_task(task)
    return _preset_names(CONFIG_DIR / task)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def resolve(task: str, preset: Optional[str] = None, config_file: Optional[str] = None,
            flags: Optional[Dict[str, Any]] = None, overrides: Optional[Dict[str, Any]] = None) -> DictConfig:
    """The resolved config of ``task`` (see the module docstring for the order)."""
    _check_task(task)
    preset = preset or "paper"
    what = f" for task {task}"
    path = preset_file(CONFIG_DIR / task, preset, f" for {task}")
    cfg = OmegaConf.structured(SCHEMAS[task](task=task, preset=preset))
    merge_layers(cfg, [(load_yaml(path), str(path))], what=what)
    preset_iters, preset_steps = cfg.iters, list(cfg.steps)
    layers = user_layers(config_file, flags, overrides)
    user = merge_layers(cfg, [({k: v for k, v in u.items() if k not in ("task", "preset")}, s) for u, s in layers],
                        what=what)
    if "iters" in user and "steps" not in user and cfg.iters != preset_iters:
        cfg.steps = [max(1, int(round(s * cfg.iters / preset_iters))) for s in preset_steps]
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        if key in cfg and cfg[key] not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, choices))}, got {cfg[key]!r}")
    for key in ("iters", "batch_size", "lr_reference_batch", "log_period", "checkpoint_period", "test_batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    if cfg.lr <= 0:
        raise ConfigError(f"config key 'lr' must be > 0, got {cfg.lr}")
    if list(cfg.steps) != sorted(cfg.steps):
        raise ConfigError(f"config key 'steps' must be increasing, got {list(cfg.steps)}")
    if "min_size_train" in cfg and (not cfg.min_size_train or min(cfg.min_size_train) <= 0 or cfg.min_size_test <= 0):
        raise ConfigError("config keys 'min_size_train' / 'min_size_test' must be positive")
    if "scale_range" in cfg and not (len(cfg.scale_range) == 2 and 0 < cfg.scale_range[0] <= cfg.scale_range[1]):
        raise ConfigError(f"config key 'scale_range' must be [min, max] with 0 < min <= max, got "
                          f"{list(cfg.scale_range)}")
    if not cfg.train_sets or not cfg.test_sets:
        raise ConfigError("config keys 'train_sets' and 'test_sets' must not be empty")


def effective_batch(cfg: DictConfig, world_size: int) -> Tuple[int, int, float]:
    """(global batch, per-rank batch, lr after the linear scaling rule)."""
    if cfg.batch_per_rank:
        per_rank = int(cfg.batch_per_rank)
        total = per_rank * world_size
    else:
        total = int(cfg.batch_size)
        if total % world_size:
            raise ConfigError(f"batch_size {total} is not divisible by the {world_size} processes; pass a multiple "
                              f"of {world_size} or set batch_per_rank")
        per_rank = total // world_size
    return total, per_rank, float(cfg.lr) * total / float(cfg.lr_reference_batch)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, sort_keys=True)


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def schema_keys(task: str) -> List[str]:
    """Every config key of ``task`` (for backends that must map or refuse each one)."""
    _check_task(task)
    return [f.name for f in dataclasses.fields(SCHEMAS[task])]
