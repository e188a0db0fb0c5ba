"""`make demo FAST=1`: the whole pipeline end to end (slow: a few minutes on 2 cores)."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tools.demo import _comparison_summary, select_profile
from tools.demo_report import COLUMNS, results_table


def _table_rows(report: str) -> dict:
    lines = [ln for ln in report.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] in ("MoCo v2", "random init"):
            rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_results_table_reads_stage_outputs():
    stages = {
        "lincls": {"moco": {"top1": 40.0, "knn_top1": 35.5}, "random": {"top1": 20.0, "knn_top1": 15.0}},
        "voc_object_knn": {"rows": [{"weights": "/x/ckpt.pth", "metrics": {"knn_top1": 24.5}},
                                    {"weights": "random", "metrics": {"knn_top1": 16.0}}]},
        "voc_det": {"rows": [{"weights": "/x/ckpt.pth", "metrics": {"AP50": 30.0, "AP": 12.0, "AP75": 9.0}},
                             {"weights": "random", "metrics": {"AP50": 10.0, "AP": 3.0, "AP75": 1.0}}]},
        "coco_det": {"rows": [{"weights": "/x/ckpt.pth", "metrics": {"bbox": {"AP": 7.0}, "segm": {"AP": 6.0}}},
                              {"weights": "random", "metrics": {"bbox": {"AP": 2.0}, "segm": {"AP": 1.5}}}]},
    }
    stages["voc_det"]["rows"].append({"weights": "random", "metrics": {"AP50": 14.0, "AP": 5.0, "AP75": 2.0}})
    rows = results_table(stages)
    assert rows["random init"]["VOC AP50"] == 12.0  # the mean over the two seeds
    assert rows["MoCo v2"]["linear top-1"] == 40.0 and rows["random init"]["kNN top-1"] == 15.0
    assert rows["MoCo v2"]["VOC AP75"] == 9.0 and rows["random init"]["COCO mask AP"] == 1.5
    assert rows["MoCo v2"]["VOC object kNN"] == 24.5 and rows["random init"]["VOC object kNN"] == 16.0
    assert rows["MoCo v2"].get("VOC seg mIoU") is None  # stage absent -> no value, never a made-up one


def test_optional_stages_follow_the_profile_unless_overridden():
    assert not select_profile("full").run_coco and not select_profile("full").run_seg
    assert select_profile("fast").run_coco and select_profile("fast").run_seg
    both = select_profile("full", coco=True, seg=True)
    assert both.run_coco and both.run_seg and both.pretrain_epochs == select_profile("full").pretrain_epochs
    assert not select_profile("fast", coco=False).run_coco and select_profile("fast", coco=False).run_seg


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    out = tmp_path / "demo_out"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tools.demo", "--fast", "--output-dir", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    book = json.loads((out / "stages.json").read_text())
    # every number in the report equals the one in the files the stages wrote
    lin_moco = json.loads((out / "lincls" / "moco" / "metrics.json").read_text())
    voc_rows = json.loads((out / "voc_det" / "comparison.json").read_text())
    voc = {}
    for r in voc_rows:
        voc.setdefault("random" if r["weights"] == "random" else "moco", []).append(r["metrics"])
    rows = _table_rows(report)
    profile = select_profile("fast")
    assert {r["model"] for r in voc_rows} == {f"{profile.det_detector.upper()} Faster R-CNN"}
    assert f"resnet18 {profile.det_detector.upper()} Faster R-CNN" in report
    assert sorted(r["seed"] for r in voc_rows) == sorted(list(profile.transfer_seeds) * 2)
    assert rows["MoCo v2"]["linear top-1"] == f"{lin_moco['top1']:.1f}"
    for name, key in (("random init", "random"), ("MoCo v2", "moco")):
        ap50 = [m["AP50"] for m in voc[key]]
        assert rows[name]["VOC AP50"] == f"{statistics.fmean(ap50):.1f} ± {statistics.stdev(ap50):.1f}"
    assert (out / "voc_det" / "curves.png").stat().st_size > 1000 and "voc_det learning curves" in report
    obj = {("random" if r["weights"] == "random" else "moco"): r["metrics"]
           for r in json.loads((out / "voc_object_knn" / "object_knn.json").read_text())}
    assert rows["MoCo v2"]["VOC object kNN"] == f"{obj['moco']['knn_top1']:.1f}"
    assert set(book["stages"]) >= {"data", "pretrain", "lincls", "convert_publish", "voc_object_knn", "voc_det"}
    assert "hub load-back ok (HF_HUB_OFFLINE=1)" in (out / "logs" / "convert_publish.log").read_text()
    for fmt in ("model.safetensors", "resnet_torchvision.pth", "moco_detectron2.pkl"):
        assert (out / "converted" / fmt).stat().st_size > 0
    assert re.search(r"MoCo beats random init on \d+ of \d+ metrics", report)
    # a second invocation resumes: every stage is already done and nothing is recomputed
    again = subprocess.run([sys.executable, "-m", "tools.demo", "--fast", "--output-dir", str(out)], cwd=root,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == len(book["stages"])
    assert len(COLUMNS) >= 8


def test_comparison_summary_formats_each_transfer_metric():
    det = [{"weights": "/x/ckpt.pth", "metrics": {"AP50": 4.54, "AP": 1.55, "AP75": 0.46}},
           {"weights": "random", "metrics": {"AP50": 3.2, "AP": 1.1, "AP75": 0.3}}]
    assert _comparison_summary(det) == "AP50/AP/AP75 MoCo 4.5/1.6/0.5 vs random 3.2/1.1/0.3"
    coco = [{"weights": "random", "metrics": {"bbox": {"AP": 0.25}, "segm": {"AP": 0.04}}}]
    assert _comparison_summary(coco) == "box/mask AP random 0.2/0.0"
    seg = [{"weights": "c.pth", "metrics": {"mIoU": 12.34}}]
    assert _comparison_summary(seg) == "mIoU MoCo 12.3"
    seeds = [{"weights": "random", "metrics": {"mIoU": 10.0}}, {"weights": "random", "metrics": {"mIoU": 20.0}}]
    assert _comparison_summary(seeds) == "mIoU random 15.0"
