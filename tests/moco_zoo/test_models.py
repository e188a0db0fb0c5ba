"""moco_zoo.models: timm registration of every hub_configs entry and the pretrained weight sources (offline)."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import timm
import torch

import moco_zoo  # noqa: F401  (registers the models)
from moco_zoo import convert, hub, models, zoo
from moco_zoo.checkpoint import CheckpointError

from . import official_formats as of

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
FEATURE_DIMS = {"moco_r50": 2048, "moco_vit_small": 384, "moco_vit_base": 768}


def _small(name: str) -> dict:
    return {"img_size": 64} if "vit" in name else {}


# The pretrained-source tests exercise download / checksum / conversion / loading, which do not depend on depth:
# they use a 1-block-per-stage ResNet-50 (same layer names and widths) to stay fast on a loaded CPU. The full
# ResNet-50 is covered by tests/moco_zoo/test_convert.py.
LITE = dict(layers=(1, 1, 1, 1))
VIT_LITE = dict(depth=2)


# ------------------------------------------------------------------------------------------------- registration


def test_every_zoo_entry_is_registered():
    registered = set(timm.list_pretrained("moco_*"))
    assert registered == {e.name for e in zoo.entries()}
    assert set(timm.list_models("moco_*")) == {"moco_r18", "moco_r50", "moco_vit_small", "moco_vit_base"}
    for model in ("moco_r50", "moco_vit_small", "moco_vit_base"):
        default = zoo.default_entry(model)
        with torch.device("meta"):
            assert timm.create_model(model, pretrained=False, **_small(model)).pretrained_cfg["tag"] == default.tag
    assert zoo.default_entry("moco_r50").tag == "v3_1000ep"  # best ImageNet linear top-1 of the R50 releases


@pytest.mark.parametrize("name", sorted(e.name for e in zoo.entries()))
def test_build_every_entry(name):
    """Every entry builds (shapes checked on the meta device: no weight init or compute needed)."""
    entry = zoo.find_entry(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **_small(name)).eval()
        out = model(torch.empty(1, 3, 64, 64))
    cfg = model.pretrained_cfg
    if entry.is_classifier:
        assert out.shape == (1, 1000) and cfg["num_classes"] == 1000
        assert len(cfg.get("label_names") or ()) == 1000 and cfg["label_names"][0].startswith("n0")
    else:
        assert out.shape == (1, FEATURE_DIMS[entry.model]) and model.num_classes == 0 and cfg["num_classes"] == 0
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875 and cfg["input_size"] == (3, 224, 224)
    assert cfg["license"] == entry.license == "cc-by-nc-4.0"
    assert cfg["tag"] == entry.tag and cfg["architecture"] == entry.model
    assert cfg["paper_ids"] == f"arXiv:{entry.paper.arxiv}" and cfg["origin_url"].startswith("https://github.com/")
    if entry.published:
        assert cfg["hf_hub_id"] == entry.hub.repo_id and not cfg.get("url")
    else:
        assert cfg["url"] == entry.source.url and not cfg.get("hf_hub_id")


@pytest.mark.parametrize("model_name", ["moco_r50", "moco_vit_small", "moco_vit_base"])
def test_num_classes_adds_head(model_name):
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=5, **_small(model_name)).eval()
        assert model(torch.empty(1, 3, 64, 64)).shape == (1, 5)
    assert model.get_classifier().in_features == FEATURE_DIMS[model_name]


def test_vit_small_has_12_heads_and_matches_plain_timm_spec():
    entry = zoo.find_entry("moco_vit_small")
    with torch.device("meta"):
        full = timm.create_model("moco_vit_small", pretrained=False)
        assert len(full.blocks) == 12 and all(b.attn.num_heads == 12 for b in full.blocks)
        plain_full = timm.create_model(entry.architecture, pretrained=False, num_classes=0, **entry.model_args)
        assert {k: v.shape for k, v in full.state_dict().items()} == {
            k: v.shape for k, v in plain_full.state_dict().items()}
    # same computation as plain timm built from the entry's architecture + model_args (2 blocks to stay fast)
    ours = timm.create_model("moco_vit_small", pretrained=False, img_size=64, **VIT_LITE).eval()
    plain = timm.create_model(entry.architecture, pretrained=False, num_classes=0, img_size=64, **VIT_LITE,
                              **entry.model_args)
    plain.load_state_dict(ours.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(X), ours(X))


def test_published_entry_switches_to_hub():
    entry = zoo.find_entry("moco_r50.v2_800ep")
    published = dataclasses.replace(entry, hub=dataclasses.replace(entry.hub, published=True))
    cfg = models.pretrained_cfg_for_entry(published)
    assert cfg["hf_hub_id"] == entry.hub.repo_id and cfg["url"] is None
    cfg = models.pretrained_cfg_for_entry(entry)
    assert cfg["url"] == entry.source.url and cfg["hf_hub_id"] is None


# --------------------------------------------------------------------------------------------- pretrained sources


@pytest.fixture(scope="module")
def official_v2(tmp_path_factory):
    ckpt, encoder = of.official_v1v2("v2", "resnet50", seed=21, **LITE)
    folder = tmp_path_factory.mktemp("dl")
    path = folder / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    return path, encoder.eval()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server(official_v2):
    path, _ = official_v2
    handler = functools.partial(_QuietHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _patch_md5(monkeypatch, name: str, md5_prefix):
    real = zoo.find_entry

    def find(n):
        e = real(n)
        if e is not None and e.name == name:
            e = dataclasses.replace(e, source=dataclasses.replace(e.source, md5_prefix=md5_prefix))
        return e

    monkeypatch.setattr(zoo, "find_entry", find)


def test_pretrained_from_official_url_converted_on_the_fly(official_v2, loopback_server, monkeypatch):
    path, encoder = official_v2
    url = f"{loopback_server}/{path.name}"
    _patch_md5(monkeypatch, "moco_r50.v2_800ep", hub.md5_file(path)[:8])
    model = timm.create_model("moco_r50.v2_800ep", pretrained=True, pretrained_cfg_overlay=dict(url=url), **LITE).eval()
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X), rtol=1e-4, atol=1e-5)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / path.name
    assert cached.is_file()  # timm's url cache, verified before unpickling
    # a fresh head on top of the pretrained backbone
    model = timm.create_model("moco_r50.v2_800ep", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(url=url),
                              **LITE)
    assert model.get_classifier().out_features == 3 and torch.equal(model.conv1.weight, encoder.conv1.weight)


def test_pretrained_url_md5_mismatch_is_refused(official_v2, loopback_server):
    """Our synthetic file does not have the authors' published md5 prefix: the download is refused and removed."""
    path, _ = official_v2
    url = f"{loopback_server}/{path.name}"
    assert zoo.find_entry("moco_r50.v2_800ep").source.md5_prefix == "a04e12f8"
    with pytest.raises(CheckpointError, match="md5 checksum mismatch"):
        timm.create_model("moco_r50.v2_800ep", pretrained=True, pretrained_cfg_overlay=dict(url=url), **LITE)
    assert not (Path(torch.hub.get_dir()) / "checkpoints" / path.name).exists()


def test_pretrained_url_is_loaded_weights_only(tmp_path, monkeypatch):
    """A served file that needs full unpickling is refused by the url loader (torch.load(weights_only=True))."""
    import argparse
    import pickle

    ckpt, _ = of.official_v1v2("v1", "resnet50", seed=26, **LITE)
    ckpt["args"] = argparse.Namespace(lr=0.03)
    folder = tmp_path / "srv"
    folder.mkdir()
    path = folder / "moco_v1_200ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    _patch_md5(monkeypatch, "moco_r50.v1_200ep", hub.md5_file(path)[:8])
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        with pytest.raises(pickle.UnpicklingError):
            timm.create_model("moco_r50.v1_200ep", pretrained=True, pretrained_cfg_overlay=dict(url=url), **LITE)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_pretrained_from_local_file_any_format(official_v2, tmp_path):
    path, encoder = official_v2
    model = timm.create_model("moco_r50.v2_800ep", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **LITE)
    torch.testing.assert_close(of.features(model.eval(), X), of.features(encoder, X), rtol=1e-4, atol=1e-5)
    out = tmp_path / "model.safetensors"
    convert.convert_file(path, "timm", out)
    model = timm.create_model("moco_r50", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **LITE)
    torch.testing.assert_close(of.features(model.eval(), X), of.features(encoder, X), rtol=1e-4, atol=1e-5)


def test_pretrained_v3_r50_and_lincls_classifier(tmp_path):
    ckpt, encoder = of.official_v3("resnet50", seed=22, **LITE)
    path = tmp_path / "r-50-300ep.pth.tar"
    torch.save(ckpt, path)
    model = timm.create_model("moco_r50.v3_300ep", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **LITE)
    torch.testing.assert_close(of.features(model.eval(), X), of.features(encoder, X), rtol=1e-4, atol=1e-5)

    ckpt, ref = of.official_lincls("resnet50", seed=23, num_classes=1000, **LITE)
    path = tmp_path / "linear-300ep.pth.tar"
    torch.save(ckpt, path)
    clf = timm.create_model("moco_r50.v3_300ep_lincls_in1k", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path)), **LITE).eval()
    with torch.no_grad():
        torch.testing.assert_close(clf(X), ref(X), rtol=1e-4, atol=1e-5)


def test_pretrained_v3_vit_small(tmp_path):
    ckpt, encoder = of.official_v3("moco_vit_small", seed=24, **VIT_LITE)
    assert ckpt["arch"] == "vit_small"
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save(ckpt, path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model = timm.create_model("moco_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **VIT_LITE).eval()
    torch.testing.assert_close(of.features(model, x), of.features(encoder.eval(), x), rtol=1e-4, atol=1e-5)
    # a smaller input size resamples the position embedding
    small = timm.create_model("moco_vit_small", pretrained=True, img_size=64, pretrained_cfg_overlay=dict(file=str(path)),
                               **VIT_LITE)
    assert small.pos_embed.shape == (1, 17, 384)


def test_pretrained_from_hub_once_published(official_v2, tmp_path, monkeypatch):
    """The hf_hub_id source (used once an entry is published) loads a converted model.safetensors from the cache."""
    from huggingface_hub import constants

    path, encoder = official_v2
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # moco_zoo.hub.download reads them at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "moco-zoo-test/moco_r50.v2_800ep"
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "1" * 40
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(commit)
    (snap / "snapshots" / commit).mkdir(parents=True)
    convert.convert_file(path, "timm", snap / "snapshots" / commit / "model.safetensors")
    model = timm.create_model("moco_r50.v2_800ep", pretrained=True,
                              pretrained_cfg_overlay=dict(url=None, hf_hub_id=repo), **LITE).eval()
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X), rtol=1e-4, atol=1e-5)


def test_wrong_architecture_checkpoint_is_refused(tmp_path):
    ckpt, _ = of.our_pretrain("resnet18", seed=25)
    path = tmp_path / "r18.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"r18\.pth\.tar.*does not fit"):
        timm.create_model("moco_r50", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **LITE)


def test_no_network_needed():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
