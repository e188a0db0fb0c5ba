"""FCN-style semantic segmentation on a ResNet backbone (the head commonly used to evaluate SSL backbones).

``input -> ResNet stem + layer1..layer4 (optionally dilated: output stride 8 or 16) -> FCN head
(``head_convs`` x [3x3 conv, BN, ReLU] of ``head_channels``, optional concat with the backbone features as in
mmsegmentation's FCNHead, dropout) -> 1x1 conv classifier -> bilinear upsampling to the input size``.

``head_convs=0`` gives the plain "1x1 conv classifier on the backbone features" variant. Dilation is applied after
loading the weights by changing stride / dilation / padding of the 3x3 convs (and the stride of the shortcut), which
works for BasicBlock (ResNet-18/34) and Bottleneck ResNets alike and keeps every weight shape.

Backbone weights come from :func:`moco_zoo.load_backbone_state_dict` (zoo name, ``hf-hub:`` id, converted file,
raw MoCo / linear-probe checkpoint, ``torchvision-supervised`` or ``random``), loaded strictly into a torchvision
ResNet: weights for another architecture fail with an error naming the spec.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# MoCo backbones are trained on RGB images normalised with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(ValueError):
    """Weights do not fit the requested architecture; the message names the weights spec / file."""


def _ignored(key: str) -> bool:
    return key.startswith(("fc.", "head.")) or key.endswith("num_batches_tracked")


def make_resnet(arch: str) -> nn.Module:
    name = arch.split(".")[0]
    if name.startswith("tv_"):
        name = name[3:]
    fn = getattr(torchvision.models, name, None)
    if fn is None or not ("resnet" in name or "resnext" in name):
        raise BackboneWeightsError(f"architecture {arch!r} is not a ResNet: segmentation transfer builds torchvision "
                                   f"ResNets (resnet18, resnet34, resnet50, resnet101, ...)")
    return fn(weights=None)


def load_resnet(spec: str, arch: Optional[str] = None, *, seed: int = 0,
                allow_pickle: bool = False) -> Tuple[nn.Module, str]:
    """A torchvision ResNet carrying the weights named by ``spec``; returns ``(model, arch)``."""
    from moco_zoo import load_backbone_state_dict

    if spec == "random" and not arch:
        arch = "resnet50"
    state, found = load_backbone_state_dict(spec, arch, allow_pickle=allow_pickle, seed=seed)
    if arch and found and found.split(".")[0] != arch.split(".")[0]:
        raise BackboneWeightsError(f"{spec}: weights are for {found}, but the requested architecture is {arch} "
                                   f"(pass --arch {found})")
    arch = arch or found
    model = make_resnet(arch)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _ignored(k)}
    given = {k: tuple(v.shape) for k, v in state.items() if not _ignored(k)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]}: weights have "
                         f"{list(given[wrong[0]])}, {arch} needs {list(expected[wrong[0]])})")
        raise BackboneWeightsError(f"{spec}: weights do not fit torchvision {arch}: {'; '.join(parts)}. "
                                   f"Are these weights for another architecture? Pass the matching --arch.")
    model.load_state_dict({k: v for k, v in state.items() if not _ignored(k)}, strict=False)
    return model, arch


def _dilate_stage(stage: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage with dilated 3x3 convs (shapes unchanged)."""
    for i, block in enumerate(stage):
        d = previous if i == 0 else dilation
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                if conv.stride == (2, 2):
                    conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation = (d, d)
                    conv.padding = (d, d)


def dilate_resnet(resnet: nn.Module, output_stride: int) -> None:
    """Output stride 32 (unchanged), 16 (layer4 dilated x2) or 8 (layer3 x2, layer4 x4)."""
    if output_stride == 32:
        return
    if output_stride == 16:
        _dilate_stage(resnet.layer4, 2, 1)
    elif output_stride == 8:
        _dilate_stage(resnet.layer3, 2, 1)
        _dilate_stage(resnet.layer4, 4, 2)
    else:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")


def _out_channels(resnet: nn.Module) -> int:
    block = resnet.layer4[-1]
    return (getattr(block, "conv3", None) or block.conv2).out_channels


class FCNHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, num_convs: int = 2,
                 concat_input: bool = True, dropout: float = 0.1):
        super().__init__()
        layers = []
        c = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            c = channels
        self.convs = nn.Sequential(*layers)
        self.concat_input = concat_input and num_convs > 0
        if self.concat_input:
            self.fuse = nn.Sequential(nn.Conv2d(in_channels + channels, channels, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(c, num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.concat_input:
            y = self.fuse(torch.cat([x, y], dim=1))
        return self.classifier(self.dropout(y))


class FCNSegmenter(nn.Module):
    """ResNet trunk + FCN head; ``forward(images)`` returns logits at the input resolution (N x C x H x W).

    ``images`` are float RGB in [0, 1]; ImageNet normalisation happens inside the model (the MoCo convention).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, output_stride: int = 8, head_channels: int = 512,
                 head_convs: int = 2, concat_input: bool = True, dropout: float = 0.1):
        super().__init__()
        dilate_resnet(backbone, output_stride)
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (backbone.layer1, backbone.layer2, backbone.layer3,
                                                              backbone.layer4)
        self.head = FCNHead(_out_channels(backbone), num_classes, head_channels, head_convs, concat_input, dropout)
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def backbone_modules(self):
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trunk in torchvision ResNet key names (``conv1.weight``, ``layer1.0...``)."""
        sd = {}
        for k, v in self.state_dict().items():
            if k.startswith("stem."):
                idx, rest = k[len("stem."):].split(".", 1)
                sd[{"0": "conv1", "1": "bn1"}[idx] + "." + rest] = v
            elif k.startswith("layer"):
                sd[k] = v
        return sd

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        logits = self.head(x)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def convert_norm(model: nn.Module, norm: str, device: Optional[torch.device] = None) -> nn.Module:
    """``bn`` (unchanged), ``syncbn`` (statistics shared by all ranks under DDP: SyncBatchNorm on CUDA, a gloo-capable
    equivalent on CPU, see :mod:`moco_zoo.transfer.modeling.norm`; plain BN in one process) or ``frozen`` (backbone BN
    frozen to the loaded statistics, head BN trained)."""
    if norm == "bn":
        return model
    if norm == "syncbn":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from moco_zoo.transfer.modeling.norm import convert_sync_batchnorm

            return convert_sync_batchnorm(model, device or torch.device("cpu"))
        return model
    if norm == "frozen":
        from torchvision.ops.misc import FrozenBatchNorm2d

        def freeze(module: nn.Module) -> nn.Module:
            for name, child in module.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                    frozen.weight.copy_(child.weight.detach())
                    frozen.bias.copy_(child.bias.detach())
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                    setattr(module, name, frozen)
                else:
                    freeze(child)
            return module

        for m in model.backbone_modules():
            freeze(m)
        return model
    raise ValueError(f"norm must be bn, syncbn or frozen, got {norm!r}")


def build_segmenter(spec: str, num_classes: int, arch: Optional[str] = None, *, output_stride: int = 8,
                    head_channels: int = 512, head_convs: int = 2, concat_input: bool = True, dropout: float = 0.1,
                    norm: str = "bn", seed: int = 0, allow_pickle: bool = False,
                    device: Optional[torch.device] = None) -> Tuple[FCNSegmenter, str]:
    """An :class:`FCNSegmenter` whose backbone carries ``spec``'s weights; returns ``(model, arch)``."""
    backbone, arch = load_resnet(spec, arch, seed=seed, allow_pickle=allow_pickle)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head's init is the same for every weights spec in a comparison
        model = FCNSegmenter(backbone, num_classes, output_stride, head_channels, head_convs, concat_input, dropout)
    return convert_norm(model, norm, device), arch
