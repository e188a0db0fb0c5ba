"""Configuration of a MoCo pretraining run: YAML presets, a config file, flags and ``KEY=VALUE`` overrides.

The same system as the transfer configs (OmegaConf structured configs over :class:`MocoConfig`), merged in one
place, :func:`resolve`: schema defaults -> preset (``moco_zoo/pretrain/configs/<name>.yaml``; ``paper-v1`` and
``paper-v2`` reproduce the papers, ``cpu-small`` holds the small-data aids) -> ``--config-file`` -> flags ->
``--set KEY=VALUE``. Without ``--preset``, ``--moco-version v1|v2`` picks ``paper-v1|paper-v2`` (MoCo v1,
arXiv:1911.05722; MoCo v2, arXiv:2003.04297) and ``--moco-version v3`` (arXiv:2104.02057) picks the v3 preset of
``--arch``: ``paper-v3-vit-small``, ``paper-v3-vit-base`` or ``paper-v3-r50`` (ResNets); ``cpu-small-v3`` holds
the v3 small-data aids. Unknown keys and wrongly typed values are errors naming the key.

Batch size and learning rate (single process and ``torchrun`` alike):

* ``--batch-size`` is the **global** batch over all ranks, as in the original code; each of the ``W`` ranks
  processes ``batch_size / W`` images per step (it must divide evenly).
* ``--lr`` is used as given (``lr_scaling: none``, as the original code), or as the lr of a global batch of 256
  scaled to ``lr * batch_size / 256`` (``lr_scaling: linear``, the cpu-small preset).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from moco_zoo.config import ConfigError, load_yaml, parse_overrides, preset_file
from moco_zoo.config import preset_names as _preset_names
from moco_zoo.config import resolve_dataclass, user_layers

from .builder_v3 import is_vit_arch

MECHANISMS = ("moco", "end2end", "memory_bank")
SHUFFLE_BN_MODES = ("auto", "ddp", "split", "off")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VERSION_PRESETS = {"v1": "paper-v1", "v2": "paper-v2", "v3": "paper-v3-r50"}  # --moco-version without --preset
V3_VIT_PRESETS = {"vit_small": "paper-v3-vit-small", "vit_base": "paper-v3-vit-base"}
OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCHEDULES = ("step", "cosine", "warmup_cosine")


def version_preset(version: str, arch: Optional[str]) -> str:
    """The paper preset of ``--moco-version`` (v3: by architecture family)."""
    if version == "v3" and arch:
        if arch in V3_VIT_PRESETS:
            return V3_VIT_PRESETS[arch]
        if is_vit_arch(arch):
            return V3_VIT_PRESETS["vit_small"]
    return VERSION_PRESETS[version]


@dataclass
class MocoConfig:
    """All settings of a pretraining run (json-able; stored in every checkpoint)."""

    data: str = "synthetic"
    arch: str = "resnet50"
    moco_version: str = "v2"
    mechanism: str = "moco"
    # model
    dim: int = 128  # output dimension of the projection head (v3: 256)
    mlp_dim: int = 4096  # v3: hidden dimension of the projector and predictor MLPs
    stop_grad_patch: bool = True  # v3 ViT: frozen random patch projection (the paper's stability fix)
    moco_k: int = 65536  # K: queue length (moco) or sampled negatives (memory_bank)
    momentum: float = 0.999  # m of the key encoder
    momentum_schedule: str = "fixed"  # fixed | cosine (m -> 1 over training)
    temperature: float = 0.2
    mlp: bool = True
    bank_momentum: float = 0.5  # memory_bank: v <- normalize(0.5 v + 0.5 k)
    # random: the original code's random unit vectors; prefill: real keys before step 0 (MoCo.prefill_dictionary)
    dict_init: str = "random"
    shuffle_bn: str = "auto"  # ddp under torchrun, off in one process (as the original on one GPU)
    shuffle_groups: int = 8  # G of the single-device split-BN emulation (like 8 GPUs of the papers)
    # data / augmentation
    aug: str = "v2"
    augment_backend: str = "pil"  # pil: whole recipe per image in the workers | batched: colour ops batched on the device
    image_size: int = 224
    crop_min: float = 0.2  # RandomResizedCrop scale lower bound (v1/v2 0.2; v3: 0.2 ResNet, 0.08 ViT)
    workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True  # only used with workers > 0
    verify_images: bool = False  # decode every training image before training; list all bad files at once
    skip_bad_images: bool = False  # train without the images that do not decode (implies the check), with a warning
    synthetic_images: int = 800  # --data synthetic: number of generated images
    synthetic_size: int = 64  # --data synthetic: generated image size
    # optimisation
    epochs: int = 200
    batch_size: int = 256  # global over all ranks
    lr: float = 0.03
    lr_scaling: str = "none"
    optimizer: str = "sgd"  # sgd (v1/v2) | lars (v3 ResNet) | adamw (v3 ViT)
    lr_schedule: str = "cosine"  # step | cosine | warmup_cosine (v3: cosine over the epochs after the warmup)
    lr_steps: List[int] = field(default_factory=lambda: [120, 160])  # of 200 epochs; scaled to --epochs
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run all epochs)
    # performance
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto
    channels_last: bool = False
    compile: bool = False
    keep_host_memory: bool = False  # glibc: reuse freed host memory (no per-step page faults), see moco_zoo.device
    # bookkeeping
    seed: int = 0
    output_dir: str = "runs/moco"
    save_every_steps: int = 0  # 0: only at epoch ends
    keep_checkpoints: int = 2
    resume: str = ""  # "" (fresh), "auto" (newest valid checkpoint in output_dir) or a checkpoint path
    log_every_steps: int = 10
    progress: bool = True
    plots: bool = True
    # kNN monitor
    knn_every: int = 1  # epochs; 0 disables
    knn_k: int = 200
    knn_t: float = 0.1
    knn_data: str = ""  # labelled ImageFolder root with train/ and val/ (default: DATA when it has them)
    knn_max_train: int = 0  # 0: all

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MocoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> "MocoConfig":
        if self.moco_version not in VERSION_PRESETS:
            raise ValueError(f"--moco-version must be one of {sorted(VERSION_PRESETS)}, got {self.moco_version!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"--mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.shuffle_bn not in SHUFFLE_BN_MODES:
            raise ValueError(f"--shuffle-bn must be one of {SHUFFLE_BN_MODES}, got {self.shuffle_bn!r}")
        if self.aug not in ("v1", "v2", "v3"):
            raise ValueError(f"--aug must be v1, v2 or v3, got {self.aug!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.moco_version != "v3" and self.optimizer != "sgd":
            raise ValueError(f"optimizer={self.optimizer} is for MoCo v3; v1/v2 use sgd")
        if not 0.0 < self.crop_min <= 1.0:
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if self.augment_backend not in ("pil", "batched"):
            raise ValueError(f"augment_backend must be pil or batched, got {self.augment_backend!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.momentum_schedule not in ("fixed", "cosine"):
            raise ValueError(f"momentum_schedule must be fixed or cosine, got {self.momentum_schedule!r}")
        if self.dict_init not in ("prefill", "random"):
            raise ValueError(f"dict_init must be prefill or random, got {self.dict_init!r}")
        if self.lr_scaling not in ("linear", "none"):
            raise ValueError(f"lr_scaling must be linear or none, got {self.lr_scaling!r}")
        if self.moco_k < 1:
            raise ValueError(f"--moco-k must be >= 1, got {self.moco_k}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"--moco-m must be in [0, 1], got {self.momentum}")
        if self.temperature <= 0:
            raise ValueError(f"--moco-t must be > 0, got {self.temperature}")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        return self


# The original main_moco.py's flags plus what the paper's mechanisms need: flag -> (config key, type/kind, help).
# kind "bool" gives --x / --no-x. Every other key is set with --set KEY=VALUE (listed in --help).
_FLAGS: Sequence[tuple] = (
    ("--arch", "arch", str, "backbone: timm name (resnet18/34/50/101, wide_resnet50_2, ...) or tv:NAME (torchvision)"),
    ("--moco-version", "moco_version", str, "v1, v2 or v3; without --preset, selects the paper preset (v3: by "
     "--arch: paper-v3-r50, paper-v3-vit-small, paper-v3-vit-base)"),
    ("--mechanism", "mechanism", str, "contrastive mechanism: moco | end2end | memory_bank (paper Fig. 3)"),
    ("--moco-dim", "dim", int, "feature dimension (128; v3 256)"),
    ("--moco-mlp-dim", "mlp_dim", int, "v3: hidden dimension of the projector / predictor MLPs (4096)"),
    ("--stop-grad-patch", "stop_grad_patch", "bool", "v3 ViT: frozen random patch projection"),
    ("--moco-k", "moco_k", int, "queue size K (moco) / sampled negatives (memory_bank)"),
    ("--moco-m", "momentum", float, "key-encoder momentum m (0.999)"),
    ("--moco-t", "temperature", float, "softmax temperature T (v1 0.07, v2 0.2)"),
    ("--mlp", "mlp", "bool", "MLP projection head (v2) instead of a linear one (v1)"),
    ("--shuffle-bn", "shuffle_bn", str, "auto | ddp | split | off (auto: ddp under torchrun, off in one process; "
     "split: the single-device emulation of G devices)"),
    ("--aug", "aug", str, "augmentation recipe: v1, v2 (aug+) or v3 (asymmetric BYOL recipe)"),
    ("--image-size", "image_size", int, "crop size (224)"),
    ("-j", "workers", int, "DataLoader worker processes per rank"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("-b", "batch_size", int, "GLOBAL batch size over all ranks (per rank: batch / world size)"),
    ("--lr", "lr", float, "learning rate (0.03; for a batch of 256 with lr_scaling=linear)"),
    ("--lr-schedule", "lr_schedule", str, "step | cosine | warmup_cosine (v3)"),
    ("--wd", "weight_decay", float, "weight decay (1e-4)"),
    ("--sgd-momentum", "sgd_momentum", float, "SGD momentum (0.9)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--precision", "precision", str, "fp32 | bf16 | fp16 | auto (autocast)"),
    ("--seed", "seed", int, "random seed"),
    ("--output-dir", "output_dir", str, "checkpoints, metrics.jsonl and plots go here"),
    ("--resume", "resume", str, "'auto' (newest valid checkpoint in --output-dir) or a checkpoint path"),
)

# config keys without a flag (set them with --set KEY=VALUE, a --config-file or a preset): (key, kind, help)
_KEYS_WITHOUT_FLAG: Sequence[tuple] = (
    ("momentum_schedule", str, "fixed | cosine (m increases to 1 over training)"),
    ("bank_momentum", float, "memory_bank: momentum of the stored features (0.5)"),
    ("dict_init", str, "random (the original code's random unit vectors) | prefill (real keys fill "
     "the queue / memory bank before step 0)"),
    ("shuffle_groups", int, "split mode: number of BN groups G (8)"),
    ("augment_backend", str, "pil (the whole recipe per image in the loader workers) | batched (colour ops on the "
     "whole batch on the training device; on the CPU with loader workers, in the workers)"),
    ("pin_memory", "bool", "pinned host memory for the loader (CUDA)"),
    ("persistent_workers", "bool", "keep loader workers between epochs (with -j > 0)"),
    ("keep_host_memory", "bool", "glibc: reuse freed host memory instead of returning it (moco_zoo.device)"),
    ("verify_images", "bool", "decode every training image first and list all bad files"),
    ("skip_bad_images", "bool", "train without images that do not decode (warns, counts them)"),
    ("synthetic_images", int, "DATA synthetic: number of images"),
    ("synthetic_size", int, "DATA synthetic: image size in pixels"),
    ("optimizer", str, "sgd (v1/v2) | lars (v3 ResNet) | adamw (v3 ViT)"),
    ("crop_min", float, "RandomResizedCrop minimum scale (0.2; v3 ViT 0.08)"),
    ("lr_scaling", str, "none (lr as given, default) | linear (lr x batch/256)"),
    ("lr_steps", "ints", "step schedule milestones in epochs of a 200-epoch run (scaled to --epochs), e.g. [120,160]"),
    ("warmup_epochs", float, "linear warmup length in epochs (0)"),
    ("max_steps", int, "stop after this many optimizer steps (0: all epochs)"),
    ("channels_last", "bool", "channels_last memory format (pays with bf16 on CPU/GPU)"),
    ("compile", "bool", "torch.compile the encoders"),
    ("save_every_steps", int, "also checkpoint every N steps (0: epoch ends only)"),
    ("keep_checkpoints", int, "number of newest step checkpoints to keep"),
    ("log_every_steps", int, "JSONL metrics every N steps"),
    ("progress", "bool", "tqdm progress bar"),
    ("plots", "bool", "PNG plots of loss and kNN accuracy"),
    ("knn_every", int, "kNN monitor every N epochs (0: off)"),
    ("knn_k", int, "kNN neighbours (200)"),
    ("knn_t", float, "kNN temperature (0.1)"),
    ("knn_data", str, "labelled ImageFolder root with train/ and val/ for the kNN monitor"),
    ("knn_max_train", int, "cap on kNN memory images (0: all)"),
)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Parser whose defaults are all ``None`` so that presets apply unless a flag is given."""
    p = parser or argparse.ArgumentParser(
        description="MoCo v1/v2/v3 pretraining (arXiv:1911.05722, arXiv:2003.04297, arXiv:2104.02057)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys without a flag (--set KEY=VALUE):\n" + "\n".join(
            f"  {key:<18} {help_}" for key, _, help_ in _KEYS_WITHOUT_FLAG),
    )
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root (DATA/train/<class>/* or DATA/<class>/*), "
                   "or 'synthetic' to generate the embedded data set")
    p.add_argument("--preset", default=None, help=f"config preset: {', '.join(preset_names())} (default: "
                   "paper-v2, or the paper preset of --moco-version)")
    p.add_argument("--config-file", default=None, help="YAML file of config keys applied after the preset")
    p.add_argument("--debug", action="store_true", default=None, help="show the traceback of an error")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys (values parsed as YAML), e.g. --set knn_every=5 lr_steps=[60,80]")
    for flag, name, kind, help_ in _FLAGS:
        extra = [f"--{name.replace('_', '-')}"] if flag in ("-j", "-b") else []
        if name == "output_dir":
            extra = ["--out"]  # deprecated alias
        if kind == "bool":
            p.add_argument(flag, *extra, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif kind == "ints":
            p.add_argument(flag, *extra, dest=name, type=int, nargs="+", default=None, help=help_)
        else:
            p.add_argument(flag, *extra, dest=name, type=kind, default=None, help=help_)
    return p


def preset_names() -> List[str]:
    return _preset_names(CONFIG_DIR)


def resolve(preset: Optional[str] = None, config_file: Optional[str] = None, flags: Optional[Dict[str, Any]] = None,
            overrides: Optional[Dict[str, Any]] = None) -> MocoConfig:
    """The resolved config (see the module docstring for the order)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if preset is None:
        version = flags.get("moco_version") or (overrides or {}).get("moco_version") or MocoConfig.moco_version
        if version not in VERSION_PRESETS:
            raise ConfigError(f"--moco-version must be one of {sorted(VERSION_PRESETS)}, got {version!r}")
        preset = version_preset(version, flags.get("arch") or (overrides or {}).get("arch"))
    path = preset_file(CONFIG_DIR, preset)
    layers = [(load_yaml(path), str(path))] + user_layers(config_file, flags, overrides)
    return resolve_dataclass(MocoConfig, layers).validate()


def config_from_args(args: argparse.Namespace) -> MocoConfig:
    """Preset < config file < explicit flags < ``--set``."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "debug"}
    data = given.pop("data", None)
    given.pop("data", None)
    preset, config_file = given.pop("preset", None), given.pop("config_file", None)
    overrides = parse_overrides(given.pop("overrides", []))
    if data is not None:
        given["data"] = data
    return resolve(preset, config_file, given, overrides)


def make_config(preset: Optional[str] = None, **overrides: Any) -> MocoConfig:
    """Programmatic equivalent of the CLI: ``preset`` (default: the paper preset of ``moco_version``), then
    ``overrides``."""
    try:
        return resolve(preset, None, None, overrides)
    except ConfigError as e:
        if "unknown config key" in str(e):
            raise TypeError(str(e)) from None
        raise


def to_yaml(cfg: MocoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
