"""One place that decides device, autocast dtype and distributed backend.

Every engine (pretraining, linear probe, transfer) asks here instead of hard-coding ``.cuda()``, so the same code
runs on a laptop CPU, a CUDA node, or a ``torchrun`` job across nodes.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from typing import Iterator, Optional

import torch
import torch.distributed as dist


def default_device(requested: Optional[str] = None) -> torch.device:
    """``requested`` if given ("cpu", "cuda", "cuda:1"), else this rank's CUDA device when present, else CPU."""
    if requested not in (None, "", "auto"):
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def ddp_backend(device: torch.device) -> str:
    """nccl for CUDA tensors (when built with it), gloo otherwise (CPU tests, Windows, macOS)."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """Mixed-precision dtype for ``precision`` in {"auto", "fp32", "bf16", "fp16"}; None means full fp32.

    "auto" picks fp16 on CUDA without bf16 support, bf16 on other CUDA devices, bf16 on CPUs with native bf16
    instructions (AVX512-BF16 / AMX, as oneDNN reports them; pair it with channels_last, see bench/RESULTS.md), and
    fp32 on other CPUs, where bf16 would be emulated and slower.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls/convolutions natively (oneDNN's check for AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


@contextlib.contextmanager
def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """``torch.autocast`` for ``device`` when ``dtype`` is set, a no-op otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
HEAP_ALLOC_LIMIT = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit


def keep_host_memory_mapped() -> bool:
    """Reuse freed host memory instead of returning it to the OS (glibc only; ``False`` elsewhere).

    By default glibc serves large blocks with ``mmap`` and unmaps them on ``free``, so each training step re-faults
    every activation tensor page by page (on this 2-core CPU: ResNet-18 @ 64 px step 173 -> 211 img/s with a 32 MiB
    threshold, batched colour augmentation 2x faster). glibc caps the mmap threshold at 32 MiB, and MoCo's InfoNCE
    logits are larger (Nx(1+K) fp32 at N=128, K=65536 is 32 MiB + 512 B: cross-entropy forward+backward 95 -> 8 ms),
    so ``mmap`` is switched off for ordinary allocations (glibc still falls back to it when the heap cannot grow).
    The heap is never trimmed. Costs: memory freed by the process stays reserved for it (peak RSS is unchanged).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOC_LIMIT)) and bool(mallopt(_M_MMAP_MAX, 0))
            and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def is_main_process_env() -> bool:
    """Rank 0 by the launcher's environment (``RANK``), usable before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed_from_env(device_request: Optional[str] = None) -> torch.device:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1); return this rank's device."""
    device = default_device(device_request)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=ddp_backend(device))
    return device
