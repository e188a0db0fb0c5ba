"""Transfer tasks: a task is a dataset + a model builder + an evaluator, plus how a batch becomes losses and outputs.

``voc_det`` (Faster R-CNN, VOC AP), ``coco_det`` (Mask R-CNN, COCO box + mask AP) and ``voc_seg`` (FCN, mIoU) run
on the same :mod:`moco_zoo.transfer.engine`. Batches are ``(images, targets)``; detection images are a list of
CHW tensors in [0, 1] (the model resizes), segmentation images a stacked NxCxHxW crop batch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from moco_zoo.data.coco import CocoInstances
from moco_zoo.data.voc import VOC_IGNORE_INDEX, VOCDetection, VOCSegmentation

from . import report
from .data import TrainTransform
from .evaluation.base import DatasetEvaluator
from .evaluation.coco import CocoEvaluator
from .evaluation.voc import VOCEvaluator
from .modeling import build_detector
from .segmentation.data import SegTrainTransform
from .segmentation.losses import class_pixel_frequencies, dataset_masks, median_frequency_weights
from .segmentation.metrics import SegmentationMeter
from .segmentation.model import build_segmenter

logger = logging.getLogger(__name__)


def _to_device(targets: Sequence[Dict[str, Any]], device: torch.device) -> List[Dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]


def _subset(ds: Dataset, n) -> Dataset:
    if not n:
        return ds
    sub = Subset(ds, list(range(min(int(n), len(ds)))))
    for attr in ("class_names", "coco", "cat_ids"):
        if hasattr(ds, attr):
            setattr(sub, attr, getattr(ds, attr))
    return sub


def _voc_root(data_root: str) -> Path:
    root = Path(data_root)
    if (root / "VOCdevkit").is_dir() and not any(root.glob("VOC20*")):
        root = root / "VOCdevkit"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: VOCdevkit directory not found (pass --data-root VOCdevkit)")
    return root


class Task:
    """What the engine needs from a task. ``class_names`` exclude the background."""

    name: str
    metric_keys: Tuple[str, ...]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build_datasets(self, data_root: str) -> Tuple[Dataset, Dataset, List[str]]:
        raise NotImplementedError

    def build_model(self, weights: str, num_classes: int, arch: str, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def collate(self, batch):
        images, targets = zip(*batch)
        return list(images), list(targets)

    def losses(self, model: nn.Module, batch, device: torch.device) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, model: nn.Module, images, device: torch.device) -> List[Any]:
        raise NotImplementedError

    def build_evaluator(self, test_set: Dataset, class_names: Sequence[str], device: torch.device) -> DatasetEvaluator:
        raise NotImplementedError

    def visualize(self, image: torch.Tensor, target: Any, output: Any, class_names: Sequence[str], path: Path) -> None:
        raise NotImplementedError

    def set_train_sizes(self, model: nn.Module, train: bool) -> None:
        """Switch between training and test input sizes (detection models resize inside)."""

    def lr_mults(self) -> Dict[str, float]:
        return {}


class DetectionTask(Task):
    """Faster / Mask R-CNN with a ResNet-C4 or ResNet-FPN backbone on torchvision's detection models."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.name = cfg["task"]

    def build_datasets(self, data_root: str):
        cfg = self.cfg
        train_tf = TrainTransform(cfg.flip_prob, cfg.train_use_difficult, drop_crowd=True)
        if self.name == "voc_det":
            root = _voc_root(data_root)
            train = VOCDetection(root, list(cfg.train_sets), transforms=train_tf,
                                 keep_difficult=bool(cfg.train_use_difficult))
            test = VOCDetection(root, list(cfg.test_sets), class_names=train.class_names, keep_difficult=True)
        else:
            root = Path(data_root)
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: COCO root not found (expected annotations/ and train2017/ under it)")
            train = CocoInstances(root, cfg.train_split, transforms=train_tf, remove_images_without_annotations=True,
                                  with_masks=bool(cfg.mask))
            test = CocoInstances(root, cfg.test_split, with_masks=False)
            if list(test.class_names) != list(train.class_names):
                raise ValueError(f"{test.ann_file}: categories differ from {train.ann_file}")
        names = list(train.class_names)
        return _subset(train, cfg.max_train_images), _subset(test, cfg.max_test_images), names

    def build_model(self, weights: str, num_classes: int, arch: str, device: torch.device) -> nn.Module:
        cfg = self.cfg
        model, _ = build_detector(
            num_classes, weights=weights, arch=arch, detector=cfg.detector, mask=bool(cfg.mask), norm=cfg.norm,
            seed=int(cfg.seed), allow_pickle=bool(cfg.allow_pickle), min_size=list(cfg.min_size_train),
            max_size=cfg.max_size, anchor_sizes=list(cfg.anchor_sizes), anchor_ratios=list(cfg.anchor_ratios),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_batch_size_per_image=cfg.box_batch_size_per_image, box_detections_per_img=cfg.box_detections_per_img,
            box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
            roi_resolution=cfg.roi_resolution, fpn_channels=cfg.fpn_channels)
        return model

    def losses(self, model, batch, device):
        images, targets = batch
        return model([im.to(device, non_blocking=True) for im in images], _to_device(targets, device))

    def predict(self, model, images, device):
        outputs = model([im.to(device) for im in images])
        return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]

    def build_evaluator(self, test_set, class_names, device):
        if self.name == "voc_det":
            return VOCEvaluator(test_set.dataset if isinstance(test_set, Subset) else test_set, class_names,
                                use_07_metric=bool(self.cfg.use_07_metric))

        return CocoEvaluator(test_set.coco, ("bbox", "segm") if self.cfg.mask else ("bbox",), cat_ids=test_set.cat_ids)

    def visualize(self, image, target, output, class_names, path):
        report.save_image(report.draw_prediction(image, output, class_names, float(self.cfg.vis_score_thresh)), path)

    def set_train_sizes(self, model, train):
        m = model.module if hasattr(model, "module") else model
        m.transform.min_size = (tuple(int(s) for s in self.cfg.min_size_train) if train
                                else (int(self.cfg.min_size_test),))


class SegmentationTask(Task):
    """FCN on a dilated ResNet; per-pixel cross-entropy (255 ignored); full-image single-scale test."""

    name = "voc_seg"
    class_weight: Optional[torch.Tensor] = None  # set by build_datasets when cfg.class_weighting asks for it

    def build_datasets(self, data_root: str):
        cfg = self.cfg
        root = str(_voc_root(data_root))
        train = VOCSegmentation(root, list(cfg.train_sets), mask_dir=cfg.mask_dir,
                                transforms=SegTrainTransform(cfg.crop_size, list(cfg.scale_range), cfg.flip_prob))
        test = VOCSegmentation(root, list(cfg.test_sets), class_names=train.class_names, mask_dir=cfg.mask_dir)
        train = _subset(train, cfg.max_train_images)
        if cfg.class_weighting == "median_frequency":
            self.class_weight = median_frequency_weights(
                *class_pixel_frequencies(dataset_masks(train), len(train.class_names) + 1, VOC_IGNORE_INDEX),
                source=f"{root} ({', '.join(cfg.train_sets)} {cfg.mask_dir} masks)")
            logger.info("class weights (median frequency): %s", ", ".join(
                f"{n} {w:.2f}" for n, w in zip(["background", *train.class_names], self.class_weight.tolist())))
        return train, _subset(test, cfg.max_test_images), list(train.class_names)

    def build_model(self, weights, num_classes, arch, device):
        cfg = self.cfg
        model, _ = build_segmenter(
            weights, num_classes + 1, arch, output_stride=cfg.output_stride, head_channels=cfg.head_channels,
            head_convs=cfg.head_convs, concat_input=cfg.concat_input, dropout=cfg.dropout, norm=cfg.norm,
            seed=int(cfg.seed), allow_pickle=bool(cfg.allow_pickle), device=device)
        return model

    def collate(self, batch):
        images, masks = zip(*batch)
        return torch.stack(images), torch.stack(masks)

    def losses(self, model, batch, device):
        images, masks = batch
        logits = model(images.to(device, non_blocking=True))
        weight = None if self.class_weight is None else self.class_weight.to(device)
        return {"loss_ce": F.cross_entropy(logits.float(), masks.to(device, non_blocking=True), weight=weight,
                                           ignore_index=VOC_IGNORE_INDEX)}

    def predict(self, model, images, device):
        return [model(im[None].to(device)).float().argmax(1)[0].cpu() for im in images]

    def build_evaluator(self, test_set, class_names, device):
        return SegmentationMeter(len(class_names) + 1, ["background", *class_names], VOC_IGNORE_INDEX, device=device)

    def visualize(self, image, target, output, class_names, path):
        report.save_segmentation_sample(image, target, output, path)

    def lr_mults(self):
        return {"head.": float(self.cfg.head_lr_mult)}


def model_name(cfg: Any) -> str:
    """``"FPN Mask R-CNN"``, ``"C4 Faster R-CNN"``, ``"FCN os8"``: the model column of result tables."""
    if cfg["task"] == "voc_seg":
        return f"FCN os{cfg['output_stride']}"
    return f"{cfg['detector'].upper()} {'Mask' if cfg['mask'] else 'Faster'} R-CNN"


def build_task(cfg: Any) -> Task:
    return SegmentationTask(cfg) if cfg["task"] == "voc_seg" else DetectionTask(cfg)
