"""VOC semantic segmentation: mIoU on a hand-computed case, model shapes, transforms, sampler, and a tiny CLI run
(two weights -> comparison table, outputs, atomic checkpoint, --resume, --eval-only, wrong-architecture error)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moco_zoo.transfer.engine.cli import main
from moco_zoo.transfer.segmentation.data import SegTrainTransform
from moco_zoo.transfer.segmentation.losses import class_pixel_frequencies, median_frequency_weights
from moco_zoo.transfer.segmentation.metrics import SegmentationMeter, confusion_matrix, segmentation_scores
from moco_zoo.transfer.segmentation.model import FCNSegmenter, build_segmenter, dilated_resnet


def test_miou_hand_computed():
    # 3 classes, 2x4 image, one ignored pixel (255).
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])
    # Valid pixels (gt -> pred): 0->0, 0->1, 1->1, 1->1, 2->2, 2->0, 1->2 (the 255 pixel is dropped).
    c = confusion_matrix(pred, target, 3)
    assert c.tolist() == [[1, 1, 0],
                          [0, 2, 1],
                          [1, 0, 1]]
    s = segmentation_scores(c, ["bg", "a", "b"])
    # IoU_0 = 1 / (2 + 2 - 1) = 1/3;  IoU_1 = 2 / (3 + 3 - 2) = 1/2;  IoU_2 = 1 / (2 + 2 - 1) = 1/3
    assert s["per_class_IoU"]["bg"] == pytest.approx(100 / 3)
    assert s["per_class_IoU"]["a"] == pytest.approx(50.0)
    assert s["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert s["mean_acc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert s["num_pixels"] == 7


def test_miou_absent_class_is_left_out_and_meter_accumulates():
    m = SegmentationMeter(4, ["bg", "a", "b", "c"])
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    m.update(torch.tensor([[1, 0]]), torch.tensor([[1, 255]]))
    s = m.evaluate()
    assert s["per_class_IoU"]["b"] is None and s["per_class_IoU"]["c"] is None  # neither in GT nor predicted
    assert s["mIoU"] == pytest.approx(100.0) and s["num_classes_present"] == 2
    assert np.asarray(s["confusion"]).sum() == 3
    with pytest.raises(ValueError, match="target labels must be in 0..3"):
        m.update(torch.tensor([0]), torch.tensor([7]))


def test_median_frequency_weights_hand_computed():
    # Image 1: background 2 px, class 1 1 px, one ignored pixel; image 2: background 1 px, class 2 3 px.
    masks = [np.array([[0, 0, 1, 255]]), np.array([[0, 2], [2, 2]])]
    pixels, image_pixels = class_pixel_frequencies(masks, num_classes=4)
    assert pixels.tolist() == [3, 1, 3, 0] and image_pixels.tolist() == [7, 3, 4, 0]
    # f = (3/7, 1/3, 3/4); median 3/7; class 3 never occurs -> weight 1.
    w = median_frequency_weights(pixels, image_pixels)
    assert w.tolist() == pytest.approx([1.0, (3 / 7) / (1 / 3), (3 / 7) / (3 / 4), 1.0])
    with pytest.raises(ValueError, match="no labelled pixels"):
        median_frequency_weights(np.zeros(3, np.int64), np.zeros(3, np.int64))


def test_class_weighting_reaches_the_loss(synthetic_voc):
    """``class_weighting=median_frequency``: weights from the training PNGs (read here with PIL) and the loss is the
    weighted cross-entropy, i.e. sum(w_y * nll) / sum(w_y) over the labelled pixels."""
    from PIL import Image

    from moco_zoo.transfer.config import resolve
    from moco_zoo.transfer.tasks import build_task

    cfg = resolve("voc_seg", "cpu", overrides={"class_weighting": "median_frequency", "max_train_images": 6})
    task = build_task(cfg)
    train, _, names = task.build_datasets(str(synthetic_voc))
    base = train.dataset
    masks = [np.array(Image.open(base.mask_path(i))) for i in train.indices]
    labelled = [m[m != 255] for m in masks]
    k = len(names) + 1
    freq = {c: sum((m == c).sum() for m in labelled) / sum(m.size for m in labelled if (m == c).any())
            for c in range(k) if any((m == c).any() for m in labelled)}
    median = float(np.median(list(freq.values())))
    expect = [median / freq[c] if c in freq else 1.0 for c in range(k)]
    assert task.class_weight.tolist() == pytest.approx(expect, rel=1e-6)

    torch.manual_seed(0)
    logits = torch.randn(2, k, 4, 4)
    target = torch.randint(0, k, (2, 4, 4))
    target[0, 0, 0] = 255
    loss = task.losses(lambda x: logits, (torch.zeros(2, 3, 4, 4), target), torch.device("cpu"))["loss_ce"]
    valid = target != 255
    nll = -logits.log_softmax(1).gather(1, target.clamp(max=k - 1)[:, None])[:, 0]
    w = task.class_weight[target.clamp(max=k - 1)]
    assert float(loss) == pytest.approx(float((w * nll)[valid].sum() / w[valid].sum()), rel=1e-5)
    assert resolve("voc_seg", "paper").class_weighting == "none"  # the paper protocol trains unweighted


@pytest.mark.parametrize("arch", ["resnet18"])
def test_dilated_backbone_output_stride_and_shapes(arch):
    for os_, expect in ((32, 2), (16, 4), (8, 8)):
        backbone, _ = dilated_resnet("random", arch, os_)
        model = FCNSegmenter(backbone, 5, head_channels=16, head_convs=1).eval()
        x = torch.rand(1, 3, 64, 64)
        feats = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(x)))))
        assert feats.shape[-1] == expect
        assert model(x).shape == (1, 5, 64, 64)
    # the trunk keeps torchvision key names and carries exactly the resolver's weights
    from moco_zoo import load_backbone_state_dict

    model, found = build_segmenter("random", 5, arch, output_stride=8, head_channels=16, head_convs=1, seed=3)
    assert found == arch
    sd = model.backbone_state_dict()
    ref, _ = load_backbone_state_dict("random", arch, seed=3)
    assert set(k for k in ref if not k.startswith("fc.")) == set(sd)
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k


def test_wrong_architecture_weights_name_the_file(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model, arch = build_segmenter(str(path), 3, None, output_stride=32, head_channels=8, head_convs=1)
    assert arch == "resnet18"
    from moco_zoo.checkpoint import CheckpointError

    with pytest.raises(CheckpointError) as e:
        build_segmenter(str(path), 3, "resnet50", output_stride=32)
    assert "r18.pth" in str(e.value) and "look like 'resnet18'" in str(e.value)


def test_train_transform_crop_pad_and_ignore():
    torch.manual_seed(0)
    t = SegTrainTransform(48, scale_range=(0.5, 0.5), flip_prob=1.0)
    img = torch.rand(3, 40, 60)
    mask = torch.zeros(40, 60, dtype=torch.int64)
    mask[:, :30] = 1
    out_img, out_mask = t(img, mask)
    assert out_img.shape == (3, 48, 48) and out_mask.shape == (48, 48)
    # scaled to 20x30 then padded: the padding is ignore (255), the image keeps only labels 0/1
    assert set(out_mask.unique().tolist()) == {0, 1, 255}
    assert (out_mask == 255).sum() == 48 * 48 - 20 * 30


def _tiny_args(data_root, out, weights, *extra):
    return ["--data-root", str(data_root), "--weights", *weights, "--output-dir", str(out), "--preset", "cpu",
            "--arch", "resnet18", "--iters", "2", "--batch-size", "2", "--max-test-images", "2", "--threads", "1",
            "--set", "crop_size=64", "head_channels=16", "log_period=1", "checkpoint_period=1", "num_vis=1", *extra]


def test_cli_end_to_end_compare_resume_eval_only(synthetic_voc, tmp_path):
    import torchvision


    wfile = tmp_path / "weights" / "tv_r18.pth"
    wfile.parent.mkdir()
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), wfile)
    out = tmp_path / "run"
    assert main("voc_seg", _tiny_args(synthetic_voc, out, ["random", str(wfile)])) == 0
    table = (out / "comparison.md").read_text()
    assert "| random | resnet18 | FCN os8 | 2 |" in table and "tv_r18" in table
    run = out / "random"
    for name in ("config.yaml", "metrics.json", "results.md", "loss_curve.png", "checkpoint_last.pth", "log.txt"):
        assert (run / name).is_file() or (out / name).is_file(), name
    assert list((run / "predictions").glob("*.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["mIoU"] <= 100.0 and metrics["class_names"][0] == "background"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == "cpu" and cfg["crop_size"] == 64 and cfg["arch"] == "resnet18"

    ckpt = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert ckpt["kind"] == "transfer" and ckpt["task"] == "voc_seg" and ckpt["iteration"] == 2
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries

    # --resume continues the same run to a longer schedule (iterations 2 -> 3), keeping the loss history.
    assert main("voc_seg", _tiny_args(synthetic_voc, out, ["random"], "--resume", "--iters", "3")) == 0
    ckpt = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert ckpt["iteration"] == 3 and [h["iter"] for h in ckpt["history"]] == [1, 2, 3]

    # --eval-only on the checkpoint reproduces the evaluation without training.
    before = json.loads((run / "metrics.json").read_text())["metrics"]["mIoU"]
    assert main("voc_seg", _tiny_args(synthetic_voc, out, ["random"], "--resume", str(run / "checkpoint_last.pth"),
                                      "--eval-only", "--iters", "3")) == 0
    after = json.loads((run / "metrics.json").read_text())["metrics"]["mIoU"]
    assert after == pytest.approx(before)


def test_cli_errors(synthetic_voc, tmp_path, capsys):

    assert main("voc_seg", _tiny_args(synthetic_voc, tmp_path, ["random"], "--set", "nonsense=1")) == 2
    assert "unknown config key 'nonsense'" in capsys.readouterr().err
    assert main("voc_seg", _tiny_args(synthetic_voc, tmp_path, ["random"], "--set", "test_sets=[2012-test]")) == 2
    err = capsys.readouterr().err
    assert "VOC2012" in err and "test.txt: image-set file not found" in err
    assert main("voc_seg", _tiny_args(synthetic_voc, tmp_path, ["random"], "--eval-only")) == 2
    assert "--eval-only needs --resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_processes_syncbn(synthetic_voc, tmp_path):
    """2 CPU processes (gloo) with cross-rank BN: same outputs as a single run would write, rank 0 only."""
    import os
    import subprocess
    import sys

    import socket

    script = Path(__file__).resolve().parents[2] / "transfer" / "voc_seg.py"
    out = tmp_path / "ddp"
    with socket.socket() as s:  # torchrun's static rendezvous needs a concrete free port (0 hangs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
           *_tiny_args(synthetic_voc, out, ["random"], "--norm", "syncbn", "--max-test-images", "3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "random" / "metrics.json").read_text())
    cfg = yaml.safe_load((out / "random" / "config.yaml").read_text())
    assert cfg["run"]["world_size"] == 2 and cfg["run"]["batch_per_rank"] == 1
    assert metrics["iters"] == 2 and metrics["metrics"]["num_pixels"] > 0
    # the confusion matrix covers all 3 evaluated images (summed over the two ranks)
    from moco_zoo.data.voc import VOCSegmentation

    ds = VOCSegmentation(synthetic_voc, [("2007", "test")])
    expected = sum(int((ds[i][1] != 255).sum()) for i in range(3))
    assert metrics["metrics"]["num_pixels"] == expected
