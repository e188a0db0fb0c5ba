"""kNN monitor and the linear classification protocol."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco_zoo.checkpoint import CheckpointError, safe_torch_load
from moco_zoo.pretrain.knn import knn_accuracy, knn_predict, recalibrate_bn
from moco_zoo.pretrain.lincls import LinclsConfig, run_linear_probe, scaled_milestones


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


def test_recalibrate_bn_averages_the_batch_statistics_and_leaves_the_model_alone():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(5, 3, 4, 4, generator=g) * (i + 1) + i for i in range(3)]
    calib = recalibrate_bn(model, batches, torch.device("cpu"))
    assert not calib.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # independent expectation: first BN sees the conv outputs; running mean/var = mean over batches of the batch
    # mean / unbiased batch variance (the cumulative average of equal-weight updates)
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(calib[1].running_mean, mean)
    torch.testing.assert_close(calib[1].running_var, var)
    assert int(calib[1].num_batches_tracked) == 3
    # the second BN sees ReLU outputs (positive mean), so it moved away from the init's mean 0
    assert (calib[3].running_mean > 0).all()


def test_linear_probe_protocol_checkpoint_and_resume(tiny_imagefolder, tmp_path):
    cfg = LinclsConfig(data=str(tiny_imagefolder), pretrained="random", arch="resnet18", epochs=2, batch_size=16,
                       lr=1.0, image_size=32, workers=0, output_dir=str(tmp_path / "lin"), progress=False)
    assert scaled_milestones(LinclsConfig()) == [60, 80] and scaled_milestones(cfg) == [1, 2]
    res = run_linear_probe(cfg)
    assert res["sanity_check"] == "passed" and 0 <= res["top1"] <= 100 and len(res["history"]) == 2
    # kNN of the frozen features is reported too, computed with the backbone in eval mode (the sanity check above
    # would fail if it had updated BN statistics)
    assert 0 <= res["knn_top1"] <= 100 and res["knn_top5"] >= res["knn_top1"] and 0 <= res["knn_top1_data_bn"] <= 100
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


def test_linear_probe_config_layers_and_errors(tmp_path):
    """Protocol defaults < --config-file < flags < --set; an unknown key names its source."""
    from moco_zoo.config import ConfigError
    from moco_zoo.pretrain.lincls import build_parser, config_from_args

    cfg_file = tmp_path / "probe.yaml"
    cfg_file.write_text("lr: 1.0\nepochs: 8\nknn: false\n")
    p = build_parser()
    default = config_from_args(p.parse_args(["DATA", "--pretrained", "random", "-a", "resnet18"]))
    assert (default.lr, default.epochs, default.lr_steps, default.weight_decay) == (30.0, 100, [60, 80], 0.0)
    cfg = config_from_args(p.parse_args(["DATA", "--pretrained", "random", "--config-file", str(cfg_file),
                                         "--epochs", "4", "--set", "lr_steps=[2,3]", "channels_last=true"]))
    assert (cfg.lr, cfg.epochs, cfg.knn, cfg.lr_steps, cfg.channels_last) == (1.0, 4, False, [2, 3], True)
    with pytest.raises(ConfigError, match="override: unknown config key 'lr_step'"):
        config_from_args(p.parse_args(["DATA", "--pretrained", "random", "--set", "lr_step=[2]"]))
    with pytest.raises(ConfigError, match="--pretrained is required"):
        config_from_args(p.parse_args(["DATA"]))
