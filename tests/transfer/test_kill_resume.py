"""Drill: a transfer run SIGKILLed from outside at random moments (also mid checkpoint write) and resumed with
``--resume`` ends bit-identical to an uninterrupted run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moco_zoo.transfer.engine import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--weights", "random", "--preset", "cpu", "--arch", "resnet18", "--batch-size", "2", "--iters", "12",
        "--max-test-images", "2", "--threads", "1", "--workers", "1", "--detector", "c4",
        "--set", "checkpoint_period=2", "log_period=1", "num_vis=0", "box_batch_size_per_image=16",
        "rpn_post_nms_top_n_test=30", "box_detections_per_img=10", "min_size_train=[96,112]", "min_size_test=112"]


def _cmd(data_root: Path, out: Path, *extra: str):
    return [sys.executable, str(REPO / "transfer" / "voc_det.py"), "--data-root", str(data_root), "--output-dir",
            str(out), *ARGS, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(synthetic_voc, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(synthetic_voc, ref), env=_env(), check=True, capture_output=True, timeout=900)
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):  # kill at a random moment after a checkpoint exists, then resume
        proc = subprocess.Popen(_cmd(synthetic_voc, out, "--resume"), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while not (out / "random" / CHECKPOINT_NAME).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run(_cmd(synthetic_voc, out, "--resume"), env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 1
    a = torch.load(ref / "random" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(out / "random" / CHECKPOINT_NAME, weights_only=True)
    assert a["iteration"] == b["iteration"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["history"] == b["history"]
    assert (ref / "random" / "metrics.jsonl").read_text() == (out / "random" / "metrics.jsonl").read_text()
    assert "resumed from" in final.stderr and "at iteration" in final.stderr
