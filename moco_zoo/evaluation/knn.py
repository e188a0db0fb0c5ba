"""Weighted kNN on frozen features (Wu et al. 2018; k in {10, 20, 200} and T 0.07 as DINO, arXiv:2104.14294):
the k nearest train features by cosine similarity vote for their class with weight exp(sim / T). The vote itself is
:func:`moco_zoo.pretrain.knn.knn_predict`, shared with the pretraining monitor."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from moco_zoo.pretrain.knn import knn_predict


@torch.no_grad()
def knn_eval(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             num_classes: int, ks: Sequence[int] = (10, 20, 200), t: float = 0.07) -> Dict[str, float]:
    """Top-1 (%) for every k in ``ks``: ``{"top1_k10": ..., ...}``. Features need not be normalised."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    out = {}
    for k in ks:
        scores = knn_predict(test, train, train_labels, num_classes, k=int(k), t=float(t))  # BxC
        out[f"top1_k{k}"] = (scores.argmax(1) == test_labels).float().mean().item() * 100.0
    return out
