"""Few-shot probes: multinomial logistic regression (scikit-learn, L-BFGS) on L2-normalised frozen features, trained
on ``k`` images per class (or a percentage of every class) and tested on the full test split; every setting is
drawn ``tries`` times, as DINOv3's few-shot evaluation (k-or-percent, n tries)."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from moco_zoo.pretrain.data import sample_seed

logger = logging.getLogger(__name__)


def draw_per_class(labels: torch.Tensor, seed: int, shots: Optional[int] = None,
                   percent: Optional[float] = None) -> torch.Tensor:
    """Sorted indices: ``shots`` images of every class, or ``max(1, round(percent / 100 * n_c))`` of class ``c``
    (all of a class that has fewer), drawn by a generator seeded with ``seed``."""
    if (shots is None) == (percent is None):
        raise ValueError("give exactly one of shots and percent")
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n = int(shots) if shots is not None else max(1, int(round(float(percent) / 100.0 * len(idx))))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def logistic_regression_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                             test_y: torch.Tensor, c: float = 1.0, max_iter: int = 1000) -> float:
    tx = F.normalize(train_x.float(), dim=1).numpy()
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(tx, train_y.numpy())
    pred = clf.predict(F.normalize(test_x.float(), dim=1).numpy())
    return float(np.mean(pred == test_y.numpy()) * 100.0)


def run_fewshot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                shots=(1, 2, 5, 10), percents=(), tries: int = 5, seed: int = 0, c: float = 1.0
                ) -> Dict[str, List[float]]:
    """``{"top1_{k}shot": [one top-1 per try], "top1_{p}pct": [...]}`` for this seed."""
    out: Dict[str, List[float]] = {}
    settings = [("shot", int(k)) for k in shots] + [("pct", float(p)) for p in percents]
    for kind, value in settings:
        name = f"top1_{value}shot" if kind == "shot" else f"top1_{value:g}pct"
        accs = []
        for t in range(tries):
            draw = sample_seed(seed, t, int(value * 1000))
            idx = draw_per_class(train_y, draw, shots=value if kind == "shot" else None,
                                 percent=value if kind == "pct" else None)
            accs.append(logistic_regression_top1(train_x[idx], train_y[idx], test_x, test_y, c=c))
        out[name] = accs
        logger.info("few-shot %s: top-1 %.2f (mean of %d tries)", name, float(np.mean(accs)), tries)
    return out
