"""coco_det end to end on the synthetic COCO set: Mask R-CNN tiny run, box and mask AP via COCOeval."""
from __future__ import annotations

import json
import math

import pytest

from moco_zoo.transfer.engine.cli import main
from moco_zoo.transfer.evaluation.coco import COCO_STAT_NAMES

TINY = ["--preset", "cpu", "--arch", "resnet18", "--batch-size", "2", "--max-test-images", "3", "--iters", "2",
        "--set", "box_batch_size_per_image=16", "--set", "rpn_post_nms_top_n_test=30", "--set", "box_detections_per_img=10", "--set", "log_period=1",
        "--set", "min_size_train=[96,112]", "--set", "min_size_test=112", "--set", "num_vis=2",
        "--set", "vis_score_thresh=0.0"]


@pytest.mark.parametrize("detector", [pytest.param("fpn", marks=pytest.mark.slow), "c4"])
def test_mask_rcnn_tiny_run_reports_box_and_mask_ap(synthetic_coco, tmp_path, detector):
    rc = main("coco_det", ["--data-root", str(synthetic_coco), "--weights", "random", "--output-dir", str(tmp_path),
                           "--detector", detector] + TINY)
    assert rc == 0
    result = json.loads((tmp_path / "random" / "metrics.json").read_text())
    m = result["metrics"]
    assert set(m["bbox"]) == set(COCO_STAT_NAMES) and set(m["segm"]) == set(COCO_STAT_NAMES)
    for kind in ("bbox", "segm"):
        for v in m[kind].values():
            assert v == -1.0 or 0.0 <= v <= 100.0
    assert result["model"] == f"{detector.upper()} Mask R-CNN" and math.isfinite(result["final_loss"])
    table = (tmp_path / "comparison.md").read_text()
    assert "box AP" in table and "mask AP" in table
    assert len(list((tmp_path / "random" / "predictions").glob("*.png"))) == 2
    assert (tmp_path / "random" / "loss_curve.png").is_file()


@pytest.mark.slow
def test_faster_rcnn_without_masks(synthetic_coco, tmp_path):
    rc = main("coco_det", ["--data-root", str(synthetic_coco), "--weights", "random", "--output-dir", str(tmp_path),
                           "--no-mask"] + TINY)
    assert rc == 0
    m = json.loads((tmp_path / "random" / "metrics.json").read_text())["metrics"]
    assert "bbox" in m and "segm" not in m


def test_bad_coco_root_names_the_file(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text('{"images": [], "annotations": [{"area": -1}]}')
    rc = main("coco_det", ["--data-root", str(tmp_path), "--weights", "random", "--arch", "resnet18",
                           "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "instances_train2017.json" in capsys.readouterr().err
