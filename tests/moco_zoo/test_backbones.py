"""moco_zoo.load_backbone_state_dict / load_backbone: every kind of spec, offline."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import timm
import torch

import moco_zoo
from moco_zoo import convert, hub, zoo
from moco_zoo.checkpoint import CheckpointError

from . import official_formats as of

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    ckpt, encoder = of.our_pretrain("resnet18", seed=11)
    path = tmp_path_factory.mktemp("ours") / "checkpoint_0003.pth.tar"
    torch.save(ckpt, path)
    return path, encoder.eval()


def test_exported_from_package():
    assert moco_zoo.load_backbone is not None and moco_zoo.load_backbone_state_dict is not None
    assert "moco_r50" in timm.list_models("moco_*")


def test_path_to_our_pretrain_checkpoint(ours, tmp_path):
    path, encoder = ours
    sd, arch = moco_zoo.load_backbone_state_dict(str(path))
    assert arch == "resnet18"
    assert set(sd) == set(encoder.state_dict())
    model = moco_zoo.load_backbone(str(path)).eval()
    assert model.num_classes == 0
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X))
    assert model.pretrained_cfg["interpolation"] == "bilinear" and model.pretrained_cfg["crop_pct"] == 0.875
    # converted files resolve to the same weights
    out = tmp_path / "model.safetensors"
    convert.convert_file(path, "timm", out)
    sd2, arch2 = moco_zoo.load_backbone_state_dict(str(out))
    assert arch2 == "resnet18" and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tv = tmp_path / "tv.pth"
    convert.convert_file(path, "torchvision", tv)
    sd3, _ = moco_zoo.load_backbone_state_dict(str(tv), "resnet18")
    assert all(torch.equal(sd[k], sd3[k]) for k in sd)


def test_load_backbone_with_new_head(ours):
    path, encoder = ours
    model = moco_zoo.load_backbone(str(path), num_classes=7)
    assert model.get_classifier().out_features == 7
    assert torch.equal(model.conv1.weight, encoder.conv1.weight)


def test_path_to_official_v1(tmp_path):
    ckpt, encoder = of.official_v1v2("v1", "resnet18", seed=12)
    path = tmp_path / "moco_v1_200ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    model = moco_zoo.load_backbone(str(path)).eval()
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X))


def test_linear_probe_checkpoint_gives_backbone_only(tmp_path):
    ckpt, model = of.our_linear_probe("resnet18", seed=13, num_classes=8)
    path = tmp_path / "lincls.pth.tar"
    torch.save(ckpt, path)
    sd, arch = moco_zoo.load_backbone_state_dict(str(path))
    assert arch == "resnet18" and not any(k.startswith("fc.") for k in sd)


def test_random_is_seeded_and_needs_arch():
    a, arch = moco_zoo.load_backbone_state_dict("random", "resnet18", seed=0)
    b, _ = moco_zoo.load_backbone_state_dict("random", "resnet18", seed=0)
    c, _ = moco_zoo.load_backbone_state_dict("random", "resnet18", seed=1)
    assert arch == "resnet18" and not any(k.startswith("fc.") for k in a)
    assert torch.equal(a["conv1.weight"], b["conv1.weight"])
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    with pytest.raises(ValueError, match="needs an architecture"):
        moco_zoo.load_backbone_state_dict("random")


def test_image_size_builds_vits_for_that_input_and_resamples_the_position_embedding():
    """A ViT checkpoint made at 224 px, loaded for 48 px inputs: timm's own resampling of the same weights into a
    model created at 48 px gives the same features; ResNets ignore image_size."""
    from timm.layers import resample_abs_pos_embed

    sd, _ = moco_zoo.load_backbone_state_dict("random", "vit_tiny_patch16_224", seed=0)
    model = moco_zoo.load_backbone("random", "vit_tiny_patch16_224", seed=0, image_size=48).eval()
    expected = timm.create_model("vit_tiny_patch16_224", img_size=48, num_classes=0).eval()
    sd = dict(sd, pos_embed=resample_abs_pos_embed(sd["pos_embed"], new_size=[3, 3], num_prefix_tokens=1))
    expected.load_state_dict(sd)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x))
    resnet = moco_zoo.load_backbone("random", "resnet18", seed=0, image_size=48)
    assert resnet(x).shape == (2, 512)


def test_torchvision_supervised_uses_torchvision_cache(monkeypatch):
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    ref = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(ref, cache / os.path.basename(weights.url))  # what torchvision would have downloaded
    sd, arch = moco_zoo.load_backbone_state_dict("torchvision-supervised", "resnet18")
    assert arch == "resnet18" and set(sd) == {k for k in ref if not k.startswith("fc.")}
    assert torch.equal(sd["conv1.weight"], ref["conv1.weight"])
    model = moco_zoo.load_backbone("torchvision-supervised", "resnet18")
    assert torch.equal(model.conv1.weight, ref["conv1.weight"])


def test_hf_hub_spec_from_offline_cache(ours, tmp_path, monkeypatch):
    """hf-hub:ORG/REPO resolves through the Hugging Face cache (offline mode, pre-populated snapshot)."""
    from huggingface_hub import constants

    path, encoder = ours
    repo = "moco-zoo-test/moco_r18.demo"
    # huggingface_hub reads HF_HUB_CACHE at import time: point it at this test's own cache explicitly
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # moco_zoo.hub.download reads them at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(commit)
    folder = snap / "snapshots" / commit
    folder.mkdir(parents=True)
    convert.convert_file(path, "timm", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 0}))
    sd, arch = moco_zoo.load_backbone_state_dict(f"hf-hub:{repo}")
    assert arch == "resnet18"
    model = moco_zoo.load_backbone(f"hf-hub:{repo}").eval()
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X))


def test_zoo_name_through_timm_url_cache(tmp_path, monkeypatch):
    """A zoo name loads the authors' file (here pre-placed in timm's url cache) with md5 check + conversion."""
    ckpt, encoder = of.official_v1v2("v2", "resnet50", seed=14)
    entry = zoo.find_entry("moco_r50.v2_800ep")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / entry.source.filename
    torch.save(ckpt, target)
    md5 = hub.md5_file(target)
    real_find = zoo.find_entry

    def find(name):
        e = real_find(name)
        if e is not None and e.name == entry.name:
            e = dataclasses.replace(e, source=dataclasses.replace(e.source, md5_prefix=md5[:8]))
        return e

    monkeypatch.setattr(zoo, "find_entry", find)
    sd, arch = moco_zoo.load_backbone_state_dict("moco_r50.v2_800ep")
    assert arch == "resnet50"
    model = moco_zoo.load_backbone("moco_r50.v2_800ep").eval()
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X), rtol=1e-4, atol=1e-5)


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown backbone spec"):
        moco_zoo.load_backbone_state_dict("no_such_model")
    with pytest.raises(CheckpointError, match="not found"):
        moco_zoo.load_backbone_state_dict("/nonexistent/dir/ckpt.pth")


def test_wrong_arch_for_path(ours):
    path, _ = ours
    with pytest.raises(CheckpointError, match="does not match architecture 'resnet50'"):
        moco_zoo.load_backbone_state_dict(str(path), "resnet50")
