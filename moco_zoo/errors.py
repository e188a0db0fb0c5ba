"""Turning expected failures into the one line the entry points print (``PROG: error: FILE: problem``, exit 2);
``--debug`` or ``MOCO_ZOO_DEBUG=1`` shows the traceback instead."""
from __future__ import annotations

import os
import sys

from .checkpoint import CheckpointError
from .runlock import RunLockedError

# what a user can cause and fix: bad files, values, paths, a busy output directory, a lost connection
EXPECTED_ERRORS = (ValueError, OSError, CheckpointError, RunLockedError, ImportError, FloatingPointError)


def error_line(e: BaseException) -> str:
    """The message of an expected error on one line. A DataLoader worker's exception is re-raised by PyTorch with
    the worker's traceback appended to its message; this returns the original message instead."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]  # "module.ExceptionType: original message"
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def debug_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("MOCO_ZOO_DEBUG", "").strip() in ("1", "true", "yes")


def report(prog: str, e: BaseException, debug: bool = False) -> int:
    """Print ``prog: error: message`` (or re-raise under ``debug``); returns the exit code 2."""
    if debug or debug_requested():
        raise e
    print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
    return 2
