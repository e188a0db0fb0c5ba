"""Pascal VOC detection transfer (MoCo paper protocol): VOC07+12 trainval -> VOC07 test, R50-C4 by default.

Usage (from the repository root; also under ``torchrun --nproc_per_node=N``)::

    python transfer/voc_det.py --data-root VOCdevkit --weights moco_r50.v2_800ep random --preset paper
    python transfer/voc_det.py --data-root VOCdevkit --weights ckpt.pth --preset cpu --arch resnet18 --set iters=200

See ``--help`` and :mod:`transfer.engine.config` for presets and every config key.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable and keep transfer/ itself off sys.path.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from transfer.engine.cli import main  # noqa: E402


if __name__ == "__main__":
    sys.exit(main("voc_det"))
