"""The local Hub test server, driven by the real huggingface_hub client (Xet disabled, loopback only)."""
from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tools.hub_server import LocalHubServer, hub_client_pointed_at

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "test-org/tiny"


def _folder(root: Path, weights: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"architecture": "resnet18"}\n')
    (root / "model.safetensors").write_bytes(weights)
    (root / "README.md").write_text("---\nlibrary_name: timm\nlicense: mit\ntags:\n- moco\n---\n# tiny\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "notes.txt").write_text("hello\n")
    return root


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "hf-cache"


def test_roundtrip_with_real_client(tmp_path, cache_dir):
    weights = os.urandom(300_000)
    folder = _folder(tmp_path / "src", weights)
    server = LocalHubServer()
    with server as endpoint, hub_client_pointed_at(endpoint, offline=False, cache_dir=cache_dir):
        assert endpoint.startswith("http://127.0.0.1:")
        assert constants.ENDPOINT == endpoint and constants.HF_HUB_OFFLINE is False
        api = HfApi(endpoint=endpoint, token=False)
        url = api.create_repo(REPO, exist_ok=True)
        assert str(url).endswith(f"/{REPO}")
        api.create_repo(REPO, exist_ok=True)  # 409 -> fine with exist_ok
        with pytest.raises(Exception):
            api.create_repo(REPO)  # without exist_ok the conflict is an error

        first = api.upload_folder(repo_id=REPO, folder_path=str(folder))
        files = server.list_files(REPO)
        assert set(files) == {".gitattributes", "config.json", "model.safetensors", "README.md", "sub/notes.txt"}
        assert files["model.safetensors"]["lfs"] and not files["config.json"]["lfs"]
        assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
        log = " ".join(server.request_log)
        for route in ("/api/models/test-org/tiny/preupload/main", "/test-org/tiny.git/info/lfs/objects/batch",
                      "PUT /_lfs/objects/", "/api/models/test-org/tiny/commit/main", "POST /api/validate-yaml"):
            assert route in log

        path = hf_hub_download(REPO, "model.safetensors", endpoint=endpoint, cache_dir=cache_dir)
        assert Path(path).read_bytes() == weights
        assert Path(path).parent.name == server.head_commit(REPO)
        # without endpoint=: the patched constants route timm-style calls to the local server
        assert Path(hf_hub_download(REPO, "sub/notes.txt")).read_text() == "hello\n"

        info = api.model_info(REPO)
        assert info.sha == server.head_commit(REPO)
        assert info.library_name == "timm" and "moco" in info.tags
        assert {s.rfilename for s in info.siblings} == set(files)
        assert sorted(api.list_repo_files(REPO)) == sorted(files)
        assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.bin")
        snap = snapshot_download(REPO, endpoint=endpoint, cache_dir=cache_dir)
        assert (Path(snap) / "sub" / "notes.txt").read_text() == "hello\n"

        # unchanged content: no new commit; changed content: new commit, old revision still downloadable
        again = api.upload_folder(repo_id=REPO, folder_path=str(folder))
        assert again.oid == first.oid
        (folder / "config.json").write_text('{"architecture": "resnet50"}\n')
        second = api.upload_folder(repo_id=REPO, folder_path=str(folder))
        assert second.oid != first.oid and server.head_commit(REPO) == second.oid
        new = hf_hub_download(REPO, "config.json", endpoint=endpoint, cache_dir=cache_dir)
        old = hf_hub_download(REPO, "config.json", revision=first.oid, endpoint=endpoint, cache_dir=cache_dir)
        assert "resnet50" in Path(new).read_text() and "resnet18" in Path(old).read_text()
        # only the blob that changed was uploaded again through LFS (same weights -> "already present")
        assert sum("PUT /_lfs/objects/" in line for line in server.request_log) == 1


def test_hub_error_codes(tmp_path, cache_dir):
    folder = _folder(tmp_path / "src", b"\0" * 10)
    with LocalHubServer() as endpoint, hub_client_pointed_at(endpoint, cache_dir=cache_dir):
        api = HfApi(endpoint=endpoint, token=False)
        api.create_repo(REPO)
        api.upload_folder(repo_id=REPO, folder_path=str(folder))
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("test-org/missing", "config.json", endpoint=endpoint, cache_dir=cache_dir)
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(REPO, "config.json", revision="no-such-branch", endpoint=endpoint, cache_dir=cache_dir)
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(REPO, "missing.bin", endpoint=endpoint, cache_dir=cache_dir)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("test-org/missing")
        # a model card whose front matter is not valid YAML is refused before anything is uploaded
        (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# broken\n")
        with pytest.raises(ValueError, match="Invalid metadata"):
            api.upload_folder(repo_id=REPO, folder_path=str(folder))


def test_stop_closes_connections_and_cache_serves_offline(tmp_path, cache_dir):
    folder = _folder(tmp_path / "src", b"weights" * 1000)
    server = LocalHubServer()
    with server as endpoint, hub_client_pointed_at(endpoint, cache_dir=cache_dir):
        api = HfApi(endpoint=endpoint, token=False)
        api.create_repo(REPO)
        api.upload_folder(repo_id=REPO, folder_path=str(folder))
        cached = hf_hub_download(REPO, "model.safetensors")
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{endpoint}/api/models/{REPO}", timeout=5)
    # offline mode: served from the cache, nothing is requested
    with hub_client_pointed_at(None, offline=True, cache_dir=cache_dir):
        n = len(server.request_log)
        assert hf_hub_download(REPO, "model.safetensors") == cached
        assert len(server.request_log) == n
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "config.json")  # never downloaded
    # online but the server is gone: the client falls back to the cache quickly (no waiting on a dead endpoint)
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache_dir):
        t0 = time.monotonic()
        assert hf_hub_download(REPO, "model.safetensors") == cached
        assert time.monotonic() - t0 < 10


def test_client_constants_restored_and_loopback_only(tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HUGGINGFACE_CO_URL_TEMPLATE,
              constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"))
    with hub_client_pointed_at("http://127.0.0.1:9", offline=False, cache_dir=tmp_path):
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith("http://127.0.0.1:9/")
        assert os.environ["HF_HUB_OFFLINE"] == "0" and constants.HF_HUB_CACHE == str(tmp_path)
    assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HUGGINGFACE_CO_URL_TEMPLATE,
            constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT")) == before
    with pytest.raises(ValueError, match="loopback"):
        LocalHubServer(host="0.0.0.0")
    with pytest.raises(RuntimeError, match="not running"):
        LocalHubServer().endpoint
