"""Logging for the entry points: ``moco_zoo`` loggers to the console (rank 0 at INFO, other ranks WARNING) and to
``<output dir>/log.txt`` (one file per rank beyond 0), as detectron2's ``setup_logger``."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

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
