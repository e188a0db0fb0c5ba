"""Class weights for the per-pixel cross-entropy.

Median frequency balancing (Eigen & Fergus, "Predicting Depth, Surface Normals and Semantic Labels with a Common
Multi-Scale Convolutional Architecture", ICCV 2015; used by SegNet): ``w_c = median(f) / f_c`` where ``f_c`` is the
pixel count of class ``c`` divided by the pixel count of the training images in which ``c`` appears. Background
(most pixels) gets a weight below 1 and rare classes above, so the loss is not dominated by background when little
data and few iterations are available (the `cpu-os16` preset); the paper protocol trains unweighted.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np
import torch


def class_pixel_frequencies(masks: Iterable[np.ndarray], num_classes: int,
                            ignore_index: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """``(pixels, image_pixels)``: per class, its labelled pixels and the labelled pixels of the images that contain
    it (``ignore_index`` pixels count in neither)."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for mask in masks:
        labels = np.asarray(mask).reshape(-1)
        labels = labels[labels != ignore_index].astype(np.int64)
        counts = np.bincount(labels, minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += labels.size
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray,
                             source: str = "the training masks") -> torch.Tensor:
    """``median(f) / f_c`` with ``f_c = pixels_c / image_pixels_c``; classes absent from training get weight 1 (they
    never occur as a target, so their weight does not enter the loss). ``source`` names the masks in the error."""
    present = pixels > 0
    if not present.any():
        raise ValueError(f"{source}: no labelled pixels to compute class weights from")
    freq = np.where(present, pixels / np.maximum(image_pixels, 1), 0.0)
    weights = np.ones(len(pixels), dtype=np.float64)
    weights[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(weights, dtype=torch.float32)


def dataset_masks(dataset) -> Iterable[np.ndarray]:
    """The raw masks of a VOC segmentation dataset (or a ``Subset`` of one), read without augmentation."""
    base, indices = dataset, range(len(dataset))
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, dataset.indices
    return (base.read_mask(i) for i in indices)
