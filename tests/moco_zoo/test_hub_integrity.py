"""Hub downloads are verified: the sha256 that publishing records in config.json is checked on every download through
moco_zoo (``moco-zoo download``, ``load_backbone("hf-hub:...")``); a flipped byte in the served file or in the cache
is an error naming the file and both hashes, and the bad cache entry is removed so the next download repairs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moco_zoo import hub
from moco_zoo.checkpoint import CheckpointError
from moco_zoo.testing import LocalHubServer, hub_client_pointed_at

from .test_hub import _official_v2, _small_config

REPO = "moco-zoo-test/integrity-r18"


def _flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def published(tmp_path):
    ckpt = tmp_path / "moco_v2_r18.pth.tar"
    expected = _official_v2("resnet18", ckpt)
    server = LocalHubServer()
    endpoint = server.start()
    cache = tmp_path / "hf-cache"
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        folder, _ = hub.publish(ckpt, _small_config(tmp_path), REPO, endpoint=endpoint)
    yield server, endpoint, cache, folder, expected
    server.stop()


def test_published_config_records_the_weights_checksums(published):
    server, endpoint, cache, folder, _ = published
    config = json.loads(server.read_file(REPO, "config.json"))
    recorded = config[hub.CHECKSUMS_KEY]
    assert recorded["model.safetensors"]["sha256"] == server.list_files(REPO)["model.safetensors"]["sha256"]
    assert set(recorded) == {"model.safetensors", "detectron2.pkl"}


def test_a_flipped_byte_in_the_cache_is_caught_removed_and_repaired(published):
    server, endpoint, cache, folder, expected = published
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        snapshot = hub.download(REPO)
    weights = snapshot / "model.safetensors"
    good = hub.sha256_file(weights)
    _flip_byte(weights.resolve())  # same size, one byte changed
    with hub_client_pointed_at(None, offline=True, cache_dir=cache):
        with pytest.raises(CheckpointError) as e:
            hub.download(REPO)
    msg = str(e.value)
    assert "model.safetensors" in msg and good in msg and "cached copy was removed" in msg
    assert not weights.exists()
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):  # online again: fetched and verified
        assert hub.sha256_file(hub.download(REPO) / "model.safetensors") == good
    # a truncated blob is repaired the same way
    blob = weights.resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        assert hub.sha256_file(hub.download(REPO) / "model.safetensors") == good
        import moco_zoo

        sd, arch = moco_zoo.load_backbone_state_dict(f"hf-hub:{REPO}")
    assert arch == "resnet18" and all(torch.equal(sd[k], v) for k, v in expected.items())


def test_a_tampered_served_file_is_refused_by_every_moco_zoo_path(published):
    server, endpoint, cache, folder, _ = published
    sha = server.list_files(REPO)["model.safetensors"]["sha256"]
    _flip_byte(server._blob_path(sha))
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        with pytest.raises(CheckpointError, match=rf"model\.safetensors has sha256 [0-9a-f]{{64}} .* records {sha}"):
            hub.download(REPO)
        import moco_zoo

        with pytest.raises(CheckpointError, match="model.safetensors has sha256"):
            moco_zoo.load_backbone(f"hf-hub:{REPO}")
    assert not list(cache.rglob("model.safetensors"))  # nothing bad stays in the cache
