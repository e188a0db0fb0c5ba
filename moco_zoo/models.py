"""MoCo zoo models for timm: ``timm.create_model('moco_r50.v2_800ep', pretrained=True)``.

Pretrained configs are generated from ``hub_configs/`` (see :mod:`moco_zoo.zoo`); the builders are thin wrappers over
timm's ``build_model_with_cfg``. Models are headless by default (``num_classes=0`` -> pooled features);
``num_classes=N`` adds a freshly initialised head. Classifier tags (``*_lincls_in1k``) load the authors' linear
probe with its 1000-class head.

Weight sources, per entry:

* not yet published under the project's Hub org: the authors' release ``url``; the download is checked against the
  published md5 prefix (when there is one) before it is unpickled (``weights_only=True``), and
  :func:`checkpoint_filter_fn` converts the official layout on the fly;
* ``hub.published: true``: ``hf_hub_id`` (a converted ``model.safetensors``) takes over;
* always: ``pretrained_cfg_overlay=dict(file=PATH)`` with any checkpoint :mod:`moco_zoo.convert` understands.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import ImageNetInfo
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer

from . import zoo
from .checkpoint import CheckpointError
from .convert import adapt_pos_embed, load_checkpoint_file, to_canonical
from .hub import download, download_url

__all__ = ["default_cfgs", "checkpoint_filter_fn", "pretrained_cfg_for_entry", "moco_r18", "moco_r50", "moco_vit_small",
           "moco_vit_base"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture of each registered model: builder class, its fixed kwargs and the cfg fields that depend on it.
_ARCHS: Dict[str, Dict[str, Any]] = {
    # ResNet-18: for models pretrained with this project's engine (e.g. the `make demo` release); no official weights.
    "moco_r18": dict(
        cls=ResNet, args=dict(block=BasicBlock, layers=(2, 2, 2, 2)),
        cfg=dict(pool_size=(7, 7), first_conv="conv1", classifier="fc"),
    ),
    "moco_r50": dict(
        cls=ResNet, args=dict(block=Bottleneck, layers=(3, 4, 6, 3)),
        cfg=dict(pool_size=(7, 7), first_conv="conv1", classifier="fc"),
    ),
    # MoCo v3's ViT-S has 12 heads (timm's vit_small_patch16_224 has 6).
    "moco_vit_small": dict(
        cls=VisionTransformer, args=dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),
        cfg=dict(first_conv="patch_embed.proj", classifier="head", fixed_input_size=True),
    ),
    "moco_vit_base": dict(
        cls=VisionTransformer, args=dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
        cfg=dict(first_conv="patch_embed.proj", classifier="head", fixed_input_size=True),
    ),
}


def imagenet_label_names() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k synsets in classifier order (timm's ImageNetInfo)."""
    return tuple(ImageNetInfo().label_names())


def pretrained_cfg_for_entry(entry: zoo.ZooEntry) -> Dict[str, Any]:
    """timm pretrained cfg of one zoo entry (the source: authors' url until published, then the Hub)."""
    arch = _ARCHS.get(entry.model)
    if arch is None:
        raise zoo.ZooConfigError(f"{entry.config_path}: no builder registered for model {entry.model!r}")
    cfg: Dict[str, Any] = dict(
        url=None if entry.published else entry.source.url,
        hf_hub_id=entry.hub.repo_id if entry.published else None,
        num_classes=entry.num_classes,
        input_size=(3, 224, 224),
        interpolation="bilinear",
        crop_pct=0.875,
        crop_mode="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license=entry.license,
        description=entry.description,
        origin_url=entry.source.origin_url,
        paper_name=entry.paper.title,
        paper_ids=f"arXiv:{entry.paper.arxiv}",
        notes=(
            f"moco_version={entry.moco_version}",
            "source=hub" if entry.published else (
                "source=official url, converted on load, "
                + (f"md5 prefix {entry.source.md5_prefix} checked" if entry.source.md5_prefix else "no published md5")
            ),
        ),
        **arch["cfg"],
    )
    if entry.is_classifier and entry.num_classes == 1000 and entry.dataset.startswith("imagenet"):
        names = imagenet_label_names()
        if names:
            cfg["label_names"] = names
    return cfg


def _cfgs() -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    try:
        names = zoo.model_names()
    except zoo.ZooConfigError as e:
        # Keep `import moco_zoo` working without the configs: the architectures register, without weights.
        warnings.warn(f"moco_zoo: no zoo configs, models registered without pretrained weights ({e})")
        return {name: dict(num_classes=0, **arch["cfg"]) for name, arch in _ARCHS.items()}
    for model in names:
        default = zoo.default_entry(model)
        ordered = [default] + [e for e in zoo.entries() if e.model == model and e is not default]
        for e in ordered:
            if e is None:
                continue
            out[e.name] = pretrained_cfg_for_entry(e)
    for name, arch in _ARCHS.items():  # architectures without a release yet: buildable, no weights
        if not any(k.split(".")[0] == name for k in out):
            out[name] = dict(num_classes=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
                             crop_pct=0.875, input_size=(3, 224, 224), **arch["cfg"])
    return out


default_cfgs = generate_default_cfgs(_cfgs())


# ------------------------------------------------------------------------------------------------ weight conversion


def _source_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("file") or cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("architecture") or "pretrained")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: any checkpoint layout -> this model's state dict (strict about the backbone)."""
    source = _source_name(model)
    converted = to_canonical(state_dict, source=source, check=False)
    out = dict(converted.state_dict)
    own = model.state_dict()
    head = "head" if isinstance(model, VisionTransformer) else "fc"
    if converted.head is not None and getattr(model, "num_classes", 0) == converted.num_classes:
        out.update({f"{head}.{k}": v for k, v in converted.head.items()})
    if "pos_embed" in out and "pos_embed" in own:
        out = adapt_pos_embed(out, model)
    backbone_keys = [k for k in own if not k.startswith(head + ".")]
    missing = [k for k in backbone_keys if k not in out]
    unexpected = [k for k in out if k not in own]
    mismatched = [k for k in backbone_keys if k in out and out[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: checkpoint ({converted.source_format}, arch {converted.arch}) does not fit "
            f"{type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {mismatched[:3]}"
        )
    return out


def _prefetch_verified(variant: str, kwargs: Dict[str, Any]) -> None:
    """Download the authors' file into timm's url cache and check its md5 prefix before timm unpickles it."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
    )
    if cfg.state_dict is not None or cfg.file or cfg.source in ("hf-hub", "local-dir"):
        return
    if cfg.hf_hub_id:
        # timm prefers the Hub copy: fetch it into the HF cache through moco_zoo.hub.download, which checks the
        # sha256 recorded in its config.json (and repairs a bad cached copy) before timm reads the same file
        download(cfg.hf_hub_id.split("@")[0], filename=cfg.hf_hub_filename or "model.safetensors")
        return
    if not cfg.url:
        return
    entry = zoo.find_entry(f"{variant}.{cfg.tag}" if cfg.tag else variant)
    md5 = entry.source.md5_prefix if entry is not None else None
    url = cfg.url if isinstance(cfg.url, str) else cfg.url[0]
    download_url(url, md5_prefix=md5, cache_dir=kwargs.get("cache_dir"))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    arch = _ARCHS[variant]
    if pretrained:
        _prefetch_verified(variant, kwargs)
    extra = {}
    if arch["cls"] is VisionTransformer:
        extra["feature_cfg"] = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    model_args = dict(arch["args"])
    model_args.update(kwargs)
    local_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
    if local_file:
        # timm would unpickle the file itself: read it through our safe loader first, so a bad file is an error naming it
        load_checkpoint_file(local_file)
    return build_model_with_cfg(
        arch["cls"], variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **extra, **model_args
    )


@register_model
def moco_r18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """MoCo ResNet-18 (no official release; for checkpoints pretrained with pretrain/, e.g. by `make demo`)."""
    return _create("moco_r18", pretrained, **kwargs)


@register_model
def moco_r50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """MoCo ResNet-50 (v1 200ep, v2 200/800ep, v3 100/300/1000ep); default tag: the best release."""
    return _create("moco_r50", pretrained, **kwargs)


@register_model
def moco_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MoCo v3 ViT-Small/16 with 12 attention heads."""
    return _create("moco_vit_small", pretrained, **kwargs)


@register_model
def moco_vit_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MoCo v3 ViT-Base/16."""
    return _create("moco_vit_base", pretrained, **kwargs)
