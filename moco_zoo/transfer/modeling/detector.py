"""Faster R-CNN / Mask R-CNN with ResNet-C4 (the MoCo paper's R50-C4) or ResNet-FPN backbones, on
``torchvision.models.detection``.

C4 follows the MoCo detectron2 configs: the trunk is stem + res2..res4 (stride 16), proposals are pooled with
RoIAlign (aligned, 14x14) from res4, the box head is res5 (stride in the 3x3 conv, as torchvision) followed by an
extra norm layer ("Res5ROIHeadsExtraNorm") and global average pooling. The C4 mask head shares that res5 tower and
upsamples its 7x7 output with a 2x2 deconvolution to 14x14 masks, as detectron2's C4 Mask R-CNN does.
All backbone stages are trainable; norm is ``bn``, ``syncbn`` or ``frozen``; input is RGB in [0, 1] normalised
with the ImageNet mean/std the MoCo weights were trained with.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import BackboneInfo, build_resnet, stage_channels
from .norm import norm_layer

DETECTORS = ("c4", "fpn")


class ResNetC4Trunk(nn.Sequential):
    """stem + layer1..layer3 of a torchvision ResNet: one stride-16 feature map (detectron2 ``res4``)."""

    def __init__(self, resnet: nn.Module):
        super().__init__(OrderedDict(
            conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool,
            layer1=resnet.layer1, layer2=resnet.layer2, layer3=resnet.layer3))
        self.out_channels = stage_channels(resnet)["layer3"]


class Res5Head(nn.Module):
    """res5 (torchvision ``layer4``) applied to pooled RoI features, followed by an extra norm layer.

    ``pool=True`` (box head) returns globally average pooled vectors; ``pool=False`` returns the 7x7 maps (mask head).
    """

    def __init__(self, layer4: nn.Module, out_channels: int, norm: str):
        super().__init__()
        self.res5 = layer4
        self.norm = norm_layer(norm)(out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x))


class PooledHead(nn.Module):
    """Box head: shared res5 tower + average pooling -> (N, C) features for FastRCNNPredictor."""

    def __init__(self, tower: Res5Head):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x).mean(dim=(2, 3))


class C4RoIAlign(MultiScaleRoIAlign):
    """Single-level RoIAlign (``aligned=True``, detectron2's ROIAlignV2) from the stride-16 ``res4`` map.

    (A MultiScaleRoIAlign subclass only because torchvision's detectors type-check their poolers.)
    """

    def __init__(self, output_size: int = 14, spatial_scale: float = 1.0 / 16, sampling_ratio: int = 0):
        super().__init__(["0"], output_size, sampling_ratio)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        x = next(iter(features.values()))
        return roi_align(x, [p.to(x.dtype) for p in proposals], self.output_size, self.spatial_scale,
                         self.sampling_ratio, aligned=True)


def _anchor_generator(detector: str, sizes: Sequence[int], ratios: Sequence[float]) -> AnchorGenerator:
    sizes = tuple(int(s) for s in sizes)
    ratios = tuple(float(r) for r in ratios)
    if detector == "c4":
        return AnchorGenerator((sizes,), (ratios,))
    if len(sizes) != 5:
        raise ValueError(f"FPN needs exactly 5 anchor sizes (one per level P2..P6), got {list(sizes)}")
    return AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * len(sizes))


def build_detector(
    num_classes: int,
    *,
    weights: str = "random",
    arch: Optional[str] = None,
    detector: str = "c4",
    mask: bool = False,
    norm: str = "bn",
    seed: int = 0,
    allow_pickle: bool = False,
    min_size: Sequence[int] = (800,),
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 12000,
    rpn_pre_nms_top_n_test: int = 6000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    fpn_channels: int = 256,
    roi_resolution: int = 14,
) -> Tuple[nn.Module, BackboneInfo]:
    """Faster R-CNN (``mask=False``) or Mask R-CNN (``mask=True``); ``num_classes`` excludes background.

    Returns the model and what was loaded into its backbone. All backbone stages are trainable. ``roi_resolution``
    is the C4 RoIAlign output size (14 in the paper; res5 halves it, so C4 masks are ``roi_resolution`` pixels).
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}: expected one of {', '.join(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    resnet, info = build_resnet(weights, arch, norm, seed=seed, allow_pickle=allow_pickle)
    channels = stage_channels(resnet)
    anchors = _anchor_generator(detector, anchor_sizes, anchor_ratios)
    n_anchors = anchors.num_anchors_per_location()[0]
    common = dict(
        min_size=tuple(int(s) for s in min_size), max_size=int(max_size),
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image, box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img, box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # head initialisation is reproducible and equal across weights of a comparison
        if detector == "c4":
            trunk = ResNetC4Trunk(resnet)
            tower = Res5Head(resnet.layer4, channels["layer4"], norm)
            kw = dict(common, rpn_head=RPNHead(trunk.out_channels, n_anchors), box_roi_pool=C4RoIAlign(roi_resolution),
                      box_head=PooledHead(tower), box_predictor=FastRCNNPredictor(channels["layer4"], num_classes + 1))
            if mask:
                model = MaskRCNN(trunk, None, mask_roi_pool=C4RoIAlign(roi_resolution), mask_head=tower,
                                 mask_predictor=MaskRCNNPredictor(channels["layer4"], 256, num_classes + 1), **kw)
            else:
                model = FasterRCNN(trunk, None, **kw)
        else:
            body = BackboneWithFPN(
                resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                in_channels_list=[channels[f"layer{i}"] for i in range(1, 5)], out_channels=fpn_channels,
                extra_blocks=LastLevelMaxPool())
            kw = dict(common, rpn_head=RPNHead(fpn_channels, n_anchors),
                      box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2))
            if mask:
                model = MaskRCNN(body, num_classes + 1, **kw)
            else:
                model = FasterRCNN(body, num_classes + 1, **kw)
    for p in model.backbone.parameters():  # trainable_layers=5: every stage, the stem included
        p.requires_grad_(True)
    return model, info


def backbone_trunk_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The ResNet tensors inside a detector built by :func:`build_detector`, in torchvision ResNet names (for
    comparing with the weights that were loaded)."""
    out: Dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for k, v in sd.items():
        if k.startswith("backbone.body."):
            out[k[len("backbone.body."):]] = v
        elif k.startswith("backbone.") and not k.startswith("backbone.fpn."):
            out[k[len("backbone."):]] = v
        elif k.startswith("roi_heads.box_head.tower.res5."):
            out["layer4." + k[len("roi_heads.box_head.tower.res5."):]] = v
    return out
