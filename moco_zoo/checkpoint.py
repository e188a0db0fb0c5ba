"""Safe checkpoint loading and atomic writing, and the checkpoint kinds this project writes.

Loading never unpickles arbitrary objects unless the caller opts in (``allow_pickle=True``): official MoCo files and
our own checkpoints are plain tensors/containers and load with ``torch.load(weights_only=True)``. Writing goes to a
temporary file in the same directory followed by ``os.replace``, so a crash never leaves a truncated checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Union

import torch

PathLike = Union[str, os.PathLike]

# Every checkpoint this project writes carries one of these in its "kind" field.
KIND_PRETRAIN = "moco-pretrain"
KIND_LINEAR_PROBE = "linear-probe"
KIND_BACKBONE = "backbone"
KIND_TRANSFER = "transfer"
KINDS = (KIND_PRETRAIN, KIND_LINEAR_PROBE, KIND_BACKBONE, KIND_TRANSFER)


# what tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") creates in _atomic_write
_TMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe to load, or of the wrong kind. The message names the file."""


def _atomic_write(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    return path


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_pickle_dump(obj: Any, path: PathLike, protocol: int = 2) -> Path:
    return _atomic_write(path, lambda f: pickle.dump(obj, f, protocol=protocol))


def safe_torch_load(path: PathLike, *, allow_pickle: bool = False, map_location: Any = "cpu") -> Any:
    """Load a torch checkpoint with ``weights_only=True``.

    ``allow_pickle=True`` falls back to full unpickling, which can run arbitrary code: only for files you trust.
    Raises :class:`CheckpointError` naming the file for missing, truncated or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format / a pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; it "
                              f"starts with {head!r})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e2:  # the file is untrusted input: any failure is this file's problem
                raise CheckpointError(f"{path}: not a readable checkpoint ({type(e2).__name__}: {e2})") from None
        raise CheckpointError(
            f"{path}: refusing to unpickle arbitrary objects from this checkpoint (torch.load(weights_only=True) "
            f"failed: {str(e).splitlines()[0]}). Pass allow_pickle=True (CLI: --allow-pickle) only if you trust "
            f"the file."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def checkpoint_kind(obj: Any) -> str:
    """The kind recorded in a checkpoint written by this project, or "" for foreign files."""
    if isinstance(obj, dict) and isinstance(obj.get("kind"), str):
        return obj["kind"]
    return ""


def require_kind(obj: Dict[str, Any], kind: str, path: PathLike) -> None:
    found = checkpoint_kind(obj)
    if found != kind:
        raise CheckpointError(f"{path}: expected a checkpoint of kind {kind!r}, found {found or 'no kind field'!r}")


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete the temporary files that :func:`atomic_torch_save` and friends leave when a process is killed during a
    write (``.<name>.<random>.tmp`` beside their target) in ``directory``; only our own pattern is touched. Call it
    at the start of a job, when no writer of this run is alive. Returns the removed paths."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.is_file() and _TMP_PATTERN.match(p.name):
            with _suppress():
                p.unlink()
                removed.append(p)
    return removed


def read_json_object(path: PathLike, what: str = "JSON file") -> Dict[str, Any]:
    """The JSON object in ``path``; a missing file, invalid JSON or a non-object is one error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object in the {what}, got {type(data).__name__}")
    return data
