"""Turning expected failures into the one line the entry points print (``PROG: error: FILE: problem``)."""
from __future__ import annotations


def error_line(e: BaseException) -> str:
    """The message of an expected error on one line. A DataLoader worker's exception is re-raised by PyTorch with
    the worker's traceback appended to its message; this returns the original message instead."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]  # "module.ExceptionType: original message"
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg
