"""A local Hugging Face Hub look-alike on 127.0.0.1, for end-to-end tests of publish / download with the real client.

It implements the HTTP endpoints that ``huggingface_hub`` (read against version 2.4) calls when Xet is disabled
(``HF_HUB_DISABLE_XET=1``):

==========================================================  =========================================================
``POST /api/repos/create``, ``POST /api/repos/delete``      ``HfApi.create_repo`` / ``delete_repo``
``POST /api/validate-yaml``                                 README.md front-matter check done by ``create_commit``
``POST /api/{type}s/{repo}/preupload/{rev}``                upload mode (regular / lfs) + remote oid per file
``POST /{repo}.git/info/lfs/objects/batch``                 LFS batch API ("basic" transfer)
``PUT /_lfs/objects/{oid}``, ``POST /_lfs/verify``           LFS upload target and verify action
``POST /api/{type}s/{repo}/commit/{rev}``                   ndjson commit (file, lfsFile, deletedFile, deletedFolder)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                    ``hf_hub_download``: ETag / X-Linked-Etag / X-Repo-Commit /
                                                            X-Linked-Size headers, Range requests, Hub error codes
``GET /api/{type}s/{repo}[/revision/{rev}]``                ``model_info`` / ``repo_info`` (sha, siblings, cardData)
``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``             ``list_repo_tree`` / ``list_repo_files`` / ``snapshot_download``
``POST /api/{type}s/{repo}/paths-info/{rev}``               ``get_paths_info``
``GET /api/whoami-v2``                                      ``whoami``
==========================================================  =========================================================

Repositories are kept in memory (commits, refs, file tables); file contents live in a content-addressed blob store on
disk (a temporary directory unless ``storage_dir`` is given). Errors carry the Hub's ``X-Error-Code`` header
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client raises its usual exception types.

Usage::

    server = LocalHubServer()
    with server as endpoint:                       # "http://127.0.0.1:<port>"
        HfApi(endpoint=endpoint).create_repo("org/name")
        ...
    # stopped: every open connection is closed, later requests fail to connect

:func:`hub_client_pointed_at` points an *already imported* ``huggingface_hub`` at an endpoint (it reads ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HUB_DISABLE_XET`` once, at import time), which is what timm's
``hf-hub:`` loader needs since it calls ``hf_hub_download`` without an ``endpoint`` argument.
"""
from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["LocalHubServer", "hub_client_pointed_at", "LFS_PATTERNS", "LFS_SIZE_THRESHOLD"]

# Files stored through LFS, as in the .gitattributes the Hub writes into every new repo (abridged), plus any file of
# LFS_SIZE_THRESHOLD bytes or more and any file whose first bytes are binary.
LFS_PATTERNS: Tuple[str, ...] = (
    "*.safetensors", "*.bin", "*.pkl", "*.pickle", "*.pth", "*.pt", "*.tar", "*.ckpt", "*.h5", "*.onnx", "*.npy",
    "*.npz", "*.zip", "*.gz", "*.tgz", "*.zst", "*.msgpack", "*.model", "*.tflite", "*.joblib", "*.arrow", "*.parquet",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = ("preupload", "commit", "revision", "tree", "paths-info")


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + "000Z"


def _git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _front_matter(text: str) -> Tuple[Optional[str], str]:
    """(YAML block or None, body) of a model card."""
    if not text.startswith("---"):
        return None, text
    lines = text.splitlines(keepends=True)
    if lines[0].strip() != "---":
        return None, text
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1:])
    return None, text


class _HubError(Exception):
    """An HTTP error answered with the Hub's error headers and a JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass
class _File:
    size: int
    sha256: str  # key in the blob store
    git_oid: str  # git blob id (of the content, or of the LFS pointer file)
    lfs: bool

    def tree_entry(self, path: str) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size,
                            "pointerSize": len(_lfs_pointer(self.sha256, self.size))}
        return entry


@dataclass
class _Commit:
    oid: str
    parent: Optional[str]
    title: str
    description: str
    date: str
    files: Dict[str, _File]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: Dict[str, _Commit] = field(default_factory=dict)
    refs: Dict[str, str] = field(default_factory=dict)


class LocalHubServer:
    """In-process Hub test server bound to 127.0.0.1 (an ephemeral port unless ``port`` is given).

    ``with LocalHubServer() as endpoint:`` starts it and yields the endpoint URL; leaving the block stops it and closes
    every open connection, so a client that still holds a pooled connection cannot reach it either.
    Introspection for tests: :meth:`repo_ids`, :meth:`list_files`, :meth:`read_file`, :meth:`head_commit` and
    :attr:`request_log` (``"METHOD /path"`` strings, in arrival order).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, storage_dir: Union[str, Path, None] = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"LocalHubServer only binds to loopback, got host={host!r}")
        self.host = host
        self.port = port
        self._own_storage = storage_dir is None
        self._storage_arg = Path(storage_dir) if storage_dir is not None else None
        self.storage_dir: Optional[Path] = None
        self._lock = threading.RLock()
        self._repos: Dict[Tuple[str, str], _Repo] = {}
        self._lfs_objects: Dict[str, int] = {}  # sha256 -> size of LFS objects uploaded (any repo)
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._connections: "set[socket.socket]" = set()
        self._commit_counter = 0
        self.request_log: List[str] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); only valid while the server runs."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running; use `with LocalHubServer() as endpoint:` or start()")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._httpd.server_address[1]}"

    def start(self) -> str:
        """Start serving in a background thread; returns the endpoint URL."""
        if self._httpd is not None:
            return self.endpoint
        if self._own_storage:
            self.storage_dir = Path(tempfile.mkdtemp(prefix="moco-zoo-local-hub-"))
        else:
            assert self._storage_arg is not None
            self.storage_dir = self._storage_arg
            self.storage_dir.mkdir(parents=True, exist_ok=True)
        (self.storage_dir / "blobs").mkdir(exist_ok=True)
        server = self

        class _Httpd(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request, client_address):  # type: ignore[override]
                with server._lock:
                    server._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):  # type: ignore[override]
                with server._lock:
                    server._connections.discard(request)
                super().shutdown_request(request)

        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = _Httpd((self.host, self.port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-hub-server", daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving, close open connections and (if it made one) remove the blob store."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns, self._connections = list(self._connections), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._own_storage and self.storage_dir is not None:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    # ------------------------------------------------------------------ introspection
    def repo_ids(self, repo_type: str = "model") -> List[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def head_commit(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve(self._repo(repo_type, repo_id), revision).oid

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> Dict[str, Dict[str, Any]]:
        """``{path: {"size", "sha256", "lfs"}}`` at a revision."""
        with self._lock:
            commit = self._resolve(self._repo(repo_type, repo_id), revision)
            return {p: {"size": f.size, "sha256": f.sha256, "lfs": f.lfs} for p, f in commit.files.items()}

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            commit = self._resolve(self._repo(repo_type, repo_id), revision)
            if path not in commit.files:
                raise FileNotFoundError(f"{repo_type} repo {repo_id}@{revision} has no file {path!r}")
            return self._blob_path(commit.files[path].sha256).read_bytes()

    # ------------------------------------------------------------------ storage
    def _blob_path(self, sha256: str) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir / "blobs" / sha256

    def _store_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if not path.exists():
            tmp = path.with_name(f"{digest}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository Not Found: {repo_type} repo {repo_id!r} does not exist on this server",
                            "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        if revision in repo.refs:
            return repo.commits[repo.refs[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        raise _HubError(404, f"Invalid rev id: {revision!r} is neither a branch nor a commit of {repo.repo_id}",
                        "RevisionNotFound")

    def _new_commit(self, repo: _Repo, parent: Optional[_Commit], title: str, description: str,
                    files: Dict[str, _File]) -> _Commit:
        self._commit_counter += 1
        seed = json.dumps([repo.repo_id, parent.oid if parent else None, title, self._commit_counter, time.time(),
                           sorted((p, f.git_oid) for p, f in files.items())])
        commit = _Commit(oid=hashlib.sha1(seed.encode()).hexdigest(), parent=parent.oid if parent else None,
                         title=title, description=description, date=_now_iso(), files=files)
        repo.commits[commit.oid] = commit
        return commit

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Tuple[bool, _Repo]:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                return False, self._repos[key]
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            gitattributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
            digest = self._store_bytes(gitattributes)
            files = {".gitattributes": _File(len(gitattributes), digest, _git_blob_sha1(gitattributes), False)}
            commit = self._new_commit(repo, None, "initial commit", "", files)
            repo.refs["main"] = commit.oid
            self._repos[key] = repo
            return True, repo

    @staticmethod
    def upload_mode(path: str, size: int, sample: bytes) -> str:
        """"lfs" for LFS-tracked names, large files and binary content; "regular" otherwise (empty files too)."""
        if size == 0:
            return "regular"
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, pat) for pat in LFS_PATTERNS) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        return "regular"

    # ------------------------------------------------------------------ API implementations (called by the handler)
    def api_create_repo(self, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        name = body.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise _HubError(400, f"create repo: invalid or missing 'name' in payload {body!r}")
        org = body.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = body.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise _HubError(400, f"create repo: unsupported repo type {repo_type!r}")
        private = body.get("private") is True or body.get("visibility") == "private"
        created, _ = self._create_repo(repo_type, repo_id, private)
        url = f"{self.endpoint}/{_URL_PREFIX.get(repo_type, '')}{repo_id}"
        if not created:
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def api_delete_repo(self, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        org, name = body.get("organization"), body.get("name")
        repo_id = f"{org}/{name}" if org else str(name)
        repo_type = body.get("type") or "model"
        with self._lock:
            self._repo(repo_type, repo_id)
            del self._repos[(repo_type, repo_id)]
        return 200, {}

    def api_preupload(self, repo: _Repo, revision: str, body: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            commit = self._resolve(repo, revision)
            out = []
            for item in body.get("files", []):
                path, size = item["path"], int(item["size"])
                sample = base64.b64decode(item.get("sample", ""))
                mode = self.upload_mode(path, size, sample)
                existing = commit.files.get(path)
                oid = None
                if existing is not None:
                    oid = existing.sha256 if mode == "lfs" and existing.lfs else existing.git_oid
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return {"files": out, "commitOid": commit.oid}

    def api_lfs_batch(self, repo: _Repo, body: Dict[str, Any]) -> Dict[str, Any]:
        if body.get("operation") != "upload":
            raise _HubError(400, f"LFS batch on {repo.repo_id}: only the 'upload' operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            entry: Dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with self._lock:
                present = self._lfs_objects.get(oid) == size
            if not present:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/objects/{oid}?size={size}", "header": {}},
                    "verify": {"href": f"{self.endpoint}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid: str, expected_size: Optional[int], data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != oid:
            raise _HubError(400, f"LFS upload: content sha256 {digest} does not match the object id {oid}")
        if expected_size is not None and expected_size != len(data):
            raise _HubError(400, f"LFS upload {oid}: got {len(data)} bytes, batch announced {expected_size}")
        with self._lock:
            self._store_bytes(data)
            self._lfs_objects[oid] = len(data)

    def lfs_verify(self, body: Dict[str, Any]) -> None:
        oid, size = str(body.get("oid")), body.get("size")
        with self._lock:
            if self._lfs_objects.get(oid) != size:
                raise _HubError(404, f"LFS verify: object {oid} of size {size} was not uploaded")

    def api_commit(self, repo: _Repo, revision: str, raw: bytes, create_pr: bool) -> Dict[str, Any]:
        if create_pr:
            raise _HubError(400, "commit: pull requests (create_pr=1) are not supported by the local test Hub")
        header: Dict[str, Any] = {}
        ops: List[Tuple[str, Dict[str, Any]]] = []
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as e:
                raise _HubError(400, f"commit payload line {n} is not a {{key, value}} JSON object: {e}")
            if key == "header":
                header = value
            else:
                ops.append((key, value))
        with self._lock:
            if revision not in repo.refs:
                raise _HubError(404, f"commit: branch {revision!r} does not exist in {repo.repo_id}",
                                "RevisionNotFound")
            head = repo.commits[repo.refs[revision]]
            parent = header.get("parentCommit")
            if parent and parent != head.oid:
                raise _HubError(412, f"commit: parentCommit {parent} is not the head of {revision} ({head.oid})")
            files = dict(head.files)
            for key, value in ops:
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HubError(400, f"commit: unsupported encoding {value.get('encoding')!r} for {path}")
                    data = base64.b64decode(value["content"])
                    files[path] = _File(len(data), self._store_bytes(data), _git_blob_sha1(data), False)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if value.get("algo", "sha256") != "sha256":
                        raise _HubError(400, f"commit: unsupported LFS hash algorithm for {path}")
                    if oid not in self._lfs_objects:
                        raise _HubError(422, f"commit: LFS object {oid} for {path!r} was never uploaded")
                    size = self._lfs_objects[oid]
                    files[path] = _File(size, oid, _git_blob_sha1(_lfs_pointer(oid, size)), True)
                elif key == "deletedFile":
                    if path not in files:
                        raise _HubError(404, f"commit: cannot delete {path!r}, not in {repo.repo_id}@{revision}",
                                        "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise _HubError(400, f"commit: unsupported operation {key!r}")
            commit = self._new_commit(repo, head, str(header.get("summary", "")), str(header.get("description", "")),
                                      files)
            repo.refs[revision] = commit.oid
        prefix = _URL_PREFIX.get(repo.repo_type, "")
        return {"success": True, "commitOid": commit.oid, "pullRequestUrl": None, "hookOutput": "",
                "commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}"}

    def api_repo_info(self, repo: _Repo, revision: str, query: Dict[str, List[str]]) -> Dict[str, Any]:
        with self._lock:
            commit = self._resolve(repo, revision)
            blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path in sorted(commit.files):
                f = commit.files[path]
                sib: Dict[str, Any] = {"rfilename": path}
                if blobs:
                    sib.update(size=f.size, blobId=f.git_oid)
                    if f.lfs:
                        sib["lfs"] = {"sha256": f.sha256, "size": f.size,
                                      "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
                siblings.append(sib)
            card: Dict[str, Any] = {}
            if "README.md" in commit.files:
                meta, _ = _front_matter(self._blob_path(commit.files["README.md"].sha256).read_text("utf-8"))
                with contextlib.suppress(yaml.YAMLError):
                    loaded = yaml.safe_load(meta) if meta else None
                    card = loaded if isinstance(loaded, dict) else {}
            config = None
            if "config.json" in commit.files:
                with contextlib.suppress(ValueError):
                    config = json.loads(self._blob_path(commit.files["config.json"].sha256).read_text("utf-8"))
            tags = list(card.get("tags") or [])
            if card.get("library_name") and card["library_name"] not in tags:
                tags.insert(0, card["library_name"])
            info: Dict[str, Any] = {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
                "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": tags, "siblings": siblings, "cardData": card or None,
            }
            if repo.repo_type == "model":
                info["library_name"] = card.get("library_name")
                info["pipeline_tag"] = card.get("pipeline_tag")
                info["config"] = config
            return info

    def api_tree(self, repo: _Repo, revision: str, path: str, recursive: bool) -> List[Dict[str, Any]]:
        with self._lock:
            commit = self._resolve(repo, revision)
            base = path.strip("/")
            prefix = base + "/" if base else ""
            if base and base in commit.files:
                raise _HubError(400, f"tree: {base!r} is a file, not a folder, in {repo.repo_id}@{revision}")
            entries: Dict[str, Dict[str, Any]] = {}
            for p in sorted(commit.files):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                parts = rest.split("/")
                for depth in range(1, len(parts)):  # folders on the way
                    folder = prefix + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode())
                                                    .hexdigest(), "size": 0, "path": folder})
                if recursive or len(parts) == 1:
                    entries[p] = commit.files[p].tree_entry(p)
            if base and not entries:
                raise _HubError(404, f"tree: no folder {base!r} in {repo.repo_id}@{revision}", "EntryNotFound",
                                {"X-Repo-Commit": commit.oid})
            return [entries[k] for k in sorted(entries)]

    def api_paths_info(self, repo: _Repo, revision: str, paths: List[str]) -> List[Dict[str, Any]]:
        with self._lock:
            commit = self._resolve(repo, revision)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    out.append(commit.files[p].tree_entry(p))
                elif any(q.startswith(p + "/") for q in commit.files):
                    out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0,
                                "path": p})
            return out

    def resolve_file(self, repo: _Repo, revision: str, path: str) -> Tuple[_Commit, _File]:
        with self._lock:
            commit = self._resolve(repo, revision)
            f = commit.files.get(path)
            if f is None:
                raise _HubError(404, f"Entry Not Found: {path!r} is not in {repo.repo_id}@{revision}",
                                "EntryNotFound", {"X-Repo-Commit": commit.oid})
            return commit, f


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the bound :class:`LocalHubServer` (class attribute ``hub``)."""

    hub: LocalHubServer
    protocol_version = "HTTP/1.1"
    server_version = "moco-zoo-local-hub/1"
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests read request_log instead
        pass

    # -------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self, raw: bytes) -> Dict[str, Any]:
        try:
            value = json.loads(raw or b"{}")
        except ValueError as e:
            raise _HubError(400, f"{self.command} {self.path}: request body is not JSON ({e})")
        if not isinstance(value, dict):
            raise _HubError(400, f"{self.command} {self.path}: expected a JSON object")
        return value

    def _send(self, status: int, payload: Any = None, headers: Optional[Dict[str, str]] = None,
              content_type: str = "application/json") -> None:
        body = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _dispatch(self) -> None:
        self.hub.request_log.append(f"{self.command} {self.path}")
        raw = b"" if self.command in ("GET", "HEAD") else self._body()
        try:
            if not self.hub.running:
                raise _HubError(503, "local Hub server is shutting down")
            self._route(raw)
        except _HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message.replace("\n", " ")[:500]
            self._send(e.status, {"error": e.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # a bug in the test server: answer 500 with the reason instead of hanging the client
            self._send(500, {"error": f"local Hub server error: {type(e).__name__}: {e}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # type: ignore[assignment]

    # -------------------------------------------------------------- routing
    def _split_repo(self, segs: List[str], markers: Tuple[str, ...]) -> Tuple[str, str, List[str]]:
        """(repo_type, repo_id, rest) from path segments like [datasets/]org/name/<marker>/..."""
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = segs[0][:-1], segs[1:]
        if len(segs) >= 3 and segs[2] in markers:
            return repo_type, f"{segs[0]}/{segs[1]}", segs[2:]
        if len(segs) >= 2 and segs[1] in markers:
            return repo_type, segs[0], segs[1:]
        raise _HubError(404, f"{self.command} {self.path}: no such route on the local test Hub")

    def _route(self, raw: bytes) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        segs = [unquote(s) for s in url.path.strip("/").split("/")] if url.path.strip("/") else []
        method = self.command

        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["repos", "create"] and method == "POST":
                status, payload = hub.api_create_repo(self._json_body(raw))
                return self._send(status, payload)
            if rest == ["repos", "delete"] and method == "DELETE" or rest == ["repos", "delete"] and method == "POST":
                return self._send(*hub.api_delete_repo(self._json_body(raw)))
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(self._json_body(raw))
            if rest[:1] == ["whoami-v2"]:
                return self._send(200, {"type": "user", "name": "local-user", "fullname": "Local Test User",
                                        "orgs": [], "auth": {"accessToken": {"role": "write"}}})
            if rest and rest[0] in ("models", "datasets", "spaces"):
                repo_type = rest[0][:-1]
                tail = rest[1:]
                if len(tail) >= 3 and tail[2] in _API_ACTIONS:
                    repo_id, action, args = f"{tail[0]}/{tail[1]}", tail[2], tail[3:]
                elif len(tail) >= 2 and tail[1] in _API_ACTIONS:
                    repo_id, action, args = tail[0], tail[1], tail[2:]
                elif 1 <= len(tail) <= 2:
                    repo_id, action, args = "/".join(tail), "info", []
                else:
                    raise _HubError(404, f"{method} {self.path}: no such route on the local test Hub")
                repo = hub._repo(repo_type, repo_id)
                revision = args[0] if args else "main"
                if action == "info" and method == "GET":
                    return self._send(200, hub.api_repo_info(repo, "main", query))
                if action == "revision" and method == "GET":
                    return self._send(200, hub.api_repo_info(repo, revision, query))
                if action == "preupload" and method == "POST":
                    return self._send(200, hub.api_preupload(repo, revision, self._json_body(raw)))
                if action == "commit" and method == "POST":
                    create_pr = query.get("create_pr", ["0"])[0] in ("1", "true")
                    return self._send(200, hub.api_commit(repo, revision, raw, create_pr))
                if action == "tree" and method == "GET":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return self._send(200, hub.api_tree(repo, revision, "/".join(args[1:]), recursive))
                if action == "paths-info" and method == "POST":
                    form = parse_qs(raw.decode("utf-8"))
                    if not form and raw.strip().startswith(b"{"):
                        form = {k: v if isinstance(v, list) else [v] for k, v in self._json_body(raw).items()}
                    return self._send(200, hub.api_paths_info(repo, revision, list(form.get("paths", []))))
            raise _HubError(404, f"{method} {self.path}: no such route on the local test Hub")

        if segs[:2] == ["_lfs", "objects"] and len(segs) == 3 and method == "PUT":
            size = query.get("size", [None])[0]
            hub.lfs_put(segs[2], int(size) if size is not None else None, raw)
            return self._send(200, {})
        if segs == ["_lfs", "verify"] and method == "POST":
            hub.lfs_verify(self._json_body(raw))
            return self._send(200, {})

        if len(segs) >= 5 and segs[-4:] == ["info", "lfs", "objects", "batch"] and segs[-5].endswith(".git"):
            # /{[datasets/]repo}.git/info/lfs/objects/batch
            if method != "POST":
                raise _HubError(405, f"{method} {self.path}: the LFS batch API only accepts POST")
            repo_segs = segs[:-4]
            repo_segs[-1] = repo_segs[-1][: -len(".git")]
            repo_type = "model"
            if repo_segs[0] in ("datasets", "spaces"):
                repo_type, repo_segs = repo_segs[0][:-1], repo_segs[1:]
            repo = hub._repo(repo_type, "/".join(repo_segs))
            return self._send(200, hub.api_lfs_batch(repo, self._json_body(raw)),
                              content_type="application/vnd.git-lfs+json")

        if method in ("GET", "HEAD") and "resolve" in segs:
            repo_type, repo_id, rest = self._split_repo(segs, ("resolve",))
            if len(rest) < 3:
                raise _HubError(404, f"{method} {self.path}: expected /resolve/<revision>/<path>")
            repo = hub._repo(repo_type, repo_id)
            return self._serve_file(repo, rest[1], "/".join(rest[2:]))

        raise _HubError(404, f"{method} {self.path}: no such route on the local test Hub")

    def _validate_yaml(self, body: Dict[str, Any]) -> None:
        meta, _ = _front_matter(str(body.get("content", "")))
        if meta is None:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo "
                                                                         "card"}]})
        try:
            loaded = yaml.safe_load(meta)
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": f"Invalid YAML in README.md front matter: {e}"}]},
                              {"X-Error-Message": "Invalid YAML metadata"})
        if loaded is not None and not isinstance(loaded, dict):
            return self._send(400, {"errors": [{"message": "README.md front matter must be a YAML mapping"}]},
                              {"X-Error-Message": "Invalid YAML metadata"})
        return self._send(200, {"errors": [], "warnings": []})

    def _serve_file(self, repo: _Repo, revision: str, path: str) -> None:
        commit, f = self.hub.resolve_file(repo, revision, path)
        blob = self.hub._blob_path(f.sha256)
        headers = {
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if f.lfs:
            headers.update({"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        else:
            headers["ETag"] = f'"{f.git_oid}"'
        start, end, status = 0, f.size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and f.size > 0:
            first, _, last = rng[len("bytes="):].split(",")[0].partition("-")
            try:
                if first:
                    start, end = int(first), (int(last) if last else f.size - 1)
                else:  # suffix range: last N bytes
                    start = max(f.size - int(last), 0)
                end = min(end, f.size - 1)
            except ValueError:
                raise _HubError(400, f"bad Range header {rng!r}")
            if start > end:
                self._send(416, b"", {"Content-Range": f"bytes */{f.size}", **headers})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with open(blob, "rb") as fh:
            fh.seek(start)
            remaining = length
            while remaining > 0:
                chunk = fh.read(min(1 << 20, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


@contextlib.contextmanager
def hub_client_pointed_at(endpoint: Optional[str], *, offline: bool = False,
                          cache_dir: Union[str, Path, None] = None) -> Iterator[None]:
    """Point the imported ``huggingface_hub`` at ``endpoint`` (or keep its endpoint when None) for the block.

    ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HUB_DISABLE_XET`` once at
    import, and timm's ``hf-hub:`` loader calls ``hf_hub_download`` without ``endpoint=``, so setting environment
    variables in a running process is not enough. This patches the module constants (and the environment, for
    subprocesses) and restores both on exit. Xet is always disabled inside the block (the local server speaks LFS).
    ``cache_dir`` (default: ``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` as currently set) becomes the default cache.
    """
    from huggingface_hub import constants

    if cache_dir is None:
        env_cache = os.environ.get("HF_HUB_CACHE")
        env_home = os.environ.get("HF_HOME")
        cache_dir = env_cache or (os.path.join(env_home, "hub") if env_home else None)
    saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_CACHE")}
    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_CACHE")
    saved_consts = {n: getattr(constants, n) for n in names}
    saved_api_endpoint = None
    api_obj = None
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub import hf_api as _hf_api_mod

        api_obj = _hf_api_mod.api
        saved_api_endpoint = api_obj.endpoint
    try:
        if endpoint is not None:
            endpoint = endpoint.rstrip("/")
            constants.ENDPOINT = endpoint
            constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
            os.environ["HF_ENDPOINT"] = endpoint
            if api_obj is not None:
                api_obj.endpoint = endpoint
        constants.HF_HUB_OFFLINE = bool(offline)
        os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
        constants.HF_HUB_DISABLE_XET = True
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        if cache_dir is not None:
            constants.HF_HUB_CACHE = str(cache_dir)
            os.environ["HF_HUB_CACHE"] = str(cache_dir)
        yield
    finally:
        for n, v in saved_consts.items():
            setattr(constants, n, v)
        if api_obj is not None:
            api_obj.endpoint = saved_api_endpoint
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
