"""MoCo v3 in the training engine: exact resume, kNN monitor, presets, schedules, optimizer groups, and checkpoints
that ``moco-zoo convert`` / ``moco_zoo.load_backbone`` read like the official v3 files. Tiny models at 32 px on the
48-image ImageFolder (6 steps per epoch), in this process."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moco_zoo.checkpoint import safe_torch_load
from moco_zoo.pretrain.config import make_config, resolve
from moco_zoo.pretrain.engine import lr_factor, momentum_at

# tiny ViT (AdamW) and resnet18 (LARS); small heads
ARCHS = {
    "vit_tiny": dict(arch="vit_tiny", optimizer="adamw", lr=1.5e-3, weight_decay=0.1, temperature=0.2),
    "resnet18": dict(arch="resnet18", optimizer="lars", lr=0.6, weight_decay=1e-6, temperature=1.0),
}


def _cfg(data, out, arch, **kw):
    base = dict(data=str(data), image_size=32, batch_size=8, epochs=2, warmup_epochs=1, dim=32, mlp_dim=64,
                workers=0, output_dir=str(out), progress=False, plots=False, knn_every=0, augment_backend="pil")
    base.update(ARCHS[arch])
    base.update(kw)
    return make_config("cpu-small-v3", **base)


@pytest.fixture(scope="module")
def straight_runs(tiny_imagefolder, tmp_path_factory):
    """Uninterrupted 2-epoch runs (12 steps); resnet18 with the kNN monitor after every epoch."""
    from moco_zoo.pretrain.engine import train

    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed runs (the autouse one-thread fixture is per test, not per module)
    try:
        for arch in ARCHS:
            d = tmp_path_factory.mktemp(f"v3_{arch}") / "run"
            train(_cfg(tiny_imagefolder, d, arch, knn_every=1 if arch == "resnet18" else 0))
            out[arch] = d
    finally:
        torch.set_num_threads(threads)
    return out


def _final(run):
    from moco_zoo.pretrain.engine import list_checkpoints

    return safe_torch_load(list_checkpoints(run / "checkpoints")[0][1])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_interrupted_and_resumed_v3_run_equals_the_straight_run(arch, straight_runs, tiny_imagefolder, tmp_path):
    from moco_zoo.pretrain.engine import train

    out = tmp_path / "run"
    first = train(_cfg(tiny_imagefolder, out, arch, max_steps=5))  # stops mid-epoch 0 of 2, checkpoint at step 5
    assert first["global_step"] == 5
    summary = train(_cfg(tiny_imagefolder, out, arch, resume="auto"))
    assert summary["resumed_from"].endswith("checkpoint_000000005.pth") and summary["global_step"] == 12
    ref, got = _final(straight_runs[arch]), _final(out)
    assert ref["moco_version"] == "v3" and ref["global_step"] == got["global_step"] == 12
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    assert ref["optimizer"]["state"].keys() == got["optimizer"]["state"].keys() and ref["optimizer"]["state"]
    for i, st in ref["optimizer"]["state"].items():
        for name, t in st.items():  # LARS: mu; AdamW: step, exp_avg, exp_avg_sq
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(got["optimizer"]["state"][i][name])), (i, name)
    assert ref["scheduler"] == got["scheduler"]
    assert got["config"]["optimizer"] == ARCHS[arch]["optimizer"]


def test_v3_checkpoint_layout_and_knn_monitor(straight_runs):
    ck = _final(straight_runs["resnet18"])
    sd = ck["state_dict"]
    assert {"base_encoder.conv1.weight", "base_encoder.fc.0.weight", "base_encoder.fc.4.running_var",
            "momentum_encoder.fc.3.weight", "predictor.3.weight"} <= set(sd)
    assert not any(k.startswith(("encoder_q.", "queue")) for k in sd)
    # LARS groups: matrices / kernels adapted and decayed; ndim <= 1 tensors neither
    groups = ck["optimizer"]["param_groups"]
    assert [(g["lars_exclude"], g["weight_decay"]) for g in groups] == [(False, 1e-6), (True, 0.0)]
    recs = [json.loads(line) for line in (straight_runs["resnet18"] / "metrics.jsonl").read_text().splitlines()]
    knn = [r["knn_top1"] for r in recs if r["type"] == "epoch"]
    assert len(knn) == 2 and all(0 <= v <= 100 for v in knn)
    steps = [r for r in recs if r["type"] == "step"]
    assert all(math.isfinite(r["loss"]) and 0.99 <= r["m"] <= 1.0 for r in steps)
    vit = _final(straight_runs["vit_tiny"])["state_dict"]
    assert torch.equal(vit["base_encoder.pos_embed"], vit["momentum_encoder.pos_embed"])  # fixed, never trained


@pytest.mark.parametrize("arch", list(ARCHS))
def test_v3_checkpoint_converts_and_loads_like_the_official_files(arch, straight_runs, tmp_path):
    """``moco-zoo convert`` to timm, then ``load_backbone``: the base encoder's trunk, tensor for tensor."""
    from moco_zoo import load_backbone
    from moco_zoo.cli import main as zoo_main

    from moco_zoo.pretrain.engine import list_checkpoints

    path = list_checkpoints(straight_runs[arch] / "checkpoints")[0][1]
    sd = safe_torch_load(path)["state_dict"]
    trunk = {k[len("base_encoder."):]: v for k, v in sd.items()
             if k.startswith("base_encoder.") and not k.startswith(("base_encoder.fc.", "base_encoder.head."))}
    out = tmp_path / "backbone.safetensors"
    assert zoo_main(["convert", str(path), "--to", "timm", "--out", str(out)]) == 0
    timm_kw = {"img_size": 32} if arch.startswith("vit") else {}
    for source in (out, path):  # the converted file and our checkpoint itself
        model = load_backbone(str(source), **timm_kw)
        got = model.state_dict()
        assert set(got) == set(trunk), set(got) ^ set(trunk)
        for k, v in trunk.items():
            assert torch.equal(got[k], v), k
    if arch.startswith("vit"):
        assert model.blocks[0].attn.num_heads == 3  # timm's vit_tiny_patch16_224


def test_v3_presets_follow_the_paper():
    r50, vs, vb = make_config("paper-v3-r50"), make_config("paper-v3-vit-small"), make_config("paper-v3-vit-base")
    assert (r50.arch, r50.optimizer, r50.lr, r50.weight_decay, r50.epochs, r50.warmup_epochs) == \
        ("resnet50", "lars", 0.6, 1e-6, 100, 10)
    assert (r50.temperature, r50.crop_min, r50.dim, r50.mlp_dim, r50.batch_size) == (1.0, 0.2, 256, 4096, 4096)
    assert (vs.arch, vs.optimizer, vs.lr, vs.weight_decay, vs.epochs, vs.warmup_epochs) == \
        ("vit_small", "adamw", 1.5e-4, 0.1, 300, 40)
    assert (vs.temperature, vs.crop_min, vs.stop_grad_patch, vb.arch) == (0.2, 0.08, True, "vit_base")
    for c in (r50, vs, vb):
        assert (c.moco_version, c.aug, c.momentum, c.momentum_schedule) == ("v3", "v3", 0.99, "cosine")
        assert (c.lr_scaling, c.lr_schedule) == ("linear", "warmup_cosine")
    # --moco-version v3 picks the preset of the architecture family
    assert resolve(None, None, {"moco_version": "v3", "arch": "vit_base"}).optimizer == "adamw"
    assert resolve(None, None, {"moco_version": "v3", "arch": "resnet50"}).optimizer == "lars"
    with pytest.raises(ValueError, match="optimizer"):
        make_config("paper-v2", optimizer="lars")


def test_v3_lr_and_momentum_schedules_are_moco_v3s():
    cfg = make_config("paper-v3-r50", epochs=100, warmup_epochs=10)
    spe = 50
    for step in (0, 7, 499, 500, 501, 2600, 4999):
        e = step / spe  # moco-v3 adjust_learning_rate(epoch + i / iters_per_epoch)
        want = e / 10 if e < 10 else 0.5 * (1 + math.cos(math.pi * (e - 10) / 90))
        assert lr_factor(step, spe, cfg) == pytest.approx(want, abs=1e-12)
        m = 1 - 0.5 * (1 + math.cos(math.pi * e / 100)) * (1 - 0.99)  # adjust_moco_momentum
        assert momentum_at(step, spe * 100, cfg) == pytest.approx(m, abs=1e-12)


def test_v3_linear_recipe_and_a_vit_class_token_probe(straight_runs, tiny_imagefolder, tmp_path):
    """moco-v3's linear recipe (SGD 0.9, batch 1024, 90 epochs, wd 0, cosine, base lr 0.1 ResNet / 3 ViT x batch/256)
    and a linear probe on the class token of the ViT we pretrained."""
    from moco_zoo.pretrain.lincls import (base_lr, build_parser, config_from_args, initial_lr, lincls_config,
                                          lr_factor, run_linear_probe)

    cfg = lincls_config("moco-v3")
    assert (cfg.epochs, cfg.batch_size, cfg.weight_decay, cfg.momentum, cfg.lr_schedule) == \
        (90, 1024, 0.0, 0.9, "cosine")
    assert base_lr(cfg, "head") == 3.0 and base_lr(cfg, "fc") == 0.1 and initial_lr(cfg, "head", 1024) == 12.0
    assert [lr_factor(e, cfg) for e in (0, 45)] == [1.0, pytest.approx(0.5)]
    args = build_parser().parse_args(["d", "--pretrained", "x", "--recipe", "moco-v3", "--lr", "0.5"])
    assert (config_from_args(args).lr, config_from_args(args).epochs) == (0.5, 90)
    v12 = config_from_args(build_parser().parse_args(["d", "--pretrained", "x"]))
    assert (v12.lr, v12.epochs, v12.lr_schedule, v12.lr_steps) == (30.0, 100, "step", [60, 80])

    from moco_zoo.pretrain.engine import list_checkpoints

    ckpt = list_checkpoints(straight_runs["vit_tiny"] / "checkpoints")[0][1]
    run = lincls_config("moco-v3", data=str(tiny_imagefolder), pretrained=str(ckpt), epochs=1, batch_size=16,
                        image_size=32, workers=0, output_dir=str(tmp_path / "lin"), progress=False, knn=False)
    result = run_linear_probe(run)
    assert result["arch"] == "vit_tiny_patch16_224" and result["sanity_check"] == "passed"
    ck = safe_torch_load(tmp_path / "lin" / "checkpoint.pth")
    assert ck["state_dict"]["head.weight"].shape == (result["num_classes"], 192)
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(3.0 * 16 / 256)
    pre = safe_torch_load(ckpt)["state_dict"]
    assert torch.equal(ck["state_dict"]["blocks.0.attn.qkv.weight"], pre["base_encoder.blocks.0.attn.qkv.weight"])
