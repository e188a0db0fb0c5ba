"""Downloads: Hub repositories through the Hugging Face cache (checked against the sha256 that moco-zoo records in
each repository's ``config.json``) and plain URLs (the authors' original files, checked against their published md5
prefix). Publishing Hub folders lives in :mod:`moco_zoo.publish`.
"""
from __future__ import annotations

import hashlib
import logging
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from . import zoo
from .checkpoint import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["WEIGHTS_FILE", "CONFIG_FILE", "CARD_FILE", "DETECTRON2_FILE", "CHECKSUMS_KEY", "download",
           "download_url", "resolve_repo_id", "verify_hub_files", "sha256_file", "md5_file", "verify_md5"]

PathLike = Union[str, "os.PathLike[str]"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
DETECTRON2_FILE = "detectron2.pkl"
HUB_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, DETECTRON2_FILE)
# config.json key holding {file: {"sha256", "size"}} of the weight files, written by moco_zoo.publish
CHECKSUMS_KEY = "moco_zoo_checksums"


# --------------------------------------------------------------------------------------------------------- checksums


def _hash_file(path: PathLike, h, chunk: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: PathLike) -> str:
    return _hash_file(path, hashlib.sha256())


def md5_file(path: PathLike) -> str:
    return _hash_file(path, hashlib.md5())


def verify_md5(path: PathLike, expected_prefix: Optional[str]) -> str:
    """Check the md5 of ``path`` starts with ``expected_prefix`` (the MoCo README publishes 8-hex-digit prefixes)."""
    digest = md5_file(path)
    if expected_prefix and not digest.startswith(expected_prefix.lower()):
        raise CheckpointError(
            f"{path}: md5 checksum mismatch: expected prefix {expected_prefix}, got {digest} "
            f"(corrupt or different download; delete the file and retry)"
        )
    return digest


# ----------------------------------------------------------------------------------------------------- plain URLs


def url_cache_path(url: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (timm's ``url`` loader) caches ``url``."""
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / os.path.basename(urlparse(url).path)


def download_url(url: str, dest: Optional[PathLike] = None, *, md5_prefix: Optional[str] = None,
                 cache_dir: Optional[PathLike] = None, progress: bool = False) -> Path:
    """Download ``url`` to ``dest`` (default: timm/torch.hub's url cache, so timm's own loader finds it) and check its
    md5 prefix before anything unpickles it.

    A cached copy that fails the check is fetched once more; a download that fails it is deleted and
    :class:`CheckpointError` raised. The file appears atomically (``torch.hub.download_url_to_file``)."""
    path = Path(dest) if dest is not None else url_cache_path(url, cache_dir)
    if path.is_file():
        try:
            verify_md5(path, md5_prefix)
            return path
        except CheckpointError:
            logger.warning("%s: the cached copy failed its md5 check; downloading it again", path)
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=progress)
    except Exception as e:
        raise CheckpointError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    try:
        verify_md5(path, md5_prefix)
    except CheckpointError as e:
        path.unlink(missing_ok=True)
        raise CheckpointError(f"download of {url}: {e}") from None
    return path


# ------------------------------------------------------------------------------------------------ Hub repositories


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _current_cache_dir() -> str:
    """The Hugging Face hub cache as the environment says *now* (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def resolve_repo_id(name: str) -> str:
    """Zoo name (``moco_r50``, ``moco_r50.v2_800ep``) -> its ``hf_hub_id``; ``ORG/REPO`` / ``hf-hub:ORG/REPO`` as is."""
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    if "/" in name:
        if name.count("/") != 1:
            raise ValueError(f"{name!r} is not a Hub repo id (expected ORG/NAME)")
        return name
    return zoo.resolve_entry(name).hub.repo_id


def _remove_cached(path: Path) -> None:
    """Drop a file from the Hugging Face cache: the snapshot link and the blob it points to."""
    blob = path.resolve()
    for p in (path, blob):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def verify_hub_files(folder: PathLike, names: Optional[Sequence[str]] = None, *, source: str = "") -> List[str]:
    """Check the files of a downloaded Hub folder against the sha256 (and size) recorded in its ``config.json``.

    A mismatch removes the bad file from the cache (so the next call downloads it again) and raises
    :class:`CheckpointError` naming the file and both hashes. Returns the names verified; folders without recorded
    checksums (not published by moco-zoo) verify nothing."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get(CHECKSUMS_KEY) or {}
    except (OSError, ValueError):
        return []
    verified = []
    for name, expected in recorded.items():
        path = folder / name
        if (names is not None and name not in names) or not path.exists():
            continue
        size = path.stat().st_size
        got = sha256_file(path)
        if got != expected.get("sha256") or (expected.get("size") is not None and size != expected["size"]):
            _remove_cached(path)
            raise CheckpointError(
                f"{source or folder}: {name} has sha256 {got} ({size} bytes) but config.json records "
                f"{expected.get('sha256')} ({expected.get('size')} bytes): the file is corrupt or was altered; the "
                f"cached copy was removed, download it again")
        verified.append(name)
    return verified


def _network_error(e: BaseException) -> bool:
    """A transport failure (connection cut, timeout) as raised by huggingface_hub's HTTP clients."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TimeoutException", "TransportError", "RemoteProtocolError",
                         "ReadTimeout", "ChunkedEncodingError", "ProtocolError", "IncompleteRead"})


def _remove_incomplete(cache: PathLike, repo_id: str) -> None:
    """Partial downloads of ``repo_id`` (``*.incomplete`` blobs) left by a cut connection."""
    repo_dir = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    for p in repo_dir.glob("*.incomplete") if repo_dir.is_dir() else ():
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def download(name: str, *, revision: Optional[str] = None, filename: Optional[str] = None,
             endpoint: Optional[str] = None, cache_dir: Optional[PathLike] = None,
             local_files_only: Optional[bool] = None, token: Union[str, bool, None] = None) -> Path:
    """Fetch a zoo model (or ``ORG/REPO``) through the Hugging Face cache; returns the snapshot folder (or the file).

    The cache location and offline mode follow the environment at call time (``HF_HUB_CACHE`` / ``HF_HOME``,
    ``HF_HUB_OFFLINE``): offline, only cached files are returned.
    """
    repo_id = resolve_repo_id(name)
    cache = str(cache_dir) if cache_dir is not None else _current_cache_dir()
    offline = _env_true("HF_HUB_OFFLINE") if local_files_only is None else local_files_only
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache, endpoint=endpoint, token=token,
                  local_files_only=offline)
    where = f"{name} ({repo_id}@{revision or 'main'})"
    for attempt in (0, 1):  # a corrupt cached file is removed by the check and fetched once more
        try:
            if filename:
                path = Path(hf_hub_download(filename=filename, **kwargs))
                if filename != CONFIG_FILE:
                    try:  # the recorded checksums; a repo not published by moco-zoo may have no config.json
                        hf_hub_download(filename=CONFIG_FILE, **kwargs)
                    except (LocalEntryNotFoundError, EntryNotFoundError):
                        logger.debug("%s: no config.json, so no recorded checksums", where)
                verify_hub_files(path.parent, [filename], source=where)
                return path
            snapshot = Path(snapshot_download(allow_patterns=list(HUB_FILES),
                                              **kwargs))
            verify_hub_files(snapshot, source=where)
            return snapshot
        except CheckpointError:
            if attempt or offline:
                raise
            logger.warning("%s: a cached file failed its checksum; downloading it again", where)
        except LocalEntryNotFoundError as e:
            state = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in" if offline else "not reachable and not in"
            raise FileNotFoundError(f"{where}: {state} the cache {cache}") from e
        except Exception as e:
            if not _network_error(e):
                raise
            _remove_incomplete(cache, repo_id)
            raise ConnectionError(f"{where}: the download was interrupted ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no detail'}); partial files were removed, "
                                  f"run the same command again") from None
    raise AssertionError("unreachable")
