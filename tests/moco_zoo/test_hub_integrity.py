"""Hub downloads are verified: the sha256 that publishing records in config.json is checked on every download through
moco_zoo (``moco-zoo download``, ``load_backbone("hf-hub:...")``); a flipped byte in the served file or in the cache
is an error naming the file and both hashes, and the bad cache entry is removed so the next download repairs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moco_zoo import hub, publish
from moco_zoo.checkpoint import CheckpointError
from tools.hub_server import LocalHubServer, hub_client_pointed_at

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
        folder, _ = publish.publish(ckpt, _small_config(tmp_path), REPO, endpoint=endpoint)
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


class _CuttingProxy:
    """A loopback TCP proxy in front of the Hub test server that cuts the first response longer than ``cut_after``
    bytes (a weights file: config and card are smaller) mid-body; the fault comes from outside the client's code."""

    def __init__(self, upstream: str, cut_after: int = 200_000):
        import socket
        import threading
        from urllib.parse import urlsplit

        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.cut_after, self.cuts, self.max_cuts = cut_after, 0, 1
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import socket
        import threading

        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client, socket.create_connection(self.upstream)),
                             daemon=True).start()

    def _handle(self, client, server):
        import threading

        request = client.recv(65536)
        server.sendall(request)

        def pump_up():
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    server.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if self.cuts < self.max_cuts and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    client.sendall(data[: self.cut_after - sent])
                    break  # the connection is cut mid-body
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self):
        self._stop = True
        self.sock.close()


def test_a_cut_connection_is_resumed_or_one_line(published, capsys, monkeypatch):
    """A transfer cut mid-body by a loopback proxy is resumed by huggingface_hub and then verified; a transport
    error that survives its retries is one line, with the partial blobs removed."""
    server, endpoint, cache, folder, _ = published
    proxy = _CuttingProxy(endpoint)
    try:
        from moco_zoo.cli import main

        with hub_client_pointed_at(proxy.endpoint, offline=False, cache_dir=cache):
            assert main(["download", REPO]) == 0 and proxy.cuts == 1
            snapshot = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert hub.verify_hub_files(snapshot) == ["model.safetensors", "detectron2.pkl"]
    finally:
        proxy.close()

    class RemoteProtocolError(Exception):  # the name httpx gives a connection closed mid-body
        pass

    partial = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / "abc.incomplete"
    partial.write_bytes(b"partial")

    def cut(*args, **kwargs):
        raise RemoteProtocolError("peer closed connection without sending complete message body")

    monkeypatch.setattr(hub, "snapshot_download", cut)
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        assert main(["download", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the download was interrupted (RemoteProtocolError" in err
    assert not partial.exists()


def test_timm_through_the_registered_zoo_models_verifies_the_hub_copy(published):
    """`timm.create_model(<zoo model>, pretrained=True)` for a published entry fetches through moco_zoo.hub.download."""
    import timm
    from timm.models import get_pretrained_cfg

    server, endpoint, cache, folder, expected = published
    cfg = dict(get_pretrained_cfg("moco_r18").to_dict(), hf_hub_id=REPO, url=None)
    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        model = timm.create_model("moco_r18", pretrained=True, pretrained_cfg=cfg)
        assert torch.equal(model.state_dict()["conv1.weight"], expected["conv1.weight"])
        _flip_byte(server._blob_path(server.list_files(REPO)["model.safetensors"]["sha256"]))
        for p in cache.rglob("model.safetensors"):
            p.resolve().unlink()
            p.unlink()
        with pytest.raises(CheckpointError, match="model.safetensors has sha256"):
            timm.create_model("moco_r18", pretrained=True, pretrained_cfg=cfg)
