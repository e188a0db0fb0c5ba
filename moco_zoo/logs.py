"""Logging for the entry points: ``moco_zoo`` loggers to the console (rank 0 at INFO, other ranks WARNING) and to
``<output dir>/log.txt`` (one file per rank beyond 0), as detectron2's ``setup_logger``; scalar records to
TensorBoard event files (:class:`TensorBoardScalars`)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from torch.utils.tensorboard import SummaryWriter

_FORMAT = "[%(asctime)s %(name)s] %(message)s"


def setup_logging(output_dir: Optional[str] = None, *, name: str = "moco_zoo", verbose: bool = False) -> logging.Logger:
    """Configure the ``name`` logger once per process (calling again only adds a missing file handler)."""
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if not any(getattr(h, "_moco_zoo_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        console.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        console._moco_zoo_console = True
        logger.addHandler(console)
    if output_dir:
        path = Path(output_dir) / ("log.txt" if rank == 0 else f"log.rank{rank}.txt")
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
                   for h in logger.handlers):
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)
    return logger


class TensorBoardScalars:
    """The numeric fields of metric records as TensorBoard scalars under ``<prefix>/<key>``.

    ``purge_step``: a resumed run drops the events logged after its checkpoint (they are logged again), as the JSONL
    logs beside the event files do."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None) -> None:
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step or None)

    def write(self, prefix: str, record: Mapping[str, Any], step: int) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
