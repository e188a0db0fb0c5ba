"""Training loop: checkpoint contents, exact resume after SIGKILL, corrupt-checkpoint skipping, schedules, presets,
CLI errors. Subprocess runs use resnet18 at 32 px on a 48-image ImageFolder (6 steps per epoch)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from moco_zoo.checkpoint import CheckpointError, safe_torch_load
from moco_zoo.pretrain.config import build_parser, config_from_args, make_config
from moco_zoo.pretrain.engine import find_resume_checkpoint, list_checkpoints, lr_factor, momentum_at, scaled_lr

from .conftest import REPO, run_script, tiny_args


def _run_args(data, out):
    return tiny_args(data, out, "-j", "2", "--set", "save_every_steps=2", "knn_every=1", "plots=true",
                     "keep_checkpoints=3")


@pytest.fixture(scope="module")
def killed_run(tiny_imagefolder, tmp_path_factory):
    """A subprocess run SIGKILLed from outside as soon as its step-8 checkpoint exists (mid-epoch 2), like a
    preempted job. Started first so that it overlaps with the in-process reference run."""
    import time

    out = tmp_path_factory.mktemp("killed") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain" / "main_moco.py"), *_run_args(tiny_imagefolder, out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = out / "checkpoints" / "checkpoint_000000008.pth"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    yield out, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def reference_run(tiny_imagefolder, tmp_path_factory, killed_run):
    """An uninterrupted 2-epoch run (12 steps), in this process (same code path, one thread, 2 workers)."""
    import torch as _torch

    from moco_zoo.pretrain.engine import train

    out = tmp_path_factory.mktemp("ref") / "run"
    threads = _torch.get_num_threads()
    _torch.set_num_threads(1)
    try:
        train(config_from_args(build_parser().parse_args(_run_args(tiny_imagefolder, out))))
    finally:
        _torch.set_num_threads(threads)
    return out


def test_checkpoint_follows_the_contract(reference_run):
    ckpts = list_checkpoints(reference_run / "checkpoints")
    assert [s for s, _ in ckpts] == [12, 10, 8]  # newest first, older ones pruned
    ck = safe_torch_load(ckpts[0][1])  # weights_only=True
    assert ck["kind"] == "moco-pretrain" and ck["format_version"] == 1
    assert ck["arch"] == "resnet18" and ck["moco_version"] == "v2" and ck["mechanism"] == "moco"
    assert ck["epoch"] == 2 and ck["step_in_epoch"] == 0 and ck["global_step"] == 12
    sd = ck["state_dict"]
    assert not any(k.startswith("module.") for k in sd)
    assert {"encoder_q.conv1.weight", "encoder_q.fc.0.weight", "encoder_q.fc.2.weight", "encoder_k.fc.2.bias",
            "encoder_q.layer4.1.bn2.running_var", "queue", "queue_ptr"} <= set(sd)
    assert sd["queue"].shape == (128, 40) and int(sd["queue_ptr"]) == (12 * 8) % 40
    assert ck["config"]["temperature"] == 0.2 and ck["config"]["mlp"] is True
    assert len(ck["rng"]["per_rank"]) == 1 and {"torch", "numpy", "python"} <= set(ck["rng"]["per_rank"][0])
    assert ck["optimizer"]["state"] and ck["scheduler"]["last_epoch"] == 12
    recs = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= r["knn_top1"] <= 100 for r in epochs)
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in recs if r["type"] == "step")
    assert (reference_run / "loss.png").stat().st_size > 1000 and (reference_run / "knn.png").exists()
    assert json.loads((reference_run / "config.json").read_text())["batch_size"] == 8


def test_tensorboard_events_hold_the_metrics_log(reference_run):
    """The TensorBoard scalars (read back with tensorboard's own reader) are the metrics.jsonl values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tb"))
    acc.Reload()
    recs = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == [r["global_step"] for r in steps]
    for r in steps:
        assert loss[r["global_step"]] == pytest.approx(r["loss"], rel=1e-6)
    knn = {e.step: e.value for e in acc.Scalars("eval/knn_top1")}
    assert knn == {r["global_step"]: pytest.approx(r["knn_top1"], rel=1e-6) for r in recs if r["type"] == "epoch"}


def test_resume_after_sigkill_is_bit_identical(reference_run, killed_run, tiny_imagefolder):
    out, proc = killed_run
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]  # killed without any cleanup
    latest = [s for s, _ in list_checkpoints(out / "checkpoints")][0]
    assert 8 <= latest < 12
    args = _run_args(tiny_imagefolder, out)
    resumed = run_script("main_moco.py", args + ["--resume", "auto"])
    assert "resumed from" in resumed.stderr and f"checkpoint_{latest:09d}.pth" in resumed.stderr
    ref = safe_torch_load(list_checkpoints(reference_run / "checkpoints")[0][1])
    got = safe_torch_load(list_checkpoints(out / "checkpoints")[0][1])
    assert got["global_step"] == ref["global_step"] == 12
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    for i, st in ref["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], got["optimizer"]["state"][i]["momentum_buffer"])
    assert torch.equal(ref["rng"]["per_rank"][0]["torch"], got["rng"]["per_rank"][0]["torch"])
    # the metrics log holds each step once
    steps = [json.loads(line)["global_step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert len(steps) == len(set(steps))


def test_resume_auto_skips_corrupt_checkpoints(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "checkpoints" / "checkpoint_000000099.pth").write_bytes(b"truncated garbage")
    torch.save({"kind": "linear-probe"}, out / "checkpoints" / "checkpoint_000000098.pth")
    cfg = make_config(arch="resnet18", output_dir=str(out), resume="auto")
    with pytest.warns(UserWarning) as rec:
        path, ck = find_resume_checkpoint(cfg)
    assert path.name == "checkpoint_000000012.pth" and ck["global_step"] == 12
    messages = " ".join(str(w.message) for w in rec)
    assert "checkpoint_000000099.pth" in messages and "checkpoint_000000098.pth" in messages
    with pytest.raises(CheckpointError, match="expected 'moco-pretrain'"):
        find_resume_checkpoint(make_config(arch="resnet18", resume=str(out / "checkpoints" /
                                                                       "checkpoint_000000098.pth")))


def test_schedules():
    cfg = make_config(moco_version="v1", epochs=100, lr_steps=[120, 160])
    assert cfg.lr_schedule == "step"
    assert lr_factor(0, 10, cfg) == 1.0
    assert lr_factor(599, 10, cfg) == 1.0 and lr_factor(600, 10, cfg) == pytest.approx(0.1)  # 120/200 of 100
    assert lr_factor(800, 10, cfg) == pytest.approx(0.01)
    cos = make_config(moco_version="v2", epochs=10, warmup_epochs=1)
    assert lr_factor(0, 10, cos) == pytest.approx(0.1) and lr_factor(9, 10, cos) == pytest.approx(1.0)
    assert lr_factor(50, 10, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    mc = make_config(momentum_schedule="cosine", momentum=0.99)
    assert momentum_at(0, 100, mc) == pytest.approx(0.99) and momentum_at(100, 100, mc) == pytest.approx(1.0)
    assert momentum_at(37, 100, make_config(momentum=0.999)) == 0.999
    assert scaled_lr(make_config(batch_size=512, lr=0.03)) == pytest.approx(0.03)  # the original: lr as given
    assert scaled_lr(make_config(batch_size=512, lr=0.03, lr_scaling="linear")) == pytest.approx(0.06)


def test_presets_and_overrides():
    p = build_parser()
    v1 = config_from_args(p.parse_args(["DATA", "--moco-version", "v1"]))
    assert (v1.temperature, v1.mlp, v1.aug, v1.lr_schedule) == (0.07, False, "v1", "step") and v1.data == "DATA"
    v2 = config_from_args(p.parse_args(["synthetic", "--moco-version", "v2", "--moco-t", "0.1",
                                        "--no-mlp", "-b", "64", "--set", "lr_steps=[10,20]"]))
    assert (v2.temperature, v2.mlp, v2.aug, v2.lr_schedule) == (0.1, False, "v2", "cosine")
    assert v2.lr_steps == [10, 20] and v2.batch_size == 64 and v2.data == "synthetic"
    with pytest.raises(ValueError, match="mechanism"):
        make_config(mechanism="simclr")
    assert make_config().dict_init == "random"
    assert config_from_args(p.parse_args(["DATA", "--set", "dict_init=prefill"])).dict_init == "prefill"
    with pytest.raises(ValueError, match="dict_init"):
        make_config(dict_init="zeros")


def test_every_config_key_is_a_flag_or_documented_in_help():
    """main_moco.py keeps the original's flags (+ the paper's mechanisms); every other key is listed in --help."""
    from moco_zoo.pretrain.config import _FLAGS, _KEYS_WITHOUT_FLAG, MocoConfig

    flagged = {name for _, name, _, _ in _FLAGS}
    listed = {key for key, _, _ in _KEYS_WITHOUT_FLAG}
    assert not flagged & listed
    assert flagged | listed | {"data"} == {f.name for f in dataclasses.fields(MocoConfig)}
    text = build_parser().format_help()
    assert all(key in text for key in listed) and "--max-steps" not in text
    assert len(flagged) <= 25  # the original main_moco.py has 25 flags, six of them DDP plumbing


def test_paper_presets_are_the_papers_and_small_data_aids_are_named(tmp_path):
    """paper-v1/v2 = the original main_moco.py defaults (+ --mlp --moco-t 0.2 --aug-plus --cos for v2)."""
    from moco_zoo.pretrain.config import ConfigError, preset_names

    v2 = make_config()
    assert (v2.arch, v2.dim, v2.moco_k, v2.momentum, v2.temperature, v2.mlp, v2.aug) == \
        ("resnet50", 128, 65536, 0.999, 0.2, True, "v2")
    assert (v2.lr, v2.batch_size, v2.epochs, v2.weight_decay, v2.sgd_momentum, v2.lr_schedule) == \
        (0.03, 256, 200, 1e-4, 0.9, "cosine")
    assert (v2.dict_init, v2.shuffle_bn, v2.lr_scaling, v2.image_size) == ("random", "auto", "none", 224)
    v1 = make_config(moco_version="v1")
    assert (v1.mlp, v1.temperature, v1.aug, v1.lr_schedule, v1.lr_steps) == (False, 0.07, "v1", "step", [120, 160])
    small = make_config("cpu-small")
    assert (small.moco_k, small.momentum, small.dict_init, small.shuffle_bn) == (256, 0.99, "prefill", "split")
    assert {"paper-v1", "paper-v2", "cpu-small"} <= set(preset_names())
    p = build_parser()
    f = tmp_path / "mine.yaml"
    f.write_text("epochs: 7\nknn_every: 3\n")
    cfg = config_from_args(p.parse_args(["DATA", "--preset", "cpu-small", "--config-file", str(f), "--epochs", "9",
                                         "--set", "knn_every=4", "lr_steps=[3,6]"]))
    assert (cfg.epochs, cfg.knn_every, cfg.lr_steps, cfg.moco_k) == (9, 4, [3, 6], 256)
    with pytest.raises(ConfigError, match="mine.yaml: unknown config key 'epocs'"):
        f.write_text("epocs: 7\n")
        config_from_args(p.parse_args(["DATA", "--config-file", str(f)]))
    with pytest.raises(ConfigError, match="config key 'epochs': Value 'many'"):
        make_config(epochs="many")


def test_cli_errors_are_clear(tmp_path, tiny_imagefolder, capsys):
    from moco_zoo.pretrain.cli import main_moco as main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--arch", "resnet18", "--output-dir", str(tmp_path / "o"), "-j", "0"]) == 2
    assert "no class sub-directories" in capsys.readouterr().err
    assert main(tiny_args(tiny_imagefolder, tmp_path / "o2", "--arch", "resnet_nope")) == 2
    assert "unknown architecture 'resnet_nope'" in capsys.readouterr().err
    assert main(tiny_args(tiny_imagefolder, tmp_path / "o3", "--mechanism", "memory_bank", "--moco-k", "4096")) == 2
    err = capsys.readouterr().err
    assert "K=4096" in err and "(48)" in err


def test_in_process_training_of_each_mechanism(tiny_imagefolder, tmp_path, monkeypatch):
    """end2end with bf16 autocast + channels_last; memory_bank on ``--data synthetic`` (generated into the cache)."""
    from moco_zoo.pretrain.engine import train

    monkeypatch.setenv("MOCO_ZOO_DATA", str(tmp_path / "cache"))
    for mech, data, extra in (("end2end", str(tiny_imagefolder), {"precision": "bf16", "channels_last": True}),
                              ("memory_bank", "synthetic", {"synthetic_images": 48, "synthetic_size": 32})):
        cfg = make_config(data=data, arch="resnet18", image_size=32, batch_size=8, moco_k=16, epochs=1,
                          max_steps=2, workers=0, mechanism=mech, output_dir=str(tmp_path / mech),
                          progress=False, plots=False, knn_every=0, **extra)
        summary = train(cfg)
        assert summary["global_step"] == 2
        ck = safe_torch_load(summary["checkpoint"])
        assert ck["mechanism"] == mech
        assert ("memory_bank" in ck["state_dict"]) == (mech == "memory_bank")
        assert not any(k.startswith("encoder_k.") for k in ck["state_dict"])
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert any((tmp_path / "cache").rglob("*.jpg"))  # --data synthetic went through moco_zoo.data.ensure_dataset
