"""Corrupt images in the pretraining data: one line naming the file whatever the loader worker count, all bad files
listed at once by the pre-scan, or skipped and counted under the explicit policy; `moco-zoo verify-data`."""
from __future__ import annotations

import shutil

import pytest

from moco_zoo.cli import main as moco_zoo_main

from .conftest import run_script, tiny_args


@pytest.fixture()
def corrupt_data(tiny_imagefolder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    bad = sorted((root / "train").rglob("*.jpg"))[:3]
    for p in bad:
        p.write_bytes(p.read_bytes()[:200])  # truncated JPEGs
    return root, [str(p) for p in bad]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_bad_image_is_one_line_naming_the_file(corrupt_data, tmp_path, workers):
    root, bad = corrupt_data
    proc = run_script("main_moco.py", tiny_args(root, tmp_path / f"o{workers}", "-j", workers, "--epochs", "1"),
                      check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "cannot decode image" in err[0] and any(b in err[0] for b in bad), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_the_prescan_lists_every_bad_file_and_skipping_counts_them(corrupt_data, tmp_path):
    root, bad = corrupt_data
    proc = run_script("main_moco.py", tiny_args(root, tmp_path / "a", "--set", "verify_images=true", "max_steps=1"),
                      check=False)
    assert proc.returncode == 2 and "3 of 48 images do not decode" in proc.stderr
    assert all(b in proc.stderr for b in bad)
    proc = run_script("main_moco.py", tiny_args(root, tmp_path / "b", "--set", "skip_bad_images=true", "max_steps=1"))
    assert "skipping 3 of 48 training images that do not decode" in proc.stderr


def test_verify_data_command(corrupt_data, tiny_imagefolder, capsys):
    root, bad = corrupt_data
    assert moco_zoo_main(["verify-data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "3 of 64 images do not decode" in err and all(b in err for b in bad)
    assert moco_zoo_main(["verify-data", str(tiny_imagefolder)]) == 0
    assert "all 64 images decode" in capsys.readouterr().out
