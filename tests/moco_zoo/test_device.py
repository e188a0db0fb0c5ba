"""moco_zoo.device.keep_host_memory_mapped: glibc serves large blocks from the heap afterwards (checked with
glibc's own accounting, mallinfo2, in fresh subprocesses)."""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import ctypes, sys
from moco_zoo.device import keep_host_memory_mapped
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "on":
    assert keep_host_memory_mapped() is True
before = libc.mallinfo2().hblkhd
block = libc.malloc(int(sys.argv[2]) << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("mib", [16, 48])  # below and above glibc's largest mmap threshold (32 MiB)
def test_large_blocks_come_from_the_heap_after_keep_host_memory_mapped(mib):
    def mmapped_bytes(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(mib)], cwd=REPO, capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip())

    assert mmapped_bytes("off") >= mib << 20  # glibc default: a block this large is its own mmap
    assert mmapped_bytes("on") == 0
