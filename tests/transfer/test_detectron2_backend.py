"""The detectron2 backend: config mapping (pure Python, always run) and real runs against detectron2 (skipped with
the install hint where it is not installed; CI installs it from ../shared/third_party)."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from moco_zoo.transfer.config import ConfigError, resolve, schema_keys
from moco_zoo.transfer.detectron2_backend import (INSTALL_HINT, KEY_MAP, check_supported, detectron2_available,
                                                  detectron2_config_values, detectron2_history)
from moco_zoo.transfer.engine.cli import main

needs_d2 = pytest.mark.skipif(not detectron2_available(), reason=INSTALL_HINT)
TINY = ["--preset", "cpu", "--arch", "resnet18", "--batch-size", "2", "--max-test-images", "4", "--threads", "1",
        "--set", "box_batch_size_per_image=16", "rpn_post_nms_top_n_test=30", "box_detections_per_img=10",
        "min_size_train=[96,112]", "min_size_test=112", "num_vis=1", "log_period=1"]


def _values(**kw):
    cfg = resolve("voc_det", "paper")
    return dict(detectron2_config_values(cfg, "resnet50", 20, "w.pkl", ["train"], ["test"], "out", **kw))


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


def test_every_config_key_is_mapped_or_refused():
    assert set(schema_keys("voc_det")) == set(KEY_MAP)


def test_short_schedules_drop_steps_past_the_end_and_fpn_r18():
    cfg = resolve("voc_det", "cpu", flags={"iters": 4, "arch": "resnet18"}, overrides={"steps": [2, 4, 9]})
    v = dict(detectron2_config_values(cfg, "resnet18", 20, "", ["a"], ["b"], "out"))
    assert v["SOLVER.STEPS"] == (2,) and v["SOLVER.MAX_ITER"] == 4
    assert v["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64 and v["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone"
    with pytest.raises(ConfigError, match="'arch'='vit_small'"):
        detectron2_config_values(cfg, "vit_small", 20, "", ["a"], ["b"], "out")
    cfg.detector = "c4"
    with pytest.raises(ConfigError, match="detector=fpn"):
        detectron2_config_values(cfg, "resnet18", 20, "", ["a"], ["b"], "out")


@pytest.mark.parametrize("override,key", [
    ({"eval_period": 10}, "eval_period"), ({"precision": "bf16"}, "precision"), ({"flip_prob": 0.3}, "flip_prob"),
    ({"test_batch_size": 2}, "test_batch_size"), ({"find_unused_parameters": True}, "find_unused_parameters"),
])
def test_values_detectron2_cannot_honour_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        check_supported(resolve("voc_det", "cpu", overrides=override))
    check_supported(resolve("voc_det", "cpu"))  # the preset itself runs


def test_history_from_detectron2_metrics_lines(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text('{"iteration": 19, "total_loss": 1.5, "loss_cls": 0.5, "lr": 0.01}\n{"bbox/AP": 3}\n')
    assert detectron2_history(p) == [{"iter": 20, "loss": 1.5, "loss_cls": 0.5, "lr": 0.01}]


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed")
def test_missing_detectron2_is_a_clear_error(synthetic_voc, tmp_path, capsys):
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", "--engine", "detectron2",
                          "--output-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs detectron2" in err and "--engine torchvision" in err


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}, path)
    return path


@needs_d2
def test_voc_run_writes_the_torchvision_engines_outputs(synthetic_voc, r18_file, tmp_path):
    """--iters 2 (shorter than the warmup and every lr step), random and converted weights, one comparison."""
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", str(r18_file), "--engine",
                          "detectron2", "--output-dir", str(tmp_path), "--iters", "2", *TINY])
    assert rc == 0
    for run in ("random", f"{r18_file.parent.name}_r18"):
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        assert m["engine"] == "detectron2" and m["arch"] == "resnet18" and m["model"] == "FPN Faster R-CNN"
        for k in ("AP50", "AP", "AP75", "AP50_area"):
            assert 0.0 <= m["metrics"][k] <= 100.0
        assert m["metrics"]["num_test_images"] == 4 and m["iters"] == 2
        assert (tmp_path / run / "results.md").read_text().count("| resnet18 | FPN Faster R-CNN | 2 |") == 1
        assert (tmp_path / run / "loss_curve.png").is_file() and list((tmp_path / run / "predictions").glob("*.png"))
    assert (tmp_path / f"{r18_file.parent.name}_r18" / "backbone_detectron2.pkl").is_file()  # moco_zoo.convert
    table = (tmp_path / "comparison.md").read_text()
    assert "| random | resnet18 | FPN Faster R-CNN | 2 |" in table


@needs_d2
def test_converted_weights_arrive_in_detectron2_exactly(r18_file, tmp_path):
    """The detectron2 model built by the backend carries the converted backbone tensor for tensor."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from moco_zoo.transfer.detectron2_backend import detectron2_weights

    cfg = resolve("voc_det", "cpu", flags={"arch": "resnet18"})
    pkl = detectron2_weights(str(r18_file), "resnet18", tmp_path)
    d2 = get_cfg()
    for key, value in detectron2_config_values(cfg, "resnet18", 10, pkl, ["a"], ["b"], str(tmp_path)):
        node = d2
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    d2.MODEL.DEVICE = "cpu"
    model = build_model(d2)
    DetectionCheckpointer(model).load(pkl)
    ours = torch.load(r18_file, weights_only=True)
    sd = model.state_dict()
    assert torch.equal(sd["backbone.bottom_up.stem.conv1.weight"], ours["conv1.weight"])
    assert torch.equal(sd["backbone.bottom_up.res5.1.conv2.norm.running_var"], ours["layer4.1.bn2.running_var"])


@needs_d2
def test_d2_pkl_weights_need_allow_pickle(synthetic_voc, tmp_path, capsys):
    pkl = tmp_path / "w.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", str(pkl), "--engine", "detectron2",
                          "--output-dir", str(tmp_path / "o"), "--iters", "2", *TINY])
    assert rc == 2 and "w.pkl: detectron2 .pkl weights are unpickled" in capsys.readouterr().err


@needs_d2
def test_coco_mask_rcnn_run(synthetic_coco, tmp_path):
    rc = main("coco_det", ["--data-root", str(synthetic_coco), "--weights", "random", "--engine", "detectron2",
                           "--output-dir", str(tmp_path), "--iters", "2", *TINY])
    assert rc == 0
    m = json.loads((tmp_path / "random" / "metrics.json").read_text())
    assert set(m["metrics"]) >= {"bbox", "segm"} and m["model"] == "FPN Mask R-CNN"
