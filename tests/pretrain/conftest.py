"""Fixtures of the pretraining tests: a tiny ImageFolder (32 px) and a helper to run the CLIs in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """ImageFolder root with train/ (48 images) and val/ (16 images), 32 px, from the embedded generator."""
    from moco_zoo.data import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("tiny_if") / "data", num_images=64, image_size=32, seed=0)


def run_script(script: str, args: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 240,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run pretrain/<script> with the test interpreter from the repository root (1 thread, to be reproducible)."""
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(REPO / "pretrain" / script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tiny_args(data: Path, out: Path, *extra: str) -> List[str]:
    return [str(data), "--arch", "resnet18", "--image-size", "32", "-b", "8", "--moco-k", "40", "--epochs", "2",
            "-j", "0", "--output-dir", str(out), "--set", "progress=false", "plots=false", "knn_every=0", *extra]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread in these tests: on a shared 2-core machine, OpenMP oversubscription makes the tiny
    ResNet steps ~10x slower; restored afterwards so other test packages are unaffected."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
