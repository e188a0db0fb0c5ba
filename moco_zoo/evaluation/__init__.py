"""Evaluation suite for any backbone spec (issue 17): kNN, a linear-probe sweep on cached features, few-shot
logistic regression, low-shot fine-tuning and the standard MoCo linear protocol, over seeds, with results tables
(``moco-zoo eval``; Python: ``run_eval(make_config("cpu-small", backbone="random", arch="resnet18"))``)."""
from .config import EvalConfig, make_config  # noqa: F401
from .runner import run_eval  # noqa: F401

__all__ = ["EvalConfig", "make_config", "run_eval"]
