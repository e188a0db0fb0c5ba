"""Frozen-feature kNN on Pascal VOC ground-truth objects (see :mod:`transfer.evaluation.object_knn`).

Usage (from the repository root)::

    python transfer/voc_object_knn.py --data-root VOCdevkit --weights moco_r50.v2_800ep random
    python transfer/voc_object_knn.py --data-root VOCdevkit --weights ckpt.pth random --arch resnet18 --crop-size 64

Writes ``--out/object_knn.json`` and a Markdown table ``--out/object_knn.md`` (one row per ``--weights``).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable and keep transfer/ itself off sys.path.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from transfer.evaluation.object_knn import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main())
