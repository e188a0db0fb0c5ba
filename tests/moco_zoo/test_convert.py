"""moco_zoo.convert: format detection, canonical backbone, timm / torchvision / detectron2 writers, errors."""
from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file

import moco_zoo  # noqa: F401  (registers moco_* models)
from moco_zoo import convert, hub
from moco_zoo.checkpoint import CheckpointError

from . import official_formats as of

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints in every supported layout, saved once for the module."""
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, (ckpt, ref) in {
        "v2_r50": of.official_v1v2("v2", "resnet50", seed=0),
        "v1_r18": of.official_v1v2("v1", "resnet18", seed=1),
        "v3_r50": of.official_v3("resnet50", seed=2),
        "lincls_r18": of.official_lincls("resnet18", seed=3, num_classes=10),
        "ours_r18": of.our_pretrain("resnet18", seed=4),
        "ours_e2e_r18": of.our_pretrain("resnet18", seed=5, mechanism="end2end"),
        "probe_r18": of.our_linear_probe("resnet18", seed=6, num_classes=8),
    }.items():
        path = d / f"{name}.pth.tar"
        torch.save(ckpt, path)
        out[name] = (path, ref.eval())
    return out


def _tv_resnet(arch: str, num_classes: int = 0) -> nn.Module:
    """torchvision model built on the meta device (no init cost); ``load_state_dict(..., assign=True)`` fills it."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None, num_classes=max(num_classes, 1))
        if not num_classes:
            model.fc = nn.Identity()
    return model.eval()


def _timm_model(arch: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize(
    "name,fmt,arch,classes",
    [
        ("v2_r50", convert.FORMAT_OFFICIAL_V1V2, "resnet50", 0),
        ("v1_r18", convert.FORMAT_OFFICIAL_V1V2, "resnet18", 0),
        ("v3_r50", convert.FORMAT_OFFICIAL_V3, "resnet50", 0),
        ("lincls_r18", convert.FORMAT_CLASSIFIER, "resnet18", 10),
        ("ours_r18", convert.FORMAT_PRETRAIN, "resnet18", 0),
        ("ours_e2e_r18", convert.FORMAT_PRETRAIN, "resnet18", 0),
        ("probe_r18", convert.FORMAT_LINEAR_PROBE, "resnet18", 8),
    ],
)
def test_detects_format_and_arch(files, name, fmt, arch, classes):
    path, _ = files[name]
    conv = convert.to_canonical(path)
    assert conv.source_format == fmt
    assert conv.arch == arch
    assert conv.num_classes == classes
    assert not any(k.startswith(("fc.", "module.", "encoder_", "base_encoder")) for k in conv.state_dict)
    if name == "probe_r18":
        assert conv.class_names == [f"class{i}" for i in range(8)]


@pytest.mark.parametrize("name", ["v2_r50", "v3_r50"])
def test_resnet50_features_match_timm_and_torchvision(files, tmp_path, name):
    """Encoder inside the MoCo checkpoint == converted timm model == converted torchvision model."""
    path, encoder = files[name]
    expected = of.features(encoder, X)

    conv = convert.to_canonical(path)
    out = tmp_path / "model.safetensors"
    convert.save_timm(conv, out)
    model = _timm_model("resnet50", num_classes=0)
    model.load_state_dict(load_file(str(out)), strict=True, assign=True)
    torch.testing.assert_close(of.features(model, X), expected, rtol=1e-4, atol=1e-5)

    tv_out = tmp_path / "resnet50_tv.pth"
    convert.save_torchvision(conv, tv_out)
    tv = _tv_resnet("resnet50")
    tv.load_state_dict(torch.load(tv_out, weights_only=True), strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(tv(X), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["v1_r18", "ours_r18", "ours_e2e_r18"])
def test_small_resnet_features_match(files, tmp_path, name):
    path, encoder = files[name]
    out = tmp_path / "model.safetensors"
    convert.convert_file(path, "timm", out)
    model = _timm_model("resnet18", num_classes=0)
    model.load_state_dict(load_file(str(out)), strict=True, assign=True)
    torch.testing.assert_close(of.features(model, X), of.features(encoder, X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,classes", [("lincls_r18", 10), ("probe_r18", 8)])
def test_classifier_checkpoints_convert_to_classifiers(files, tmp_path, name, classes):
    path, ref = files[name]
    with torch.no_grad():
        logits = ref(X)
    out = tmp_path / "model.safetensors"
    convert.convert_file(path, "timm", out)
    model = _timm_model("resnet18", num_classes=classes)
    model.load_state_dict(load_file(str(out)), strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(model(X), logits, rtol=1e-4, atol=1e-5)
    tv_out = tmp_path / "tv.pth"
    convert.convert_file(path, "torchvision", tv_out)
    tv = _tv_resnet("resnet18", classes)
    tv.load_state_dict(torch.load(tv_out, weights_only=True), strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(tv(X), logits, rtol=1e-4, atol=1e-5)


def test_official_v3_vit_converts(tmp_path):
    ckpt, encoder = of.official_v3("vit_tiny_patch16_224", seed=7, img_size=32)
    path = tmp_path / "vit-t.pth.tar"
    torch.save(ckpt, path)
    conv = convert.to_canonical(path)
    assert conv.source_format == convert.FORMAT_OFFICIAL_V3 and conv.family == "vit"
    assert not any(k.startswith("head") for k in conv.state_dict)
    out = tmp_path / "model.safetensors"
    convert.save_timm(conv, out)
    model = _timm_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    model.load_state_dict(load_file(str(out)), strict=True, assign=True)
    torch.testing.assert_close(of.features(model, X[:, :, :32, :32]), of.features(encoder.eval(), X[:, :, :32, :32]))
    with pytest.raises(CheckpointError, match="ResNet"):
        convert.save_detectron2(conv, tmp_path / "x.pkl")


def test_official_v3_vit_lincls_is_classifier(tmp_path):
    ckpt, model = of.official_lincls("vit_tiny_patch16_224", seed=8, num_classes=5, img_size=32)
    path = tmp_path / "linear-vit.pth.tar"
    torch.save(ckpt, path)
    conv = convert.to_canonical(path)
    assert conv.source_format == convert.FORMAT_CLASSIFIER and conv.num_classes == 5 and conv.head_name == "head"
    sd = conv.full_state_dict()
    assert set(sd) == set(model.state_dict())


def test_safetensors_roundtrip_keeps_metadata(files, tmp_path):
    path, _ = files["probe_r18"]
    out = tmp_path / "model.safetensors"
    convert.convert_file(path, "timm", out)
    again = convert.to_canonical(out)
    assert again.source_format == convert.FORMAT_CLASSIFIER
    assert again.arch == "resnet18" and again.num_classes == 8 and again.class_names[0] == "class0"


def test_timm_and_detectron2_files_are_byte_reproducible(files, tmp_path):
    """Same weights -> same bytes (stable sha256 in model cards, no spurious Hub commits on republish)."""
    import json

    path, _ = files["probe_r18"]
    for to in ("timm", "detectron2"):
        a, b = tmp_path / f"a.{to}", tmp_path / f"b.{to}"
        convert.convert_file(path, to, a)
        convert.convert_file(path, to, b)
        assert a.read_bytes() == b.read_bytes(), to
    # the rewritten safetensors header is still a valid header: 8-byte length, JSON, 8-byte aligned
    raw = (tmp_path / "a.timm").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and list(json.loads(raw[8:8 + n])) == sorted(json.loads(raw[8:8 + n]))


# ------------------------------------------------------------------------------------------------------- detectron2


def _expected_d2_name(key: str) -> str:
    """The MoCo converter's rules, written independently of moco_zoo.convert (token by token)."""
    parts = key.split(".")
    if parts[0].startswith("layer"):
        parts[0] = f"res{int(parts[0][len('layer'):]) + 1}"
    else:
        parts.insert(0, "stem")
    out, i = [], 0
    while i < len(parts):
        p = parts[i]
        if re.fullmatch(r"bn[123]", p):
            out += [f"conv{p[2]}", "norm"]
        elif p == "downsample":
            out += ["shortcut"] if parts[i + 1] == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(p)
        i += 1
    return ".".join(out)


def test_detectron2_names_follow_moco_rules_for_every_resnet50_key(files, tmp_path):
    path, encoder = files["v2_r50"]
    out = tmp_path / "model.pkl"
    convert.convert_file(path, "detectron2", out)
    with open(out, "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    assert set(obj) == {"model", "__author__", "matching_heuristics"}
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True

    tv_keys = [k for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")]
    expected = {_expected_d2_name(k): k for k in tv_keys}
    assert set(obj["model"]) == set(expected)
    # spot checks of the detectron2 ResNet naming
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv3.norm.bias",
                 "res2.0.shortcut.weight", "res2.0.shortcut.norm.running_mean", "res5.2.conv2.weight"):
        assert name in obj["model"]
    ref = encoder.state_dict()
    for name, key in expected.items():
        arr = obj["model"][name]
        assert type(arr) is np.ndarray and arr.flags.writeable
        np.testing.assert_array_equal(arr, ref[key].numpy())
        assert arr.shape == tuple(ref[key].shape) and arr.dtype == ref[key].numpy().dtype


class _Numpy1Unpickler(pickle.Unpickler):
    """Resolves only names that exist in numpy 1.x *and* 2.x (no numpy._core, no numpy.core)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "array"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("builtins", "bytes"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} would not load under numpy 1.x")
        return super().find_class(module, name)


def test_detectron2_pickle_loads_under_numpy1_and_numpy2(files):
    path, _ = files["v1_r18"]
    data = convert.dumps_detectron2(convert.to_canonical(path))
    protos = [arg for op, arg, _ in pickletools.genops(data) if op.name == "PROTO"]
    assert protos == [4]  # python 3 pickle with native bytes (detectron2 loads it with encoding="latin1")
    # raw array bytes stored once (no latin-1 text blow-up of protocol 2): file ~ size of the weights
    raw = sum(t.numel() * t.element_size() for t in convert.to_canonical(path).state_dict.values())
    assert raw <= len(data) < raw * 1.05 + 65536
    # the restricted unpickler below is the compatibility check: it resolves only names numpy 1.x also has
    obj = _Numpy1Unpickler(io.BytesIO(data), encoding="latin1").load()
    a = obj["model"]["stem.conv1.weight"]
    assert a.shape == (64, 3, 7, 7) and a.dtype == np.float32
    nbt = obj["model"]["stem.conv1.norm.num_batches_tracked"]
    assert nbt.shape == () and nbt.dtype == np.int64 and int(nbt) == 1234


def test_detectron2_loads_in_detectron2(files, tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    path, _ = files["v2_r50"]
    out = tmp_path / "model.pkl"
    convert.convert_file(path, "detectron2", out)
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    DetectionCheckpointer(build_model(cfg)).load(str(out))


# ------------------------------------------------------------------------------------------------------------ errors


def test_unknown_layout_names_the_file(tmp_path):
    path = tmp_path / "weird.pth"
    torch.save({"foo": torch.zeros(3), "bar": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"weird\.pth.*unknown checkpoint layout"):
        convert.to_canonical(path)


def test_truncated_file_names_the_file(files, tmp_path):
    src, _ = files["v1_r18"]
    data = src.read_bytes()
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"truncated\.pth\.tar"):
        convert.to_canonical(path)


def test_full_unpickling_refused_without_allow_pickle(tmp_path):
    ckpt, encoder = of.official_v1v2("v1", "resnet18", seed=9)
    ckpt["args"] = argparse.Namespace(lr=0.03, arch="resnet18")  # like many training scripts' checkpoints
    path = tmp_path / "with_namespace.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"with_namespace\.pth\.tar.*allow_pickle"):
        convert.to_canonical(path)
    conv = convert.to_canonical(path, allow_pickle=True)
    assert conv.arch == "resnet18"


def test_wrong_arch_is_refused(files):
    path, _ = files["v1_r18"]
    with pytest.raises(CheckpointError, match=r"v1_r18\.pth\.tar.*does not match architecture 'resnet50'.*resnet18"):
        convert.to_canonical(path, "resnet50")


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        convert.to_canonical("/nonexistent/ckpt.pth")


def test_torchvision_export_refuses_vit(tmp_path):
    ckpt, _ = of.official_lincls("vit_tiny_patch16_224", seed=8, num_classes=0, img_size=32)
    conv = convert.to_canonical(ckpt)
    with pytest.raises(CheckpointError, match="ResNet"):
        convert.save_torchvision(conv, tmp_path / "x.pth")


def test_md5_verification(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    digest = hub.verify_md5(p, "5d41402a")
    assert digest.startswith("5d41402a")
    with pytest.raises(CheckpointError, match="md5"):
        hub.verify_md5(p, "deadbeef")


# --------------------------------------------------------------------------------------------------------------- CLI


def _run_cli(argv):
    from moco_zoo import zoo_cli

    return zoo_cli.main(argv)


def test_cli_convert_all_formats(files, tmp_path, capsys):
    path, _ = files["ours_r18"]
    for fmt, name in (("timm", "model.safetensors"), ("torchvision", "tv.pth"), ("detectron2", "d2.pkl")):
        assert _run_cli(["convert", str(path), "--to", fmt, "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).is_file()
    assert "moco-pretrain -> detectron2" in capsys.readouterr().out


def test_cli_convert_refuses_pickle_with_clear_error(tmp_path, capsys):
    ckpt, _ = of.official_v1v2("v1", "resnet18", seed=9)
    ckpt["args"] = argparse.Namespace(lr=0.03)
    path = tmp_path / "ns.pth.tar"
    torch.save(ckpt, path)
    assert _run_cli(["convert", str(path), "--to", "timm", "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "ns.pth.tar" in err and "--allow-pickle" in err
    assert _run_cli(["convert", str(path), "--to", "timm", "--out", str(tmp_path / "o.safetensors"),
                     "--allow-pickle"]) == 0


def test_moco_v3_vit_small_keeps_its_12_heads(tmp_path):
    """Asking for timm's vit_small_patch16_224 (6 heads) on a MoCo v3 ViT-S file still yields the 12-head arch."""
    ckpt, _ = of.official_v3("moco_vit_small", seed=30, depth=1)
    # shapes of a 1-block model are checked against the full arch only by name/shape, so pass check=False
    conv = convert.to_canonical(ckpt, "vit_small_patch16_224", check=False)
    assert conv.arch == "moco_vit_small"
    out = tmp_path / "model.safetensors"
    convert.save_timm(conv, out)
    assert convert.to_canonical(out, check=False).arch == "moco_vit_small"
