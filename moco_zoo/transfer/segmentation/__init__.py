"""VOC semantic segmentation transfer: FCN head on a ResNet backbone, poly-lr training, confusion-matrix mIoU."""
from .metrics import SegmentationMeter, confusion_matrix, segmentation_scores
from .model import FCNHead, FCNSegmenter, build_segmenter, dilated_resnet

__all__ = ["SegmentationMeter", "confusion_matrix", "segmentation_scores", "FCNHead", "FCNSegmenter", "build_segmenter",
           "dilated_resnet"]
