"""The zoo's single source of truth: ``hub_configs/*.yaml`` read into typed entries.

One YAML file per released model. Each file gives one backbone entry (``model.tag``, e.g. ``moco_r50.v2_800ep``) and,
where the authors released linear-probe checkpoints (MoCo v3), one classifier entry per checkpoint
(``moco_r50.v3_300ep_lincls_in1k``). The timm registration (:mod:`moco_zoo.models`), ``moco-zoo list``, the model
cards and ``moco-zoo publish`` all read these entries; nothing is repeated by hand elsewhere.

The folder is located, in order, from ``$MOCO_ZOO_CONFIGS``, the repository's ``hub_configs/`` next to the package,
or the installed ``<prefix>/share/moco-zoo/hub_configs``.
"""
from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

__all__ = [
    "ZooSource",
    "HubInfo",
    "PaperInfo",
    "ZooEntry",
    "ZooConfigError",
    "configs_dir",
    "load_entry",
    "entries",
    "backbone_entries",
    "classifier_entries",
    "find_entry",
    "model_names",
    "default_entry",
    "clear_cache",
]

ENV_CONFIGS = "MOCO_ZOO_CONFIGS"
BACKBONE = "backbone"
CLASSIFIER = "classifier"


class ZooConfigError(ValueError):
    """A hub_configs file is missing a field or has an invalid value; the message names the file."""


@dataclass(frozen=True)
class ZooSource:
    """Where the authors published the original checkpoint."""

    url: str
    filename: str
    md5_prefix: Optional[str] = None
    format: str = ""
    origin_url: Optional[str] = None


@dataclass(frozen=True)
class HubInfo:
    repo_id: str
    published: bool = False


@dataclass(frozen=True)
class PaperInfo:
    title: str
    arxiv: str
    citation: str = ""

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


@dataclass(frozen=True)
class ZooEntry:
    """One loadable zoo weight set (a headless backbone, or a classifier with its trained linear head)."""

    model: str  # registered timm model name, e.g. "moco_r50"
    tag: str  # pretrained tag, e.g. "v2_800ep"
    architecture: str  # plain timm architecture of the backbone, e.g. "resnet50"
    model_args: Dict[str, Any]
    moco_version: str
    description: str
    license: str
    dataset: str
    hub: HubInfo
    source: ZooSource
    paper: PaperInfo
    recipe: Dict[str, Any]
    metrics: Dict[str, Any]
    metrics_source: str = ""
    kind: str = BACKBONE  # "backbone" | "classifier"
    num_classes: int = 0
    default: bool = False
    config_path: Optional[str] = None
    parent_tag: Optional[str] = None  # for classifiers: the backbone tag they were trained on
    classifiers: Tuple["ZooEntry", ...] = field(default=(), repr=False, compare=False)

    @property
    def name(self) -> str:
        """``model.tag``, the name ``timm.create_model`` accepts."""
        return f"{self.model}.{self.tag}"

    @property
    def arch(self) -> str:
        """timm architecture name that rebuilds this backbone with default kwargs.

        The plain timm name when no extra ``model_args`` are needed (``resnet50``, ``vit_base_patch16_224``), else
        the registered MoCo model (``moco_vit_small``: timm's ViT-S has 6 heads, MoCo v3's has 12).
        """
        return self.model if self.model_args else self.architecture

    @property
    def is_classifier(self) -> bool:
        return self.kind == CLASSIFIER

    @property
    def published(self) -> bool:
        return self.hub.published

    @property
    def imagenet_top1(self) -> Optional[float]:
        for k in ("imagenet_linear_top1", "imagenet_top1"):
            if k in self.metrics:
                return float(self.metrics[k])
        return None


# ---------------------------------------------------------------------------------------------------------- location


def _candidate_dirs() -> List[Path]:
    out: List[Path] = []
    env = os.environ.get(ENV_CONFIGS)
    if env:
        out.append(Path(env))
    out.append(Path(__file__).resolve().parent.parent / "hub_configs")
    prefixes = [sys.prefix, sys.base_prefix, sysconfig.get_paths().get("data", "")]
    try:
        prefixes.append(site.getuserbase())
    except Exception:
        pass
    for p in prefixes:
        if p:
            out.append(Path(p) / "share" / "moco-zoo" / "hub_configs")
    return out


def configs_dir() -> Path:
    """The hub_configs folder in use (see module docstring for the search order)."""
    env = os.environ.get(ENV_CONFIGS)
    if env:
        if not Path(env).is_dir():
            raise ZooConfigError(f"${ENV_CONFIGS}={env}: not a directory")
        return Path(env)
    for d in _candidate_dirs():
        if d.is_dir() and any(d.glob("*.yaml")):
            return d
    raise ZooConfigError(
        "cannot find hub_configs/: set $MOCO_ZOO_CONFIGS or reinstall moco-zoo (searched "
        + ", ".join(str(d) for d in _candidate_dirs())
        + ")"
    )


# ------------------------------------------------------------------------------------------------------------ parsing


def _req(d: Dict[str, Any], key: str, path: Path, where: str = "") -> Any:
    if not isinstance(d, dict) or key not in d or d[key] is None:
        raise ZooConfigError(f"{path}: missing required field {where + key!r}")
    return d[key]


def _source(d: Dict[str, Any], path: Path, where: str, fmt: str, origin: Optional[str]) -> ZooSource:
    url = str(_req(d, "url", path, where))
    md5 = d.get("md5_prefix")
    return ZooSource(
        url=url,
        filename=str(d.get("filename") or url.rsplit("/", 1)[-1]),
        md5_prefix=str(md5).lower() if md5 else None,
        format=str(d.get("format") or fmt),
        origin_url=d.get("origin_url") or origin,
    )


def load_entry(path: os.PathLike) -> ZooEntry:
    """Parse one hub_configs file (its classifier entries are in ``entry.classifiers``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ZooConfigError(f"{path}: cannot read zoo config ({e})") from e
    if not isinstance(data, dict):
        raise ZooConfigError(f"{path}: expected a mapping at top level")
    hub = _req(data, "hub", path)
    paper = _req(data, "paper", path)
    src = _source(_req(data, "source", path), path, "source.", "", None)
    model_args = data.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ZooConfigError(f"{path}: model_args must be a mapping")
    base = ZooEntry(
        model=str(_req(data, "model", path)),
        tag=str(_req(data, "tag", path)),
        architecture=str(_req(data, "architecture", path)),
        model_args=dict(model_args),
        moco_version=str(_req(data, "moco_version", path)),
        description=str(data.get("description") or ""),
        license=str(_req(data, "license", path)),
        dataset=str(data.get("dataset") or "imagenet-1k"),
        hub=HubInfo(repo_id=str(_req(hub, "repo_id", path, "hub.")), published=bool(hub.get("published", False))),
        source=src,
        paper=PaperInfo(
            title=str(_req(paper, "title", path, "paper.")),
            arxiv=str(_req(paper, "arxiv", path, "paper.")),
            citation=str(paper.get("citation") or "").strip(),
        ),
        recipe=dict(data.get("recipe") or {}),
        metrics=dict(data.get("metrics") or {}),
        metrics_source=str(data.get("metrics_source") or ""),
        default=bool(data.get("default", False)),
        config_path=str(path),
    )
    classifiers = []
    for i, c in enumerate(data.get("classifiers") or []):
        where = f"classifiers[{i}]."
        tag = str(_req(c, "tag", path, where))
        hub_c = c.get("hub") or {}
        classifiers.append(
            replace(
                base,
                tag=tag,
                kind=CLASSIFIER,
                num_classes=int(_req(c, "num_classes", path, where)),
                description=str(c.get("description") or f"{base.description}; linear classifier (frozen backbone)"),
                hub=HubInfo(
                    repo_id=str(hub_c.get("repo_id") or f"{base.hub.repo_id.rsplit('.', 1)[0]}.{tag}"),
                    published=bool(hub_c.get("published", False)),
                ),
                source=_source(c, path, where, "classifier", base.source.origin_url),
                metrics=dict(c.get("metrics") or {}),
                default=False,
                parent_tag=base.tag,
            )
        )
    return replace(base, classifiers=tuple(classifiers))


@functools.lru_cache(maxsize=8)
def _load_all(folder: str) -> Tuple[ZooEntry, ...]:
    files = sorted(Path(folder).glob("*.yaml"))
    out: List[ZooEntry] = []
    seen: Dict[str, str] = {}
    for f in files:
        entry = load_entry(f)
        for e in (entry,) + entry.classifiers:
            if e.name in seen:
                raise ZooConfigError(f"{f}: zoo entry {e.name!r} is already defined in {seen[e.name]}")
            seen[e.name] = str(f)
            out.append(e)
    # at most one default per model
    defaults: Dict[str, str] = {}
    for e in out:
        if e.default:
            if e.model in defaults:
                raise ZooConfigError(f"{e.config_path}: {e.model} has two default tags ({defaults[e.model]}, {e.tag})")
            defaults[e.model] = e.tag
    return tuple(out)


def clear_cache() -> None:
    _load_all.cache_clear()


def entries() -> List[ZooEntry]:
    """Every zoo entry (backbones then their classifiers, in file order)."""
    return list(_load_all(str(configs_dir())))


def backbone_entries() -> List[ZooEntry]:
    return [e for e in entries() if not e.is_classifier]


def classifier_entries() -> List[ZooEntry]:
    return [e for e in entries() if e.is_classifier]


def model_names() -> List[str]:
    """Registered model names (``moco_r50``, ``moco_vit_small``, ...)."""
    return sorted({e.model for e in entries()})


def default_entry(model: str) -> Optional[ZooEntry]:
    """The default tag of ``model``: the one marked ``default: true``, else the best ImageNet top-1 backbone."""
    cands = [e for e in entries() if e.model == model and not e.is_classifier]
    if not cands:
        return None
    for e in cands:
        if e.default:
            return e
    return max(cands, key=lambda e: e.imagenet_top1 or 0.0)


def find_entry(name: str) -> Optional[ZooEntry]:
    """Entry for ``"moco_r50.v2_800ep"`` or ``"moco_r50"`` (default tag); ``None`` if not a zoo name."""
    if not isinstance(name, str) or not name:
        return None
    name = name[len("timm/"):] if name.startswith("timm/") else name
    model, _, tag = name.partition(".")
    if not tag:
        return default_entry(model)
    for e in entries():
        if e.model == model and e.tag == tag:
            return e
    return None


def resolve_entry(config: Any) -> ZooEntry:
    """The entry of ``config``: a hub_configs file path, a zoo name (``moco_r50.v2_800ep``, a classifier tag such as
    ``moco_r50.v3_300ep_lincls_in1k``, or a bare model name for its default tag) or a :class:`ZooEntry`."""
    if isinstance(config, ZooEntry):
        return config
    p = Path(config)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"hub config {p} does not exist")
        return load_entry(p)
    entry = find_entry(str(config))
    if entry is None:
        known = ", ".join(e.name for e in entries())
        raise ValueError(f"unknown zoo model {str(config)!r}; known entries: {known}")
    return entry
