"""hubconf.py: torch.hub.load from a checkout gives the zoo's timm models and load_backbone's weights."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch

import moco_zoo
from moco_zoo import zoo

REPO = Path(__file__).resolve().parents[1]


def test_hubconf_exposes_every_zoo_model():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert set(zoo.model_names()) - {"moco_r18"} <= entry_points and "backbone" in entry_points
    assert all(importlib.util.find_spec(d) for d in hubconf.dependencies)


def test_zoo_entry_point_is_the_registered_timm_model():
    model = torch.hub.load(str(REPO), "moco_r50", source="local", pretrained=False, num_classes=0)
    ref = timm.create_model("moco_r50", pretrained=False, num_classes=0)
    assert type(model) is type(ref) and model.state_dict().keys() == ref.state_dict().keys()
    assert model.pretrained_cfg["mean"] == ref.pretrained_cfg["mean"]


def test_backbone_entry_point_loads_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    sd = timm.create_model("resnet18", num_classes=0).state_dict()
    path = tmp_path / "backbone.pth"
    torch.save({f"module.encoder_q.{k}": v for k, v in sd.items()}, path)
    model = torch.hub.load(str(REPO), "backbone", source="local", spec=str(path))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    ref = moco_zoo.load_backbone(str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), ref.eval()(x))
