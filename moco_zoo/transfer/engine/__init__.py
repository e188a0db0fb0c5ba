"""The transfer engine: an iteration-based trainer with hooks, one run per (config, weights), one CLI."""
from .run import CHECKPOINT_NAME, TransferRun
from .trainer import HookBase, Trainer, lr_factor

__all__ = ["CHECKPOINT_NAME", "TransferRun", "HookBase", "Trainer", "lr_factor"]
