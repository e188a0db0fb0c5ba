"""The one evaluator interface of the transfer engine (as detectron2's ``DatasetEvaluator``)."""
from __future__ import annotations

from typing import Any, Dict, Sequence


class DatasetEvaluator:
    """``reset()`` before a pass over the test set, ``process(targets, outputs)`` per batch, ``evaluate()`` at the
    end. Under DDP every rank processes its share and ``evaluate()`` (called on all ranks) gathers them and returns
    the same metrics everywhere."""

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, targets: Sequence[Dict[str, Any]], outputs: Sequence[Any]) -> None:
        raise NotImplementedError

    def evaluate(self) -> Dict[str, Any]:
        raise NotImplementedError
