"""Detection models for transfer: ResNet-C4 / ResNet-FPN Faster R-CNN and Mask R-CNN from MoCo weights."""
from .backbone import BackboneInfo, build_resnet, load_trunk, resolve_arch, trunk_weights
from .detector import DETECTORS, backbone_trunk_state, build_detector
from .norm import NORMS, DistributedBatchNorm2d, batchnorm_modules, convert_sync_batchnorm, norm_layer

__all__ = [
    "BackboneInfo", "build_resnet", "load_trunk", "resolve_arch", "trunk_weights",
    "DETECTORS", "backbone_trunk_state", "build_detector",
    "NORMS", "DistributedBatchNorm2d", "batchnorm_modules", "convert_sync_batchnorm", "norm_layer",
]
