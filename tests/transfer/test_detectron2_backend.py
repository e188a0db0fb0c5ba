"""detectron2 engine: config equivalence (pure Python, always run) and real runs (skipped without detectron2)."""
from __future__ import annotations

import json

import pytest

from moco_zoo.transfer.detectron2_backend import (INSTALL_HINT, detectron2_available, detectron2_config_values,
                                         detectron2_history)
from moco_zoo.transfer.config import resolve
from moco_zoo.transfer.engine.cli import main


def _values(**kw):
    cfg = resolve("voc_det", "paper")
    return dict(detectron2_config_values(cfg, "resnet50", 20, "w.pkl", ["voc_2007_trainval", "voc_2012_trainval"],
                                         ["voc_2007_test"], "out", **kw))


def test_config_matches_the_moco_voc_config():
    v = _values()
    assert v["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
    assert v["MODEL.RESNETS.NORM"] == "SyncBN" and v["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert v["MODEL.BACKBONE.FREEZE_AT"] == 0 and v["MODEL.RESNETS.DEPTH"] == 50
    assert v["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53] and v["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert v["INPUT.FORMAT"] == "RGB" and v["MODEL.MASK_ON"] is False
    assert v["INPUT.MIN_SIZE_TRAIN"] == tuple(range(480, 801, 32)) and v["INPUT.MIN_SIZE_TEST"] == 800
    assert (v["SOLVER.MAX_ITER"], v["SOLVER.STEPS"], v["SOLVER.BASE_LR"], v["SOLVER.IMS_PER_BATCH"]) == \
        (24000, (18000, 22000), 0.02, 16)
    assert v["SOLVER.WARMUP_ITERS"] == 100 and v["TEST.PRECISE_BN.ENABLED"] is True
    assert v["MODEL.RPN.PRE_NMS_TOPK_TEST"] == 6000 and v["MODEL.RPN.POST_NMS_TOPK_TEST"] == 1000
    assert v["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"] == 14 and v["MODEL.WEIGHTS"] == "w.pkl"


def test_resnet18_and_fpn_values():
    cfg = resolve("coco_det", "paper-2x", overrides={"arch": "resnet18"})
    v = dict(detectron2_config_values(cfg, "resnet18", 80, "", ["a"], ["b"], "out"))
    assert v["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64 and v["MODEL.RESNETS.DEPTH"] == 18
    assert v["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone" and v["MODEL.MASK_ON"] is True
    assert v["SOLVER.MAX_ITER"] == 180000
    with pytest.raises(ValueError, match="vit"):
        detectron2_config_values(cfg, "vit_small", 80, "", ["a"], ["b"], "out")
    with pytest.raises(ValueError, match="--detector fpn"):
        detectron2_config_values(dict(cfg, detector="c4"), "resnet18", 80, "", ["a"], ["b"], "out")


def test_history_from_detectron2_metrics_lines(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text('{"iteration": 19, "total_loss": 1.5, "loss_cls": 0.5, "lr": 0.01}\n{"bbox/AP": 3}\n')
    assert detectron2_history(p) == [{"iter": 20, "loss": 1.5, "loss_cls": 0.5, "lr": 0.01}]


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed")
def test_missing_detectron2_is_a_clear_error(synthetic_voc, tmp_path, capsys):
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", "--engine", "detectron2",
                          "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs detectron2" in err and "--engine torchvision" in err and INSTALL_HINT[:20] in err


@pytest.mark.slow
def test_detectron2_voc_run(synthetic_voc, tmp_path):
    pytest.importorskip("detectron2")
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", "--engine", "detectron2",
                          "--out", str(tmp_path), "--preset", "cpu", "--arch", "resnet18", "--iters", "4",
                          "--batch-size", "2", "--norm", "bn", "--device", "cpu", "--detector", "fpn"])
    assert rc == 0
    m = json.loads((tmp_path / "random" / "metrics.json").read_text())
    assert m["engine"] == "detectron2" and m["metrics"]["AP50"] is not None


@pytest.mark.slow
def test_detectron2_coco_run_with_converted_weights(synthetic_coco, tmp_path):
    pytest.importorskip("detectron2")
    import torch
    import torchvision

    from moco_zoo.convert import convert_file

    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "r18.pth")
    pkl, _ = convert_file(tmp_path / "r18.pth", "detectron2", tmp_path / "r18.pkl", arch="resnet18")
    rc = main("coco_det", ["--data-root", str(synthetic_coco), "--weights", str(pkl), "--engine", "detectron2",
                           "--out", str(tmp_path / "o"), "--preset", "cpu", "--arch", "resnet18", "--iters", "4",
                           "--batch-size", "2", "--norm", "bn", "--detector", "fpn", "--device", "cpu"])
    assert rc == 0
    m = json.loads(next((tmp_path / "o").glob("*/metrics.json")).read_text())
    assert "bbox" in m["metrics"] and "segm" in m["metrics"]
