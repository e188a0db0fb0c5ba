"""Weighted kNN monitor (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"; used to monitor MoCo training): k=200 neighbours by cosine similarity, each voting for its class with
weight exp(sim / t), t=0.1.

Features are the L2-normalised pooled backbone features of the query encoder (BN in eval mode), on a labelled
ImageFolder with ``train/`` (the memory) and ``val/`` (the queries), center-cropped.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from moco_zoo.device import autocast
from moco_zoo.precise_bn import recompute_bn_stats

from .augment import eval_transform
from .data import ImageFolderDataset, make_loader


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
                     amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, normalize: bool = True,
                     progress=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(NxD float32 features, L2-normalised unless ``normalize=False``; N labels) of every image in ``loader``.
    ``progress``: an optional tqdm bar advanced by the batch size."""
    feats, labels = [], []
    for images, targets, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            f = feature_fn(images)
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
        labels.append(targets.to(device))
        if progress is not None:
            progress.update(len(targets))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(query: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores. query: BxD, memory: NxD (both normalised) -> BxC scores (argmax = prediction)."""
    k = min(k, memory.shape[0])
    out = []
    for qs in torch.split(query, chunk):
        sim = qs @ memory.T  # BxN cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # Bxk
        weights = (top_sim / t).exp()  # Bxk
        one_hot = F.one_hot(memory_labels[top_idx], num_classes).to(weights.dtype)  # BxkxC
        out.append((one_hot * weights.unsqueeze(-1)).sum(1))  # BxC
    return torch.cat(out)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = 200, t: float = 0.1) -> Dict[str, float]:
    scores = knn_predict(val_feats, train_feats, train_labels, num_classes, k, t)
    top1 = (scores.argmax(1) == val_labels).float().mean().item() * 100.0
    top5 = (scores.topk(min(5, num_classes), 1).indices == val_labels.unsqueeze(1)).any(1).float().mean().item() * 100
    return {"knn_top1": top1, "knn_top5": top5}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose BatchNorm running statistics are the average of the per-batch
    statistics over ``batches`` (cumulative moving average, "precise BN", Wu & Johnson 2021, arXiv:2105.07576).

    A randomly initialised network in eval mode normalises with mean 0 / var 1, i.e. it does not normalise at all;
    this gives the random-init baseline the same kind of BN statistics a trained network has.
    """
    model = copy.deepcopy(model)
    recompute_bn_stats(model, batches, lambda m, x: m(x.to(device, non_blocking=True)))
    return model.eval()


class KNNMonitor:
    """Builds the train/val loaders once; ``evaluate(feature_fn)`` returns kNN top-1/top-5 (%)."""

    def __init__(self, root: str | Path, image_size: int, device: torch.device, *, k: int = 200, t: float = 0.1,
                 batch_size: int = 256, workers: int = 0, max_train: int = 0,
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> None:
        root = Path(root)
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise FileNotFoundError(f"{root}: the kNN monitor needs a labelled ImageFolder with train/ and val/ "
                                    f"sub-directories (set knn_data=ROOT, or knn_every=0 to disable it)")
        tf = eval_transform(image_size)
        self.train_set = ImageFolderDataset(root / "train", tf)
        self.val_set = ImageFolderDataset(root / "val", tf)
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(f"{root}: train/ and val/ have different class directories")
        train = self.train_set
        if max_train and len(train) > max_train:
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:max_train].tolist()
            train = Subset(train, idx)
        self.num_classes = len(self.train_set.classes)
        self.train_loader = make_loader(train, batch_size=batch_size, workers=workers)
        self.val_loader = make_loader(self.val_set, batch_size=batch_size, workers=workers)
        self.device, self.k, self.t = device, k, t
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    def recalibrate_bn(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose BN running statistics are re-estimated on the kNN train images (see
        :func:`recalibrate_bn`)."""
        def batches():
            for x, _, _ in self.train_loader:
                yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

        with autocast(self.device, self.amp_dtype):
            return recalibrate_bn(model, batches(), self.device)

    def evaluate(self, feature_fn: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, float]:
        tr_f, tr_y = extract_features(feature_fn, self.train_loader, self.device, self.amp_dtype, self.channels_last)
        va_f, va_y = extract_features(feature_fn, self.val_loader, self.device, self.amp_dtype, self.channels_last)
        return knn_accuracy(tr_f, tr_y, va_f, va_y, self.num_classes, self.k, self.t)
