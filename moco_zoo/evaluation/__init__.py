"""Evaluation suite for any backbone spec (issue 17): kNN, a linear-probe sweep on cached features, few-shot
logistic regression, low-shot fine-tuning and the standard MoCo linear protocol, over seeds, with results tables
(``moco-zoo eval``)."""
from .config import EvalConfig, make_config  # noqa: F401
