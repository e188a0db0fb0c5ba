"""kNN monitor and the linear classification protocol."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco_zoo.checkpoint import CheckpointError, safe_torch_load
from pretrain.knn import knn_accuracy, knn_predict
from pretrain.lincls import LinclsConfig, run_linear_probe, scaled_milestones


def test_weighted_knn_vote_by_hand():
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    q = F.normalize(torch.tensor([[1.0, 0.1]]), dim=1)
    scores = knn_predict(q, memory, labels, num_classes=2, k=2, t=0.1)
    sims = q @ memory.T
    expected = torch.tensor([[sims[0, 0].div(0.1).exp(), sims[0, 1].div(0.1).exp()]])  # top-2: items 0 and 1
    torch.testing.assert_close(scores, expected)
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    tr_y, va_y = torch.arange(4).repeat(25), torch.arange(4).repeat(5)
    tr = F.normalize(centers[tr_y] + 0.05 * torch.randn(100, 16, generator=g), dim=1)
    va = F.normalize(centers[va_y] + 0.05 * torch.randn(20, 16, generator=g), dim=1)
    assert knn_accuracy(tr, tr_y, va, va_y, 4, k=200)["knn_top1"] == 100.0


def test_linear_probe_protocol_checkpoint_and_resume(tiny_imagefolder, tmp_path):
    cfg = LinclsConfig(data=str(tiny_imagefolder), pretrained="random", arch="resnet18", epochs=2, batch_size=16,
                       lr=1.0, image_size=32, workers=0, output_dir=str(tmp_path / "lin"), progress=False)
    assert scaled_milestones(LinclsConfig()) == [60, 80] and scaled_milestones(cfg) == [1, 2]
    res = run_linear_probe(cfg)
    assert res["sanity_check"] == "passed" and 0 <= res["top1"] <= 100 and len(res["history"]) == 2
    # kNN of the frozen features is reported too, computed with the backbone in eval mode (the sanity check above
    # would fail if it had updated BN statistics)
    assert 0 <= res["knn_top1"] <= 100 and res["knn_top5"] >= res["knn_top1"]
    ck = safe_torch_load(tmp_path / "lin" / "checkpoint.pth")
    assert ck["kind"] == "linear-probe" and ck["num_classes"] == 10 and len(ck["class_names"]) == 10
    assert ck["arch"] == "resnet18" and ck["source"] == "random" and ck["epoch"] == 2
    assert ck["state_dict"]["fc.weight"].shape == (10, 512) and "conv1.weight" in ck["state_dict"]
    cfg.epochs, cfg.resume = 3, "auto"
    res3 = run_linear_probe(cfg)
    assert len(res3["history"]) == 3 and res3["history"][:2] == res["history"]


def test_linear_probe_rejects_a_pretraining_checkpoint_as_resume(tiny_imagefolder, tmp_path):
    torch.save({"kind": "moco-pretrain"}, tmp_path / "pre.pth")
    cfg = LinclsConfig(data=str(tiny_imagefolder), pretrained="random", arch="resnet18", epochs=1, batch_size=16,
                       image_size=32, workers=0, output_dir=str(tmp_path / "lin"), progress=False,
                       resume=str(tmp_path / "pre.pth"))
    with pytest.raises(CheckpointError, match="expected a checkpoint of kind 'linear-probe'"):
        run_linear_probe(cfg)
