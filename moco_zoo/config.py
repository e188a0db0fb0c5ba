"""The project's one config system: OmegaConf structured configs (a dataclass is the schema), YAML presets with
``_base_`` inheritance, ``KEY=VALUE`` overrides, and errors that name the key and where it came from. Pretraining
(:mod:`moco_zoo.pretrain.config`, the linear probe), transfer (:mod:`moco_zoo.transfer.config`) and evaluation
(:mod:`moco_zoo.evaluation.config`) build on these pieces."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad config key, value or file; the message names the key and the file or flag it came from."""


def load_yaml(path: Path) -> Dict[str, Any]:
    """A YAML mapping of config keys; ``_base_: other.yaml`` (relative to the file) is merged first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base:
        merged = load_yaml(path.parent / base)
        merged.update(data)
        data = merged
    return data


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as YAML (``steps=[200,250]``, ``arch=resnet18``)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value ({str(e).splitlines()[0]})") from None
    return out


def merge_layers(cfg: DictConfig, layers: Iterable[Tuple[Dict[str, Any], str]], *,
                 what: str = "") -> Dict[str, Any]:
    """Set each ``(updates, source)`` layer into the typed ``cfg`` in order; returns every key the layers set.

    A key the schema lacks, or a value OmegaConf cannot convert to the key's type, is a :class:`ConfigError`
    naming the key and the layer's source. A single value for a list key becomes a one-element list."""
    valid = set(cfg.keys())
    given: Dict[str, Any] = {}
    for updates, source in layers:
        for key, value in updates.items():
            if key not in valid:
                raise ConfigError(f"{source}: unknown config key {key!r}{what}; valid keys: "
                                  f"{', '.join(sorted(valid))}")
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(value, (str, int, float)) and OmegaConf.is_list(cfg[key]):
                value = [value]
            try:
                cfg[key] = value
            except OmegaConfBaseException as e:
                raise ConfigError(f"{source}: config key {key!r}: {str(e).splitlines()[0]}") from None
            given[key] = value
    return given


def preset_names(folder: Path) -> list:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def preset_file(folder: Path, preset: str, what: str = "") -> Path:
    """``folder/<preset>.yaml``; an unknown preset is a :class:`ConfigError` listing the known ones."""
    path = Path(folder) / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}{what}: expected one of {', '.join(preset_names(folder))}")
    return path


def user_layers(config_file: Optional[str], flags: Optional[Dict[str, Any]],
                overrides: Optional[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], str]]:
    """The layers a user adds over a preset, in order: ``--config-file``, explicit flags (``None`` = not given),
    ``--set KEY=VALUE``."""
    return [(load_yaml(Path(config_file)) if config_file else {}, str(config_file)),
            ({k: v for k, v in (flags or {}).items() if v is not None}, "command line"),
            (overrides or {}, "override")]


def resolve_dataclass(schema: Type[T], layers: Iterable[Tuple[Dict[str, Any], str]]) -> T:
    """``schema``'s defaults with ``layers`` merged in order (typed, every error naming its source)."""
    cfg = OmegaConf.structured(schema)
    merge_layers(cfg, layers)
    return schema(**OmegaConf.to_container(cfg))
