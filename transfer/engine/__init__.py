"""Transfer engine: configs and presets, detection training/testing loop, outputs, shared CLI."""
from .config import PRESETS, ConfigError, effective_batch, resolve
from .trainer import CHECKPOINT_NAME, DetectionRun, lr_factor

__all__ = ["PRESETS", "ConfigError", "effective_batch", "resolve", "CHECKPOINT_NAME", "DetectionRun", "lr_factor"]
