"""Data loading: clear errors for bad inputs, reproducible per-sample augmentation, resumable sampler."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from moco_zoo.pretrain.augment import TwoCropsTransform, moco_v1_transform, moco_v2_transform
from moco_zoo.pretrain.data import (CorruptImageError, DataError, ImageFolderDataset, ResumableBatchSampler, load_rgb,
                           scan_imagefolder)


def test_missing_and_empty_directories_are_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        scan_imagefolder(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        scan_imagefolder(empty)
    (empty / "cat").mkdir()
    with pytest.raises(DataError, match=r"no images .* class directories \(cat\)"):
        scan_imagefolder(empty)


def test_loose_images_get_a_hint(tmp_path, tiny_imagefolder):
    src = next((tiny_imagefolder / "train").rglob("*.jpg"))
    shutil.copy(src, tmp_path / "a.jpg")
    with pytest.raises(DataError, match="class sub-directories"):
        scan_imagefolder(tmp_path)


def test_unreadable_directory_is_named(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "cls").mkdir(parents=True)
    real_scandir = os.scandir

    def deny(path):
        if Path(path) == root / "cls":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    # chmod is no barrier for root, which runs CI here. Undo before teardown: pytest's cleanup uses os.scandir too.
    with monkeypatch.context() as patch, pytest.raises(DataError, match=r"cls: directory is not readable"):
        patch.setattr(os, "scandir", deny)
        scan_imagefolder(root)


def test_corrupt_jpeg_names_the_file(tmp_path, tiny_imagefolder):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder / "train", root)
    victim = sorted(root.rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(CorruptImageError, match=str(victim)):
        load_rgb(str(victim))
    ds = ImageFolderDataset(root, moco_v2_transform(32))
    idx = [p for p, _ in ds.samples].index(str(victim))
    with pytest.raises(CorruptImageError, match=victim.name):
        ds[idx]
    garbage = root / ds.classes[0] / "zz_not_an_image.jpg"
    garbage.write_text("hello")
    with pytest.raises(CorruptImageError, match="zz_not_an_image.jpg"):
        load_rgb(str(garbage))


@pytest.mark.parametrize("recipe", [moco_v1_transform, moco_v2_transform])
def test_seeded_views_are_reproducible_and_leave_global_rng_alone(tiny_imagefolder, recipe):
    ds = ImageFolderDataset(tiny_imagefolder / "train", TwoCropsTransform(recipe(32)))
    torch.manual_seed(123)
    random.seed(5)
    state_t, state_p = torch.get_rng_state(), random.getstate()
    (q1, k1), y, i = ds[(3, 777)]
    (q2, k2), _, _ = ds[(3, 777)]
    (q3, _), _, _ = ds[(3, 778)]
    assert q1.shape == (3, 32, 32) and i == 3 and y == ds.targets[3]
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1)  # two independent views
    assert not torch.equal(q1, q3)
    assert torch.equal(torch.get_rng_state(), state_t) and random.getstate() == state_p


def test_sampler_is_resumable_and_splits_ranks():
    s = ResumableBatchSampler(50, 4, seed=1)
    assert s.steps_per_epoch == 12
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_step=5)
    assert list(s) == full[5:] and len(s) == 7
    s.set_epoch(4)
    assert list(s) != full  # new permutation each epoch
    r0 = ResumableBatchSampler(50, 4, rank=0, world_size=2, seed=1)
    r1 = ResumableBatchSampler(50, 4, rank=1, world_size=2, seed=1)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == 6  # 50 // (4 * 2), last partial global batch dropped
    i0 = {i for b in b0 for i, _ in b}
    i1 = {i for b in b1 for i, _ in b}
    assert not i0 & i1 and len(i0) == len(i1) == 24
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 4, world_size=2)
