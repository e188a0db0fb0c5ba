"""Detection models from MoCo weights: C4 / FPN construction, norm variants, exact weight loading, errors."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from moco_zoo.checkpoint import CheckpointError
from moco_zoo.transfer.modeling import (DistributedBatchNorm2d, backbone_trunk_state, build_detector,
                                        convert_sync_batchnorm, load_trunk)
from moco_zoo.transfer.modeling.detector import C4RoIAlign, PooledHead, Res5Head

SMALL = dict(min_size=(96,), max_size=128, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_train=200,
             rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=32,
             rpn_batch_size_per_image=32, box_batch_size_per_image=16, roi_resolution=8,
             box_detections_per_img=10)


def _batch(mask=False):
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 112), torch.rand(3, 100, 96)]
    targets = []
    for img in images:
        t = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 80.0]]),
             "labels": torch.tensor([1, 3])}
        if mask:
            m = torch.zeros(2, *img.shape[-2:], dtype=torch.uint8)
            m[0, 12:70, 10:60] = 1
            m[1, 30:80, 40:90] = 1
            t["masks"] = m
        targets.append(t)
    return images, targets


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    torch.manual_seed(123)
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("w") / "r18_backbone.pth"
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("detector,mask", [("c4", False), ("c4", True), pytest.param("fpn", False, marks=pytest.mark.slow),
                                           ("fpn", True)])
def test_build_train_and_predict(detector, mask):
    model, info = build_detector(4, weights="random", arch="resnet18", detector=detector, mask=mask, norm="bn", **SMALL)
    assert info.arch == "resnet18"
    assert all(p.requires_grad for p in model.backbone.parameters())  # all stages trainable (incl. the stem)
    model.train()
    images, targets = _batch(mask)
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} | ({"loss_mask"} if mask else set())
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4
    if mask:
        assert out[0]["masks"].shape[-2:] == images[0].shape[-2:]


def test_c4_layout_matches_the_paper():
    model, _ = build_detector(4, weights="random", arch="resnet50", detector="c4", mask=True, norm="bn")
    # trunk = stem + res2..res4 (stride 16); res5 + extra norm is the box head; the mask head shares it
    assert [n for n, _ in model.backbone.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert model.backbone.out_channels == 1024
    head = model.roi_heads.box_head
    assert isinstance(head, PooledHead) and isinstance(head.tower, Res5Head)
    assert isinstance(head.tower.norm, nn.BatchNorm2d) and head.tower.norm.num_features == 2048
    assert model.roi_heads.mask_head is head.tower
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, C4RoIAlign) and pool.output_size == 14 and pool.spatial_scale == 1 / 16
    assert model.roi_heads.box_predictor.cls_score.out_features == 5  # 4 classes + background
    # stride in the 3x3 conv (STRIDE_IN_1X1 False) as torchvision
    assert head.tower.res5[0].conv2.stride == (2, 2) and head.tower.res5[0].conv1.stride == (1, 1)
    t = model.transform
    assert list(t.image_mean) == pytest.approx([0.485, 0.456, 0.406]) and list(t.image_std) == pytest.approx([0.229, 0.224, 0.225])


def test_frozen_bn_is_really_frozen():
    model, _ = build_detector(4, weights="random", arch="resnet18", detector="c4", norm="frozen", **SMALL)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(len(list(m.parameters())) == 0 for m in frozen)
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "norm" in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    images, targets = _batch()
    sum(model(images, targets).values()).backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(model.backbone.conv1.weight, model.backbone.conv1.weight.detach() * 0)  # convs still train


def test_syncbn_conversion_on_cpu_keeps_state_and_matches_bn():
    model, _ = build_detector(4, weights="random", arch="resnet18", detector="fpn", norm="syncbn", **SMALL)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.running_mean.fill_(0.01 * i)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    body = model.backbone.body
    body.train()
    y_ref = body(x)["3"]
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, DistributedBatchNorm2d) for m in converted.modules()) == len(bns)
    state = converted.state_dict()
    for k, v in ref.items():
        if not k.endswith("running_mean") and not k.endswith("running_var") and not k.endswith("num_batches_tracked"):
            assert torch.equal(state[k], v), k
    torch.testing.assert_close(converted.backbone.body(x)["3"], y_ref)  # single process: plain BN semantics


@pytest.mark.parametrize("detector", ["c4", "fpn"])
@pytest.mark.parametrize("norm", ["bn", "frozen"])
def test_loaded_backbone_equals_the_weights(r18_file, detector, norm):
    path, sd = r18_file
    model, info = build_detector(4, weights=str(path), arch="resnet18", detector=detector, norm=norm, **SMALL)
    assert info.arch == "resnet18" and info.num_tensors > 0
    got = backbone_trunk_state(model)
    compared = 0
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(got[k], v), k
        compared += 1
    assert compared == len([k for k in sd if not k.endswith("num_batches_tracked")])


def test_arch_is_taken_from_the_weights(r18_file):
    path, _ = r18_file
    _, info = build_detector(4, weights=str(path), detector="c4", **SMALL)
    assert info.arch == "resnet18"


def test_wrong_architecture_names_the_file(r18_file):
    path, _ = r18_file
    with pytest.raises(ValueError) as e:
        build_detector(4, weights=str(path), arch="resnet50", detector="c4", **SMALL)
    assert str(path.name) in str(e.value)
    assert "resnet50" in str(e.value)


def test_load_trunk_names_the_weights_on_any_misfit():
    model = torchvision.models.resnet18()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.")}
    with pytest.raises(CheckpointError, match=r"weights\.bin: weights do not fit resnet18: missing \['layer4"):
        load_trunk(torchvision.models.resnet18(), sd, "weights.bin", "resnet18")
    sd = dict(model.state_dict(), **{"conv1.weight": torch.zeros(1, 3, 7, 7)})
    with pytest.raises(CheckpointError, match=r"weights\.bin: weights do not fit resnet18: .*conv1\.weight"):
        load_trunk(torchvision.models.resnet18(), sd, "weights.bin", "resnet18")


def test_bad_arguments():
    with pytest.raises(ValueError, match="detector"):
        build_detector(4, weights="random", arch="resnet18", detector="c5")
    with pytest.raises(ValueError, match="norm"):
        build_detector(4, weights="random", arch="resnet18", norm="gn")
    with pytest.raises(ValueError, match="not a ResNet"):
        build_detector(4, weights="random", arch="vit_small_patch16_224")
    with pytest.raises(ValueError, match="FPN needs exactly 5"):
        build_detector(4, weights="random", arch="resnet18", detector="fpn", anchor_sizes=(32, 64))


def test_fpn_channels_set_the_pyramid_rpn_and_box_head_width():
    model, _ = build_detector(4, weights="random", arch="resnet18", detector="fpn", norm="bn", fpn_channels=64, **SMALL)
    assert model.backbone.out_channels == 64
    assert {m.out_channels for m in model.backbone.fpn.layer_blocks.modules() if isinstance(m, nn.Conv2d)} == {64}
    assert model.rpn.head.conv[0][0].in_channels == 64
    assert model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7  # 7x7 RoIAlign over 64 channels
    model.train()
    losses = model(*_batch())
    assert torch.isfinite(sum(losses.values()))
