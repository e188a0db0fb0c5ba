"""FCN-style semantic segmentation on a ResNet backbone (the head commonly used to evaluate SSL backbones).

``input -> ResNet stem + layer1..layer4 (optionally dilated: output stride 8 or 16) -> FCN head
(``head_convs`` x [3x3 conv, BN, ReLU] of ``head_channels``, optional concat with the backbone features as in
mmsegmentation's FCNHead, dropout) -> 1x1 conv classifier -> bilinear upsampling to the input size``.

``head_convs=0`` gives the plain "1x1 conv classifier on the backbone features" variant. The dilated trunk is timm's
ResNet with ``output_stride`` (BasicBlock and Bottleneck ResNets alike; every weight shape unchanged), loaded with
the weights through :func:`moco_zoo.transfer.modeling.backbone.trunk_weights` (the zoo's one resolver and fit
check).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from moco_zoo.transfer.modeling.norm import convert_sync_batchnorm

from ..modeling.backbone import load_trunk, trunk_weights


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


def dilated_resnet(spec: str, arch: Optional[str], output_stride: int = 8, *, seed: int = 0,
                   allow_pickle: bool = False) -> Tuple[nn.Module, str]:
    """timm's ResNet at ``output_stride`` 8, 16 or 32 carrying ``spec``'s weights; returns ``(model, arch)``."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    state, arch = trunk_weights(spec, arch, seed=seed, allow_pickle=allow_pickle)
    model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", output_stride=output_stride)
    load_trunk(model, state, spec, arch)
    return model, arch


class FCNSegmenter(nn.Module):
    """ResNet trunk + FCN head; ``forward(images)`` returns logits at the input resolution (N x C x H x W).

    ``images`` are float RGB in [0, 1]; ImageNet normalisation happens inside the model (the MoCo convention).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head_channels: int = 512, head_convs: int = 2,
                 concat_input: bool = True, dropout: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (backbone.layer1, backbone.layer2, backbone.layer3,
                                                              backbone.layer4)
        self.head = FCNHead(_out_channels(backbone), num_classes, head_channels, head_convs, concat_input, dropout)
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

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
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return convert_sync_batchnorm(model, device or torch.device("cpu"))
        return model
    if norm == "frozen":
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
    backbone, arch = dilated_resnet(spec, arch, output_stride, seed=seed, allow_pickle=allow_pickle)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head's init is the same for every weights spec in a comparison
        model = FCNSegmenter(backbone, num_classes, head_channels, head_convs, concat_input, dropout)
    return convert_norm(model, norm, device), arch
