"""Transfer engine: configs and presets, detection training/testing loop, outputs, shared CLI.

Attributes are imported lazily so ``voc_det.py --help`` answers without importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "PRESETS": "config", "ConfigError": "config", "effective_batch": "config", "resolve": "config",
    "CHECKPOINT_NAME": "trainer", "DetectionRun": "trainer", "lr_factor": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
