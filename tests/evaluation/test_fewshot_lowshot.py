"""Few-shot draws and logistic regression; low-shot subsets (balanced, deterministic) and their split files in the
ImageNet 1%/10% format (bare file names, or class/file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moco_zoo.evaluation.fewshot import draw_per_class, logistic_regression_top1, run_fewshot
from moco_zoo.evaluation.lowshot import read_split_file, subset_indices, write_split_file
from moco_zoo.pretrain.data import ImageFolderDataset


def test_fewshot_draws_k_per_class_or_a_percent_and_repeat_with_the_seed():
    y = torch.tensor([0] * 40 + [1] * 30 + [2] * 5)
    for k in (1, 2, 5):
        idx = draw_per_class(y, seed=3, shots=k)
        assert torch.bincount(y[idx]).tolist() == [k, k, k]
        assert torch.equal(idx, draw_per_class(y, seed=3, shots=k))
    assert not torch.equal(draw_per_class(y, seed=3, shots=5), draw_per_class(y, seed=4, shots=5))
    assert torch.bincount(y[draw_per_class(y, seed=0, percent=10)]).tolist() == [4, 3, 1]


def test_logistic_regression_learns_the_clusters_and_tries_differ():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 0.6
    y, yt = torch.arange(200) % 4, torch.arange(100) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    xt = centres[yt] + torch.randn(100, 16, generator=g)
    res = run_fewshot(x, y, xt, yt, shots=(1, 10), tries=3, seed=0)
    assert set(res) == {"top1_1shot", "top1_10shot"} and all(len(v) == 3 for v in res.values())
    assert np.mean(res["top1_10shot"]) > 60.0 > np.mean(res["top1_1shot"])
    assert len(set(res["top1_1shot"])) > 1  # different draws, different results
    # on the full train split it matches a nearest-class-mean classifier (numpy) on these well separated clusters
    xn, xtn = (x / x.norm(dim=1, keepdim=True)).numpy(), (xt / xt.norm(dim=1, keepdim=True)).numpy()
    means = np.stack([xn[y.numpy() == c].mean(0) for c in range(4)])
    ncm = 100.0 * np.mean(np.argmax(xtn @ means.T, 1) == yt.numpy())
    assert abs(logistic_regression_top1(x, y, xt, yt) - ncm) <= 3.0


def test_lowshot_subsets_are_balanced_deterministic_and_round_trip_through_split_files(eval_imagefolder, tmp_path):
    ds = ImageFolderDataset(eval_imagefolder / "train")
    idx = subset_indices(ds, 50.0, seed=1)
    counts = np.bincount(np.array(ds.targets)[idx.numpy()])
    assert counts.tolist() == [3] * 10  # 6 images per class
    assert torch.equal(idx, subset_indices(ds, 50.0, seed=1))
    assert not torch.equal(idx, subset_indices(ds, 50.0, seed=2))
    assert np.bincount(np.array(ds.targets)[subset_indices(ds, 1.0, 0).numpy()]).tolist() == [1] * 10

    path = write_split_file(tmp_path / "50percent.txt", ds, idx.tolist())
    lines = path.read_text().split()
    assert all("/" not in line and line.startswith("train_") for line in lines)  # ImageNet style: file names
    assert read_split_file(path, ds) == idx.tolist()
    # class_dir/file lines (and comments, blank lines) are read as well
    rel = [f"{ds.classes[ds.targets[i]]}/{lines[j]}" for j, i in enumerate(idx.tolist())]
    (tmp_path / "b.txt").write_text("# subset\n\n" + "\n".join(rel) + "\n")
    assert read_split_file(tmp_path / "b.txt", ds) == idx.tolist()


def test_split_file_errors_name_the_file_and_line(eval_imagefolder, tmp_path):
    ds = ImageFolderDataset(eval_imagefolder / "train")
    (tmp_path / "bad.txt").write_text("train_000000.jpg\nn01440764_10026.JPEG\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'n01440764_10026.JPEG' is not an image"):
        read_split_file(tmp_path / "bad.txt", ds)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        read_split_file(tmp_path / "missing.txt", ds)
