"""Configuration of ``moco-zoo eval``: one :class:`EvalConfig` (the schema) resolved as every config of the project
(:mod:`moco_zoo.config`): schema defaults -> preset (``moco_zoo/evaluation/configs/<name>.yaml``; ``paper`` keeps
the protocols' published settings, ``cpu-small`` holds the small-data aids) -> ``--config-file`` -> flags ->
``--set KEY=VALUE``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from moco_zoo.config import ConfigError, load_yaml, parse_overrides, preset_file
from moco_zoo.config import preset_names as _preset_names
from moco_zoo.config import resolve_dataclass, user_layers

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROTOCOLS = ("knn", "linear", "fewshot", "lowshot", "linear-moco")
BN_POLICIES = ("eval", "recalibrate")


@dataclass
class EvalConfig:
    """All settings of an evaluation run (json-able; recorded in results.json)."""

    backbone: str = ""  # any spec moco_zoo.load_backbone takes
    arch: str = ""  # needed for "random"; otherwise inferred from the weights
    data: str = "synthetic"  # ImageFolder root with train/ and val/ (val is the test split), or "synthetic"
    dataset_name: str = ""  # name in the tables and the model card (default: the data folder's name)
    protocols: List[str] = field(default_factory=lambda: ["knn", "linear", "fewshot", "lowshot"])
    seeds: List[int] = field(default_factory=lambda: [0])
    output_dir: str = "runs/eval"
    # feature extraction (frozen backbone)
    image_size: int = 224
    batch_size: int = 256  # extraction batch (larger than training batches: no gradients are kept)
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CPUs with native bf16 and on CUDA, else fp32
    channels_last: bool = True
    bn: str = "eval"  # eval: the backbone's running statistics | recalibrate: re-estimated on the train images
    cache_dir: str = ""  # feature cache (default: <output_dir>/feature_cache)
    chunk_size: int = 1024  # images per cache file (the unit of resumption)
    synthetic_images: int = 800
    synthetic_size: int = 64
    progress: bool = True
    # kNN (Wu et al. 2018; DINO's k and T)
    knn_k: List[int] = field(default_factory=lambda: [10, 20, 200])
    knn_t: float = 0.07
    # linear sweep on cached features
    linear_lrs: List[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    linear_wds: List[float] = field(default_factory=lambda: [0.0, 1e-5, 1e-4])
    linear_epochs: int = 100
    linear_batch_size: int = 256  # global over ranks
    linear_momentum: float = 0.9
    val_fraction: float = 0.1  # of every train class, held out to choose the head
    split_seed: int = 0  # the validation split is the same for every seed
    # few-shot logistic regression on L2-normalised frozen features
    fewshot_shots: List[int] = field(default_factory=lambda: [1, 2, 5, 10])
    fewshot_percents: List[float] = field(default_factory=list)
    fewshot_tries: int = 5  # draws per seed
    fewshot_c: float = 1.0  # inverse L2 regularisation strength of scikit-learn's LogisticRegression
    # low-shot fine-tuning of the whole network (SimCLR's semi-supervised recipe, arXiv:2002.05709 App. B.5)
    lowshot_percents: List[float] = field(default_factory=lambda: [1.0, 10.0])
    lowshot_split_files: List[str] = field(default_factory=list)  # e.g. ImageNet 1percent.txt; replace the percents
    lowshot_epochs: List[int] = field(default_factory=lambda: [60, 30])  # per percent (1%: 60, 10%: 30)
    lowshot_batch_size: int = 256  # global over ranks
    lowshot_lr: float = 0.05  # x batch/256
    lowshot_momentum: float = 0.9
    lowshot_weight_decay: float = 0.0
    # the standard MoCo linear protocol with live augmentation (moco_zoo.pretrain.lincls)
    moco_linear_epochs: int = 100
    moco_linear_batch_size: int = 256

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "EvalConfig":
        if not self.backbone:
            raise ConfigError("no backbone given: pass BACKBONE (zoo name, hf-hub:ORG/REPO, checkpoint, random, "
                              "torchvision-supervised)")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"unknown protocol(s) {bad or self.protocols}: expected some of {', '.join(PROTOCOLS)}")
        if self.bn not in BN_POLICIES:
            raise ConfigError(f"bn must be one of {BN_POLICIES}, got {self.bn!r}")
        if not self.seeds:
            raise ConfigError("seeds: need at least one seed")
        if any(k < 1 for k in self.knn_k) or self.knn_t <= 0:
            raise ConfigError(f"knn_k must be >= 1 and knn_t > 0, got {self.knn_k} / {self.knn_t}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.linear_lrs or not self.linear_wds:
            raise ConfigError("linear_lrs and linear_wds need at least one value each")
        if any(s < 1 for s in self.fewshot_shots) or any(not 0 < p <= 100 for p in self.fewshot_percents):
            raise ConfigError("fewshot_shots must be >= 1 and fewshot_percents in (0, 100]")
        if any(not 0 < p <= 100 for p in self.lowshot_percents):
            raise ConfigError(f"lowshot_percents must be in (0, 100], got {self.lowshot_percents}")
        n_sets = len(self.lowshot_split_files) or len(self.lowshot_percents)
        if len(self.lowshot_epochs) not in (1, n_sets):
            raise ConfigError(f"lowshot_epochs needs one value or one per subset ({n_sets}), got {self.lowshot_epochs}")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ConfigError("chunk_size and batch_size must be >= 1")
        return self


def preset_names() -> List[str]:
    return _preset_names(CONFIG_DIR)


def resolve(preset: Optional[str] = None, config_file: Optional[str] = None, flags: Optional[Dict[str, Any]] = None,
            overrides: Optional[Dict[str, Any]] = None) -> EvalConfig:
    preset = preset or "paper"
    path = preset_file(CONFIG_DIR, preset)
    layers = [(load_yaml(path), str(path))] + user_layers(config_file, flags, overrides)
    return resolve_dataclass(EvalConfig, layers).validate()


def make_config(preset: Optional[str] = None, **overrides: Any) -> EvalConfig:
    """Programmatic equivalent of the CLI."""
    return resolve(preset, None, None, overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``moco-zoo eval`` (defaults None: presets apply unless a flag is given)."""
    p.add_argument("backbone", help="zoo name, hf-hub:ORG/REPO, checkpoint path, torchvision-supervised or random")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (val = test split), or "
                   "'synthetic' for the embedded data (default)")
    p.add_argument("-a", "--arch", default=None, help="timm architecture (required for 'random')")
    p.add_argument("--protocols", default=None, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help=f"comma-separated subset of {','.join(PROTOCOLS)} (default: knn,linear,fewshot,lowshot)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds; every protocol reports mean +- std")
    p.add_argument("--output-dir", default=None, help="results.json/.csv/.md, per-seed results and the feature cache")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 | fp16 (feature extraction autocast)")
    p.add_argument("-j", "--workers", type=int, default=None)
    p.add_argument("--bn", default=None, help="BN policy of the frozen backbone: eval | recalibrate")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--preset", default=None, help=f"config preset: {', '.join(preset_names())} (default: paper)")
    p.add_argument("--config-file", default=None, help="YAML file of config keys applied after the preset")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys (YAML values), e.g. --set linear_epochs=20 knn_k=[10,20]")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    given = {k: v for k, v in vars(args).items() if v is not None}
    for k in ("debug", "func", "command"):
        given.pop(k, None)
    preset, config_file = given.pop("preset", None), given.pop("config_file", None)
    overrides = parse_overrides(given.pop("overrides", []))
    return resolve(preset, config_file, given, overrides)
