"""voc_det end to end on the synthetic VOCdevkit: training, outputs, comparison table, resume, CLI errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from moco_zoo.checkpoint import safe_torch_load
from moco_zoo.transfer.engine import CHECKPOINT_NAME, DetectionRun, lr_factor, resolve
from moco_zoo.transfer.engine.cli import main, run_dirs

REPO = Path(__file__).resolve().parents[2]
# a tiny, fast version of the cpu preset
TINY = ["--preset", "cpu", "--arch", "resnet18", "--batch-size", "2", "--max-test-images", "2",
        "--set", "log_period=1", "--set", "box_batch_size_per_image=16", "--set", "rpn_post_nms_top_n_test=30", "--set", "box_detections_per_img=10",
        "--set", "min_size_train=[96,112]", "--set", "min_size_test=112", "--set", "num_vis=2"]


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
                          "--iters", "2", "--out", str(out)] + TINY)
    assert rc == 0
    return out


def test_outputs_are_written(comparison_run):
    run = comparison_run / "random"
    metrics = json.loads((run / "metrics.json").read_text())
    for k in ("AP50", "AP", "AP75", "AP50_area"):
        assert 0.0 <= metrics["metrics"][k] <= 100.0
    assert metrics["iters"] == 2 and metrics["arch"] == "resnet18" and metrics["detector"] == "c4"
    assert math.isfinite(metrics["final_loss"])
    assert (run / "results.md").read_text().startswith("# voc_det")
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert len(list((run / "predictions").glob("sample_*.png"))) == 2
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "cpu" and cfg["iters"] == 2 and cfg["resolved"]["global_batch"] == 2
    assert cfg["min_size_train"] == [96, 112] and cfg["weights"] == "random"
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


def test_resume_restores_iteration_and_weights(comparison_run, synthetic_voc):
    run_dir = comparison_run / "random"
    saved = safe_torch_load(run_dir / CHECKPOINT_NAME)
    cfg = resolve("voc_det", "cpu", overrides={"arch": "resnet18", "batch_size": 2, "iters": 4, "max_test_images": 2},
                  sets={"box_batch_size_per_image": 16, "log_period": 1, "min_size_train": [96, 112],
                        "min_size_test": 112, "rpn_post_nms_top_n_test": 30, "num_vis": 1})
    run = DetectionRun(cfg, "random", str(synthetic_voc), str(run_dir), resume="auto")
    run.setup()
    assert run.iteration == 2
    state = run.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    assert run.scheduler.last_epoch == 2
    run.train()
    assert run.iteration == 4
    assert [h["iter"] for h in run.history] == [1, 2, 3, 4]
    assert safe_torch_load(run_dir / CHECKPOINT_NAME)["iteration"] == 4
    # resuming a finished run trains nothing more
    run2 = DetectionRun(cfg, "random", str(synthetic_voc), str(run_dir), resume="auto")
    run2.setup()
    run2.train()
    assert run2.iteration == 4


def test_lr_schedule_warmup_and_steps():
    cfg = {"gamma": 0.1, "steps": [10, 20], "warmup_iters": 4, "warmup_factor": 0.001}
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(2, cfg) == pytest.approx(0.5005)
    assert lr_factor(4, cfg) == 1.0 and lr_factor(9, cfg) == 1.0
    assert lr_factor(10, cfg) == pytest.approx(0.1) and lr_factor(25, cfg) == pytest.approx(0.01)


def test_presets_and_overrides():
    paper = resolve("voc_det", "paper")
    assert (paper["iters"], paper["batch_size"], paper["lr"], paper["steps"], paper["warmup_iters"]) == \
        (24000, 16, 0.02, [18000, 22000], 100)
    assert paper["min_size_train"] == list(range(480, 801, 32)) and paper["min_size_test"] == 800
    assert paper["detector"] == "c4" and paper["norm"] == "syncbn"
    p8 = resolve("voc_det", "paper-8img")
    assert (p8["batch_size"], p8["iters"], p8["lr"], p8["steps"]) == (8, 48000, 0.01, [36000, 44000])
    coco = resolve("coco_det", "paper")
    assert coco["iters"] == 90000 and coco["min_size_train"] == list(range(640, 801, 32)) and coco["mask"]
    assert resolve("coco_det", "paper-2x")["iters"] == 180000
    cfg = resolve("voc_det", "paper", overrides={"iters": 10}, sets={"steps": [5, 8], "lr": 1})
    assert cfg["iters"] == 10 and cfg["steps"] == [5, 8] and cfg["lr"] == 1.0
    from moco_zoo.transfer.engine.config import effective_batch

    assert effective_batch(resolve("voc_det", "paper", overrides={"batch_size": 8}), 2) == (8, 4, 0.01)
    assert resolve("voc_det", "paper", overrides={"iters": 12000})["steps"] == [9000, 11000]  # steps scale along
    assert resolve("voc_det", "cpu", overrides={"iters": 600})["steps"] == [440, 540]


def test_run_dirs_are_unique():
    dirs = run_dirs(Path("o"), ["random", "a/ckpt.pth", "b/ckpt.pth", "random"])
    assert len({str(d) for d in dirs}) == 4


@pytest.mark.parametrize("argv,message", [
    (["--weights", "random", "--set", "bogus_key=1"], "unknown config key 'bogus_key'"),
    (["--weights", "random", "--set", "iters=many"], "config key 'iters' expects int"),
    (["--weights", "random", "--set", "noequals"], "expected key=value"),
    (["--weights", "random", "--batch-size", "3", "--set", "batch_per_rank=0", "--iters", "0"], "iters must be >= 1"),
    (["--weights", "/nonexistent/weights.pth"], "weights.pth"),
    (["--weights", "random", "--eval-only"], "--eval-only needs --resume"),
])
def test_bad_input_errors(synthetic_voc, tmp_path, capsys, argv, message):
    rc = main("voc_det", ["--data-root", str(synthetic_voc), "--out", str(tmp_path), "--arch", "resnet18"] + argv)
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


def test_yaml_config_file_between_preset_and_flags(tmp_path):
    from moco_zoo.transfer.engine import ConfigError

    f = tmp_path / "my.yaml"
    f.write_text("iters: 77\nlr: 0.05\nsteps: [50, 60]\n")
    cfg = resolve("voc_det", "cpu", str(f), overrides={"lr": 0.01}, sets={"steps": [10, 20]})
    assert (cfg["iters"], cfg["lr"], cfg["steps"]) == (77, 0.01, [10, 20])
    f.write_text("itres: 5\n")
    with pytest.raises(ConfigError, match=r"my\.yaml: unknown config key 'itres'"):
        resolve("voc_det", "cpu", str(f))
