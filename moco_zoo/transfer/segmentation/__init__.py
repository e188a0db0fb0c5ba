"""VOC semantic segmentation transfer: FCN head on a ResNet backbone, poly-lr training, confusion-matrix mIoU."""
from .metrics import SegmentationMeter, confusion_matrix, segmentation_scores
from .model import BackboneWeightsError, FCNHead, FCNSegmenter, build_segmenter, dilate_resnet, load_resnet

__all__ = ["SegmentationMeter", "confusion_matrix", "segmentation_scores", "BackboneWeightsError", "FCNHead",
           "FCNSegmenter", "build_segmenter", "dilate_resnet", "load_resnet"]
