"""moco_zoo.zoo: hub_configs/ parsed into typed entries (the single source of truth) and `moco-zoo list`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from moco_zoo import zoo

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"

# Published facts from the authors' READMEs (see shared reference moco-protocols.md).
OFFICIAL = {
    "moco_r50.v1_200ep": ("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v1_200ep/"
                          "moco_v1_200ep_pretrain.pth.tar", "b251726a", 60.6),
    "moco_r50.v2_200ep": ("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_200ep/"
                          "moco_v2_200ep_pretrain.pth.tar", "59fd9945", 67.7),
    "moco_r50.v2_800ep": ("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
                          "moco_v2_800ep_pretrain.pth.tar", "a04e12f8", 71.1),
    "moco_r50.v3_100ep": ("https://dl.fbaipublicfiles.com/moco-v3/r-50-100ep/r-50-100ep.pth.tar", None, 68.9),
    "moco_r50.v3_300ep": ("https://dl.fbaipublicfiles.com/moco-v3/r-50-300ep/r-50-300ep.pth.tar", None, 72.8),
    "moco_r50.v3_1000ep": ("https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar", None, 74.6),
    "moco_vit_small.v3_300ep": ("https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar", None, 73.2),
    "moco_vit_base.v3_300ep": ("https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", None, 76.7),
}
LINCLS = {
    "moco_r50.v3_100ep_lincls_in1k": "https://dl.fbaipublicfiles.com/moco-v3/r-50-100ep/linear-100ep.pth.tar",
    "moco_r50.v3_300ep_lincls_in1k": "https://dl.fbaipublicfiles.com/moco-v3/r-50-300ep/linear-300ep.pth.tar",
    "moco_r50.v3_1000ep_lincls_in1k": "https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/linear-1000ep.pth.tar",
    "moco_vit_small.v3_300ep_lincls_in1k":
        "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/linear-vit-s-300ep.pth.tar",
    "moco_vit_base.v3_300ep_lincls_in1k":
        "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar",
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    zoo.clear_cache()
    yield
    zoo.clear_cache()


def test_one_file_per_released_model():
    files = sorted(p.name for p in REPO_CONFIGS.glob("*.yaml"))
    assert files == sorted([
        "moco_v1_200ep.yaml", "moco_v2_200ep.yaml", "moco_v2_800ep.yaml", "moco_v3_r50_100ep.yaml",
        "moco_v3_r50_300ep.yaml", "moco_v3_r50_1000ep.yaml", "moco_v3_vit_small_300ep.yaml",
        "moco_v3_vit_base_300ep.yaml",
    ])
    assert zoo.configs_dir().resolve() == REPO_CONFIGS


def test_backbone_entries_match_published_facts():
    backbones = {e.name: e for e in zoo.backbone_entries()}
    assert set(backbones) == set(OFFICIAL)
    for name, (url, md5, top1) in OFFICIAL.items():
        e = backbones[name]
        assert e.source.url == url and e.source.filename == url.rsplit("/", 1)[1]
        assert e.source.md5_prefix == md5
        assert e.metrics["imagenet_linear_top1"] == top1 and e.imagenet_top1 == top1
        assert e.license == "cc-by-nc-4.0" and e.dataset == "imagenet-1k"
        assert e.hub.repo_id.endswith("/" + name) and e.hub.published is False
        assert e.paper.arxiv in {"1911.05722", "2003.04297", "2104.02057"} and e.paper.citation.startswith("@")
        assert e.recipe["epochs"] == int(name.split("_")[-1].rstrip("ep"))
        assert e.kind == "backbone" and e.num_classes == 0 and not e.is_classifier
    v2 = backbones["moco_r50.v2_800ep"]
    assert (v2.metrics["voc0712_r50c4_ap50"], v2.metrics["voc0712_r50c4_ap"], v2.metrics["voc0712_r50c4_ap75"]) == (
        82.5, 57.4, 64.0)
    assert backbones["moco_r50.v1_200ep"].recipe["temperature"] == 0.07
    assert backbones["moco_r50.v2_200ep"].recipe["temperature"] == 0.2


def test_arch_names():
    assert zoo.find_entry("moco_r50.v2_800ep").arch == "resnet50"
    vit_s = zoo.find_entry("moco_vit_small")
    assert vit_s.architecture == "vit_small_patch16_224" and vit_s.model_args == {"num_heads": 12}
    assert vit_s.arch == "moco_vit_small"  # plain timm ViT-S has 6 heads
    assert zoo.find_entry("moco_vit_base").arch == "vit_base_patch16_224"


def test_v3_linear_probe_classifier_entries():
    clfs = {e.name: e for e in zoo.classifier_entries()}
    assert set(clfs) == set(LINCLS)
    for name, url in LINCLS.items():
        e = clfs[name]
        assert e.source.url == url and e.num_classes == 1000 and e.is_classifier
        assert e.parent_tag == e.tag[: -len("_lincls_in1k")]
        assert e.metrics["imagenet_top1"] == zoo.find_entry(f"{e.model}.{e.parent_tag}").imagenet_top1


def test_find_entry_and_defaults():
    assert zoo.find_entry("moco_r50").name == "moco_r50.v3_1000ep"
    assert zoo.find_entry("moco_vit_small").name == "moco_vit_small.v3_300ep"
    assert zoo.find_entry("timm/moco_r50.v2_800ep").tag == "v2_800ep"
    assert zoo.find_entry("moco_r50.nope") is None
    assert zoo.find_entry("resnet50") is None
    assert zoo.model_names() == ["moco_r50", "moco_vit_base", "moco_vit_small"]


def test_env_override_and_published_flag(tmp_path, monkeypatch):
    data = yaml.safe_load((REPO_CONFIGS / "moco_v2_800ep.yaml").read_text())
    data["hub"]["published"] = True
    (tmp_path / "only.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MOCO_ZOO_CONFIGS", str(tmp_path))
    zoo.clear_cache()
    assert zoo.configs_dir() == tmp_path
    entries = zoo.entries()
    assert [e.name for e in entries] == ["moco_r50.v2_800ep"] and entries[0].published


def test_bad_config_names_the_file(tmp_path, monkeypatch):
    data = yaml.safe_load((REPO_CONFIGS / "moco_v1_200ep.yaml").read_text())
    del data["source"]["url"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MOCO_ZOO_CONFIGS", str(tmp_path))
    zoo.clear_cache()
    with pytest.raises(zoo.ZooConfigError, match=r"broken\.yaml.*source\.url"):
        zoo.entries()


def test_duplicate_entries_rejected(tmp_path, monkeypatch):
    for name in ("a.yaml", "b.yaml"):
        shutil.copy(REPO_CONFIGS / "moco_v1_200ep.yaml", tmp_path / name)
    monkeypatch.setenv("MOCO_ZOO_CONFIGS", str(tmp_path))
    zoo.clear_cache()
    with pytest.raises(zoo.ZooConfigError, match="already defined"):
        zoo.entries()


def test_cli_list(capsys):
    from moco_zoo import zoo_cli

    assert zoo_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "moco_r50.v2_800ep" in out and "71.1" in out and "82.5/57.4/64.0" in out
    assert "moco_r50.v3_1000ep (default)" in out and "moco_vit_small.v3_300ep_lincls_in1k" in out
    assert zoo_cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(OFFICIAL) | set(LINCLS)


def test_installed_share_location_is_found(tmp_path, monkeypatch):
    """A non-editable install finds <prefix>/share/moco-zoo/hub_configs (setup.py data_files)."""
    import sys

    share = tmp_path / "prefix" / "share" / "moco-zoo" / "hub_configs"
    shutil.copytree(REPO_CONFIGS, share)
    monkeypatch.delenv("MOCO_ZOO_CONFIGS", raising=False)
    monkeypatch.setattr(zoo, "__file__", str(tmp_path / "site-packages" / "moco_zoo" / "zoo.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    zoo.clear_cache()
    assert zoo.configs_dir() == share
    assert len(zoo.backbone_entries()) == 8
