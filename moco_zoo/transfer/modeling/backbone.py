"""ResNet trunks for transfer, built from any weights spec the zoo understands.

Weights come from :func:`moco_zoo.load_backbone_state_dict` (zoo name, ``hf-hub:`` id, converted file, raw MoCo or
linear-probe checkpoint, ``torchvision-supervised``, ``random``) as a canonical ResNet state dict (torchvision and
timm share the key names), are checked against the architecture by :func:`moco_zoo.convert.check_arch` and loaded
strictly; every misfit is a :class:`~moco_zoo.checkpoint.CheckpointError` naming the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torchvision
from torch import nn

from moco_zoo.backbones import load_backbone_state_dict
from moco_zoo.checkpoint import CheckpointError
from moco_zoo.convert import check_arch

from .norm import norm_layer

RANDOM = "random"


@dataclass
class BackboneInfo:
    spec: str
    arch: str
    num_tensors: int


def _ignored(key: str) -> bool:
    return key.startswith(("fc.", "head.")) or key.endswith("num_batches_tracked")


def torchvision_resnet(arch: str, norm: str = "bn") -> nn.Module:
    """``torchvision.models.<arch>`` (resnet18/34/50/101/152, resnext, wide_resnet) with the chosen norm layer."""
    name = arch.split(".")[0]
    if name.startswith("tv_"):
        name = name[3:]
    fn = getattr(torchvision.models, name, None)
    if fn is None or not ("resnet" in name or "resnext" in name):
        raise CheckpointError(
            f"architecture {arch!r} is not a ResNet: detection and segmentation transfer build ResNets "
            f"(resnet18, resnet34, resnet50, resnet101, ...)")
    return fn(weights=None, norm_layer=norm_layer(norm))


def resolve_arch(specs, arch: Optional[str] = None, *, allow_pickle: bool = False) -> str:
    """The architecture to use for ``specs``: ``arch`` if given, else the first one a weights spec reports."""
    if arch:
        return arch
    for spec in specs:
        if spec != RANDOM and spec != "torchvision-supervised":
            return load_backbone_state_dict(spec, None, allow_pickle=allow_pickle)[1]
    return "resnet50"


def trunk_weights(spec: str, arch: Optional[str] = None, *, seed: int = 0,
                  allow_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state dict, arch)`` of the backbone named by ``spec`` through the zoo's one resolver
    (:func:`moco_zoo.load_backbone_state_dict`) and its one fit check (:func:`moco_zoo.convert.check_arch`, which
    names ``spec`` and the architecture the weights look like). ``random`` is timm's initialisation under ``seed``."""
    if spec == RANDOM:
        arch = arch or "resnet50"
    state, found = load_backbone_state_dict(spec, arch, allow_pickle=allow_pickle, seed=seed)
    if arch and found != arch:
        check_arch(state, arch, source=spec)
    return {k: v for k, v in state.items() if not _ignored(k)}, arch or found


def load_trunk(model: nn.Module, state: Dict[str, torch.Tensor], spec: str, arch: str) -> None:
    """Load ``state`` into ``model`` (a torchvision or timm ResNet); anything but an exact fit is a
    :class:`CheckpointError` naming ``spec``."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{spec}: weights do not fit {arch}: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not _ignored(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{spec}: weights do not fit {arch}: missing {missing[:3]}, unexpected "
                              f"{result.unexpected_keys[:3]}")


def build_resnet(spec: str, arch: Optional[str] = None, norm: str = "bn", *, seed: int = 0,
                 allow_pickle: bool = False) -> Tuple[nn.Module, BackboneInfo]:
    """A torchvision ResNet with the weights named by ``spec`` and the norm layer ``norm``."""
    state, arch = trunk_weights(spec, arch, seed=seed, allow_pickle=allow_pickle)
    model = torchvision_resnet(arch, norm)
    load_trunk(model, state, spec, arch)
    return model, BackboneInfo(spec, arch, len(state))


def stage_channels(resnet: nn.Module) -> Dict[str, int]:
    """Output channels of layer1..layer4 (BasicBlock or Bottleneck ResNets)."""
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        block = getattr(resnet, name)[-1]
        last = getattr(block, "conv3", None) or block.conv2
        out[name] = last.out_channels
    return out
