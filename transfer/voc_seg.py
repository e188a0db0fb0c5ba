"""Pascal VOC semantic segmentation transfer: FCN head on a (MoCo) ResNet backbone, mIoU.

Usage (from the repository root; also under ``torchrun --nproc_per_node=N``)::

    python transfer/voc_seg.py --data-root VOCdevkit --weights moco_r50.v2_800ep random --preset paper
    python transfer/voc_seg.py --data-root VOCdevkit --weights ckpt.pth random --preset cpu

See ``--help`` and :mod:`transfer.segmentation.config` for presets and every config key.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable and keep transfer/ itself off sys.path.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from transfer.segmentation.cli import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main())
