"""ResNet trunks for detection, built from any weights spec the zoo understands.

Weights come from :func:`moco_zoo.load_backbone_state_dict` (zoo name, ``hf-hub:`` id, converted file, raw MoCo or
linear-probe checkpoint, ``torchvision-supervised``) as a canonical torchvision/timm ResNet state dict, and are loaded
into ``torchvision.models.resnet<N>`` with a strict key check: a file for another architecture fails with an error
naming the file. ``random`` gives torchvision's own initialisation (seeded), the "scratch" baseline of the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torchvision
from torch import nn

from .norm import norm_layer

RANDOM = "random"


class BackboneWeightsError(ValueError):
    """Backbone weights do not fit the requested architecture; the message names the weights file/spec."""


@dataclass
class BackboneInfo:
    spec: str
    arch: str
    num_tensors: int


def _ignored(key: str) -> bool:
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def torchvision_resnet(arch: str, norm: str = "bn") -> nn.Module:
    """``torchvision.models.<arch>`` (resnet18/34/50/101/152, resnext, wide_resnet) with the chosen norm layer."""
    name = arch.split(".")[0]
    if name.startswith("tv_"):
        name = name[3:]
    fn = getattr(torchvision.models, name, None)
    if fn is None or not ("resnet" in name or "resnext" in name):
        raise BackboneWeightsError(
            f"architecture {arch!r} is not a ResNet: detection and segmentation transfer build torchvision ResNets "
            f"(resnet18, resnet34, resnet50, resnet101, ...)")
    return fn(weights=None, norm_layer=norm_layer(norm))


def resolve_arch(specs, arch: Optional[str] = None, *, allow_pickle: bool = False) -> str:
    """The architecture to use for ``specs``: ``arch`` if given, else the first one a weights spec reports."""
    if arch:
        return arch
    for spec in specs:
        if spec != RANDOM and spec != "torchvision-supervised":
            _, found = _load_state(spec, None, allow_pickle)
            return found
    return "resnet50"


def _load_state(spec: str, arch: Optional[str], allow_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    from moco_zoo import load_backbone_state_dict

    return load_backbone_state_dict(spec, arch, allow_pickle=allow_pickle)


def check_backbone_keys(state: Dict[str, torch.Tensor], model: nn.Module, source: str, arch: str) -> None:
    """Raise :class:`BackboneWeightsError` naming ``source`` unless ``state`` has exactly ``model``'s backbone
    tensors (fc and num_batches_tracked ignored) with the same shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not _ignored(k)}
    given = {k: tuple(v.shape) for k, v in state.items() if not _ignored(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != given[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: file has {list(given[k])}, "
                         f"{arch} needs {list(expected[k])})")
        raise BackboneWeightsError(
            f"{source}: weights do not fit torchvision {arch}: {'; '.join(parts)}. Are these weights for another "
            f"architecture? Pass the matching --arch.")


def build_resnet(spec: str, arch: Optional[str] = None, norm: str = "bn", *, seed: int = 0,
                 allow_pickle: bool = False) -> Tuple[nn.Module, BackboneInfo]:
    """A torchvision ResNet with the weights named by ``spec`` and the norm layer ``norm``.

    ``spec == "random"`` initialises ``arch`` (default resnet50) with torchvision's init under ``seed``.
    """
    if spec == RANDOM:
        arch = arch or "resnet50"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = torchvision_resnet(arch, norm)
        return model, BackboneInfo(spec, arch, 0)
    state, found_arch = _load_state(spec, arch, allow_pickle)
    if arch and found_arch and found_arch.split(".")[0] != arch.split(".")[0]:
        raise BackboneWeightsError(f"{spec}: weights are for {found_arch}, but the requested architecture is {arch} "
                                   f"(pass --arch {found_arch})")
    arch = arch or found_arch
    model = torchvision_resnet(arch, norm)
    check_backbone_keys(state, model, spec, arch)
    state = {k: v for k, v in state.items() if not _ignored(k)}
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if not _ignored(k)]
    if bad or result.unexpected_keys:  # pragma: no cover - check_backbone_keys already caught these
        raise BackboneWeightsError(f"{spec}: could not load {bad or result.unexpected_keys}")
    return model, BackboneInfo(spec, arch, len(state))


def stage_channels(resnet: nn.Module) -> Dict[str, int]:
    """Output channels of layer1..layer4 (BasicBlock or Bottleneck ResNets)."""
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        block = getattr(resnet, name)[-1]
        last = getattr(block, "conv3", None) or block.conv2
        out[name] = last.out_channels
    return out
