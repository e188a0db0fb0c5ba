"""``torchrun --nproc_per_node 2 -m moco_zoo eval``: extraction split over the ranks, the linear sweep and low-shot
fine-tuning trained with DDP (gloo); the sweep's result equals the single-process run's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["random", "-a", "resnet18", "--preset", "cpu-small", "--seeds", "0", "--no-progress", "--protocols",
        "knn,linear,lowshot", "--set", "image_size=32", "linear_epochs=3", "lowshot_epochs=[1]",
        "lowshot_percents=[50]", "linear_lrs=[0.1,1.0]", "linear_wds=[0]", "chunk_size=16", "precision=fp32"]


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_eval_matches_one_process(eval_imagefolder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "moco_zoo", "eval", *ARGS, "--data", str(eval_imagefolder),
                    "--output-dir", str(one)], check=True, env=env, cwd=REPO, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29613", "-m", "moco_zoo", "eval", *ARGS, "--data",
                           str(eval_imagefolder), "--output-dir", str(two)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = {(r["protocol"], r["metric"]): r["mean"] for r in json.loads((one / "results.json").read_text())["results"]}
    r2 = json.loads((two / "results.json").read_text())
    assert r2["world_size"] == 2
    r2 = {(r["protocol"], r["metric"]): r["mean"] for r in r2["results"]}
    for key in (("knn", "top1_k20"), ("linear", "top1"), ("linear", "top5")):
        assert r2[key] == pytest.approx(r1[key], abs=1e-6), key
    assert 0.0 <= r2[("lowshot", "top1_50pct")] <= 100.0
    # both ranks extracted: the cache holds every chunk once
    assert len(list((two / "feature_cache").rglob("chunk_*.safetensors"))) == 4 + 2
