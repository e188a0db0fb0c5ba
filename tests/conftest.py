"""Shared fixtures: offline Hugging Face settings and small synthetic datasets generated once per session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Never let a test wait on the network: the Hub is unreachable here and tests must not depend on it anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Each test gets its own empty HF cache, so no test reads another's downloads (or the user's cache)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    # huggingface_hub reads its cache path once at import; point the already-imported constants here too.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_HUB_CACHE", str(home / "hub"), raising=False)
    yield home
    # Downloads of ResNet-50 weights add up to gigabytes over the suite: free them as soon as the test ends.
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_imagefolder(tmp_path_factory) -> Path:
    """ImageFolder root (train/ and val/) of 64 px synthetic scenes, 8+ classes."""
    from moco_zoo.data import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("imagefolder") / "data", num_images=320, image_size=64, seed=0)


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> Path:
    """VOCdevkit root with VOC2007 (trainval/test) and VOC2012 (trainval) trees."""
    from moco_zoo.data import write_voc

    return write_voc(tmp_path_factory.mktemp("voc") / "data", num_images=48, image_size=128, seed=0, voc2012=True)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    """COCO root: annotations/instances_{train2017,val2017}.json, train2017/, val2017/."""
    from moco_zoo.data import write_coco

    return write_coco(tmp_path_factory.mktemp("coco") / "data", num_images=40, image_size=128, seed=0)
