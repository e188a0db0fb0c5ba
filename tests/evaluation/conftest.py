"""Fixtures of the evaluation tests: a tiny ImageFolder (32 px, 10 classes) and one intra-op thread."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def eval_imagefolder(tmp_path_factory) -> Path:
    """train/ (60 images, 6 per class) and val/ (20 images), 32 px, from the embedded generator."""
    from moco_zoo.data import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("eval_if") / "data", num_images=80, image_size=32, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
