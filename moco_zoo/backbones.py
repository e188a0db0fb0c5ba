"""One resolver for backbone weights, shared by the linear probe, the transfer engines and the demo.

``spec`` is any of:

* a zoo name: ``"moco_r50"`` (default tag) or ``"moco_r50.v2_800ep"`` (see ``moco-zoo list``);
* ``"hf-hub:ORG/REPO"``: a Hub repository holding ``model.safetensors`` (+ ``config.json``);
* a path: converted ``model.safetensors``, a torchvision ``.pth`` state dict, this project's pretraining or
  linear-probe checkpoint, an official MoCo v1/v2/v3 file, or a Hub-style folder;
* ``"torchvision-supervised"``: torchvision's ImageNet weights for ``arch`` (default resnet50) via torchvision's cache;
* ``"random"``: the freshly initialised timm weights of ``arch`` for a given ``seed``.

The result is always the canonical backbone state dict (timm key names, no classifier) plus the timm architecture.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torchvision

from . import zoo
from .checkpoint import CheckpointError
from .convert import adapt_pos_embed, check_arch, infer_arch, to_canonical
from .hub import download

__all__ = ["load_backbone_state_dict", "load_backbone", "resolve_spec_kind", "MOCO_DATA_CFG"]

SPEC_RANDOM = "random"
SPEC_TORCHVISION = "torchvision-supervised"
HF_PREFIX = "hf-hub:"

# Data config of every MoCo release (ImageNet statistics, bilinear resize, 0.875 center crop).
MOCO_DATA_CFG = dict(
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear", crop_pct=0.875
)


def _head_keys(arch: str) -> Tuple[str, ...]:
    return ("head.",) if "vit" in arch else ("fc.", "head.")


def resolve_spec_kind(spec: str) -> str:
    """``random`` | ``torchvision`` | ``hf-hub`` | ``path`` | ``zoo`` (raises for anything else)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(f"backbone spec must be a non-empty string, got {spec!r}")
    s = str(spec)
    if s == SPEC_RANDOM:
        return "random"
    if s == SPEC_TORCHVISION:
        return "torchvision"
    if s.startswith(HF_PREFIX):
        return "hf-hub"
    if os.path.exists(s):
        return "path"
    if zoo.find_entry(s) is not None:
        return "zoo"
    if os.sep in s or s.endswith((".pth", ".pt", ".tar", ".safetensors", ".bin", ".pkl")):
        raise CheckpointError(f"{s}: checkpoint file not found")
    raise ValueError(
        f"unknown backbone spec {s!r}: expected a zoo name ({', '.join(zoo.model_names())}, optionally with a "
        f".tag), 'hf-hub:ORG/REPO', a checkpoint path, '{SPEC_TORCHVISION}' or '{SPEC_RANDOM}'"
    )


def _random_state_dict(arch: str, seed: int) -> Dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # torchvision-style ResNet init (last BN gamma 1), the init MoCo pretraining starts from (pretrain/heads.py)
        kwargs = {"zero_init_last": False} if "res" in arch else {}
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _torchvision_state_dict(arch: str) -> Dict[str, torch.Tensor]:
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision has no supervised ImageNet weights for {arch!r}") from e
    sd = weights.get_state_dict(progress=False, check_hash=False, weights_only=True)
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _hf_state_dict(repo_id: str, arch: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    # through moco_zoo.hub.download: the weights are checked against the sha256 recorded in config.json
    weights = download(repo_id, filename="model.safetensors")
    hub_arch = None
    try:
        with open(weights.parent / "config.json", encoding="utf-8") as f:
            hub_arch = _arch_from_hub_config(json.load(f))
    except (OSError, ValueError):
        hub_arch = None
    converted = to_canonical(weights, arch or hub_arch, source=f"hf-hub:{repo_id}")
    return converted.state_dict, converted.arch


def _arch_from_hub_config(cfg: Dict[str, Any]) -> Optional[str]:
    """timm config.json -> architecture name that reproduces the model (MoCo ViT-S needs its 12 heads)."""
    arch = cfg.get("architecture")
    args = cfg.get("model_args") or {}
    if isinstance(arch, str) and arch.startswith("vit_") and args.get("num_heads") == 12:
        if arch.startswith("vit_small"):
            return "moco_vit_small"
    tag_arch = (cfg.get("pretrained_cfg") or {}).get("architecture")
    if isinstance(tag_arch, str) and tag_arch.startswith("moco_"):
        return tag_arch
    return arch if isinstance(arch, str) else None


def load_backbone_state_dict(
    spec: str, arch: Optional[str] = None, *, allow_pickle: bool = False, seed: int = 0
) -> Tuple[Dict[str, torch.Tensor], str]:
    """Resolve ``spec`` to ``(canonical backbone state dict, timm arch name)``; see the module docstring."""
    kind = resolve_spec_kind(spec)
    spec = str(spec)
    if kind == "random":
        if not arch:
            raise ValueError("backbone spec 'random' needs an architecture (arch=...)")
        return _random_state_dict(arch, seed), arch
    if kind == "torchvision":
        arch = arch or "resnet50"
        return _torchvision_state_dict(arch), arch
    if kind == "hf-hub":
        sd, found = _hf_state_dict(spec[len(HF_PREFIX):], arch)
        if not found:
            raise CheckpointError(f"{spec}: cannot determine the architecture; pass arch=...")
        return sd, found
    if kind == "path":
        converted = to_canonical(spec, arch, allow_pickle=allow_pickle)
        if not converted.arch:
            raise CheckpointError(
                f"{spec}: cannot determine the architecture of this backbone ({infer_arch(converted.state_dict)}); "
                f"pass arch=..."
            )
        return converted.state_dict, converted.arch
    # zoo name: goes through the timm registration (official URL + on-the-fly conversion, or the Hub once published)
    entry = zoo.find_entry(spec)
    model = timm.create_model(spec, pretrained=True, num_classes=0)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    found = entry.arch
    if arch and arch != found:
        check_arch(sd, arch, source=spec)
        found = arch
    return sd, found


def load_backbone(
    spec: str,
    arch: Optional[str] = None,
    *,
    num_classes: int = 0,
    allow_pickle: bool = False,
    seed: int = 0,
    image_size: Optional[int] = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model with the backbone weights of ``spec`` (pooled features when ``num_classes=0``, else a fresh head).

    ``image_size``: the input side for models with a fixed input size (ViTs): the model is built for it and the
    checkpoint's position embedding resampled to its patch grid; models without one (ResNets) ignore it.
    Missing or unexpected backbone keys raise :class:`CheckpointError`.
    """
    sd, arch = load_backbone_state_dict(spec, arch, allow_pickle=allow_pickle, seed=seed)
    overlay = dict(MOCO_DATA_CFG)
    overlay.update(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})
    model = timm.create_model(
        arch, pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=overlay, **timm_kwargs
    )
    patch_embed = getattr(model, "patch_embed", None)
    if image_size and patch_embed is not None and hasattr(model, "set_input_size") \
            and tuple(patch_embed.img_size) != (image_size, image_size):
        model.set_input_size(img_size=(image_size, image_size))
    sd = adapt_pos_embed(sd, model)
    result = model.load_state_dict(sd, strict=False)
    heads = _head_keys(arch)
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{spec}: weights do not fit {arch!r}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model

