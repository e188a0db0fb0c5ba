"""voc_det end to end on the synthetic VOCdevkit: training, outputs, comparison table, resume, CLI errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
import torchvision

from moco_zoo.checkpoint import safe_torch_load
from moco_zoo.transfer.engine import CHECKPOINT_NAME
from moco_zoo.transfer.engine.cli import main, run_dirs

REPO = Path(__file__).resolve().parents[2]
# a tiny, fast version of the cpu preset
TINY = ["--preset", "cpu", "--arch", "resnet18", "--batch-size", "2", "--max-test-images", "2", "--detector", "c4",
        "--set", "log_period=1", "box_batch_size_per_image=16", "rpn_post_nms_top_n_test=30",
        "box_detections_per_img=10", "min_size_train=[96,112]", "min_size_test=112", "num_vis=2"]


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    torch.manual_seed(7)
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def comparison_run(synthetic_voc, r18_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("voc_runs")
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", str(r18_file),
                          "--iters", "2", "--output-dir", str(out)] + TINY)
    assert rc == 0
    return out


def test_outputs_are_written(comparison_run):
    run = comparison_run / "random"
    metrics = json.loads((run / "metrics.json").read_text())
    for k in ("AP50", "AP", "AP75", "AP50_area"):
        assert 0.0 <= metrics["metrics"][k] <= 100.0
    assert metrics["iters"] == 2 and metrics["arch"] == "resnet18" and metrics["model"] == "C4 Faster R-CNN"
    assert math.isfinite(metrics["final_loss"])
    assert (run / "results.md").read_text().startswith("# voc_det")
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert len(list((run / "predictions").glob("sample_*.png"))) == 2
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == "cpu" and cfg["iters"] == 2 and cfg["run"]["global_batch"] == 2
    assert cfg["min_size_train"] == [96, 112] and cfg["run"]["weights"] == "random"
    assert (run / "metrics.jsonl").read_text().count("\n") == 2 and list((run / "tb").glob("events.out.tfevents.*"))
    ckpt = safe_torch_load(run / CHECKPOINT_NAME)
    assert ckpt["kind"] == "transfer" and ckpt["iteration"] == 2 and len(ckpt["history"]) == 2
    assert all(math.isfinite(h["loss"]) for h in ckpt["history"])


def test_comparison_table_has_one_row_per_weights(comparison_run, r18_file):
    text = (comparison_run / "comparison.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| weights |")]
    assert len(rows) == 2 and "random" in rows[0] and str(r18_file) in rows[1]
    data = json.loads((comparison_run / "comparison.json").read_text())
    assert [r["weights"] for r in data] == ["random", str(r18_file)]
    assert all(r["arch"] == "resnet18" for r in data)


def test_run_dirs_are_unique():
    dirs = run_dirs(Path("o"), ["random", "a/ckpt.pth", "b/ckpt.pth", "random"])
    assert len({str(d) for d in dirs}) == 4


@pytest.mark.parametrize("argv,message", [
    (["--weights", "random", "--set", "bogus_key=1"], "unknown config key 'bogus_key'"),
    (["--weights", "random", "--set", "iters=many"], "config key 'iters': Value 'many'"),
    (["--weights", "random", "--set", "noequals"], "expected KEY=VALUE"),
    (["--weights", "random", "--iters", "0"], "'iters' must be >= 1"),
    (["--weights", "random", "--set", "output_stride=8"], "unknown config key 'output_stride' for task voc_det"),
    (["--weights", "/nonexistent/weights.pth"], "weights.pth"),
    (["--weights", "random", "--eval-only"], "--eval-only needs --resume"),
])
def test_bad_input_errors(synthetic_voc, tmp_path, capsys, argv, message):
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--output-dir", str(tmp_path), "--arch", "resnet18"] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_data_root_names_the_directory(tmp_path, capsys):
    rc = main("voc_det", ["--data-root", str(tmp_path / "nowhere"), "--weights", "random", "--arch", "resnet18",
                          "--out", str(tmp_path / "o")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_bad_preset_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main("voc_det", ["--data-root", "x", "--weights", "random", "--preset", "huge"])
    assert "invalid choice" in capsys.readouterr().err


def test_script_runs_from_the_repo_root():
    out = subprocess.run([sys.executable, "transfer/voc_det.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--weights" in out.stdout and "paper-8img" in out.stdout


def test_jobs_run_side_by_side_with_the_sequential_results(synthetic_voc, tmp_path):
    """--jobs 2: the four runs of two weights x two seeds in two processes end with the checkpoints and metrics of
    one process running them one after the other (same thread count), and one comparison table."""
    common = ["--data-root", str(synthetic_voc), "--weights", "random", "random", "--seeds", "0", "1",
              "--iters", "2", "--threads", "1"] + TINY
    assert main("voc_det", common + ["--output-dir", str(tmp_path / "seq")]) == 0
    assert main("voc_det", common + ["--output-dir", str(tmp_path / "par"), "--jobs", "2"]) == 0
    seq = json.loads((tmp_path / "seq" / "comparison.json").read_text())
    par = json.loads((tmp_path / "par" / "comparison.json").read_text())
    assert [(r["weights"], r["seed"]) for r in par] == [(r["weights"], r["seed"]) for r in seq] == [
        ("random", 0), ("random", 1), ("random", 0), ("random", 1)]
    assert [r["metrics"] for r in par] == [r["metrics"] for r in seq]
    for run in ("random/seed0", "random/seed1", "random-2/seed1"):
        a = safe_torch_load(tmp_path / "seq" / run / CHECKPOINT_NAME)["model"]
        b = safe_torch_load(tmp_path / "par" / run / CHECKPOINT_NAME)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the two seeds differ, so equality above is not trivially true
    s0 = safe_torch_load(tmp_path / "par" / "random/seed0" / CHECKPOINT_NAME)["model"]
    s1 = safe_torch_load(tmp_path / "par" / "random/seed1" / CHECKPOINT_NAME)["model"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point())
    assert "random-2" in (tmp_path / "par" / "comparison.md").read_text()


def test_jobs_must_be_positive(synthetic_voc, tmp_path, capsys):
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", "--jobs", "0",
                          "--output-dir", str(tmp_path)] + TINY)
    assert rc != 0 and "--jobs must be >= 1" in capsys.readouterr().err


def test_jobs_report_a_failing_run_in_one_line(synthetic_voc, tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", str(missing), "--arch",
                          "resnet18", "--iters", "1", "--jobs", "2", "--threads", "1",
                          "--output-dir", str(tmp_path / "out")] + TINY)
    err = capsys.readouterr().err
    assert rc != 0
    assert any(line.startswith("voc_det: error:") and str(missing) in line for line in err.splitlines())
    assert "_RemoteTraceback" not in err and "concurrent.futures" not in err  # no worker traceback
