"""A real 2-process torchrun job (gloo on CPU): every rank ends with the same queue and the same encoders."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moco_zoo.checkpoint import safe_torch_load
from moco_zoo.pretrain.engine import list_checkpoints

from .conftest import REPO, tiny_args

# Runs main_moco.py under torchrun; when training ends every rank saves its dictionary and both encoders.
DRIVER = textwrap.dedent('''
    import os, runpy, sys
    from pathlib import Path
    import torch
    from moco_zoo.pretrain import engine

    _fit = engine.Trainer.fit

    def fit(self):
        summary = _fit(self)
        sd = self.model.state_dict()
        keep = {k: v.detach().cpu().clone() for k, v in sd.items()
                if k.startswith(("encoder_q.", "encoder_k.", "base_encoder.", "momentum_encoder.", "predictor."))
                or k in ("queue", "queue_ptr", "memory_bank")}
        torch.save(keep, Path(os.environ["DUMP_DIR"]) / f"rank{self.rank}.pt")
        return summary

    engine.Trainer.fit = fit
    sys.argv = [os.environ["MAIN_MOCO"], *sys.argv[1:]]
    runpy.run_path(os.environ["MAIN_MOCO"], run_name="__main__")
''')


def _torchrun_two_ranks(tmp_path, args):
    """``main_moco.py args`` under torchrun with 2 gloo ranks; the state each rank dumped at the end."""
    dump = tmp_path / "dump"
    dump.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DUMP_DIR=str(dump),
               MAIN_MOCO=str(REPO / "pretrain" / "main_moco.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return safe_torch_load(dump / "rank0.pt"), safe_torch_load(dump / "rank1.pt")


@pytest.mark.ddp
@pytest.mark.parametrize("mechanism", ["moco", pytest.param("memory_bank", marks=pytest.mark.slow),
                                       pytest.param("end2end", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_keep_identical_queues_and_key_encoders(tiny_imagefolder, tmp_path, mechanism):
    out = tmp_path / "run"
    # global batch 8 = 2 ranks x 4; K=20 is not a multiple of 8: the queue wraps around.
    args = tiny_args(tiny_imagefolder, out, "--moco-k", "20", "--mechanism", mechanism,
                     "--shuffle-bn", "ddp" if mechanism == "moco" else "auto", "--set", "max_steps=3")
    r0, r1 = _torchrun_two_ranks(tmp_path, args)
    assert r0.keys() == r1.keys()
    if mechanism == "moco":
        assert int(r0["queue_ptr"]) == (3 * 8) % 20  # the paper's random initial queue, then 3 steps of 8 keys
        assert torch.equal(r0["queue"], r1["queue"])
    if mechanism == "memory_bank":
        assert torch.equal(r0["memory_bank"], r1["memory_bank"])
    k_params = [k for k in r0 if k.startswith("encoder_k.") and "running" not in k and "num_batches" not in k]
    assert bool(k_params) == (mechanism == "moco")
    q_params = [k for k in r0 if k.startswith("encoder_q.") and "running" not in k and "num_batches" not in k]
    for k in k_params + q_params:
        assert torch.equal(r0[k], r1[k]), k
    ck = safe_torch_load(list_checkpoints(out / "checkpoints")[0][1])
    assert ck["global_step"] == 3 and ck["rng"]["world_size"] == 2 and len(ck["rng"]["per_rank"]) == 2
    if mechanism == "moco":
        assert torch.equal(ck["state_dict"]["queue"], r0["queue"])
    assert not any(k.startswith("module.") for k in ck["state_dict"])


@pytest.mark.ddp
@pytest.mark.slow  # ~25 s: two interpreters, resnet18 through both v3 encoders
def test_torchrun_v3_two_ranks_stay_identical_with_synchronised_bn(tiny_imagefolder, tmp_path):
    """MoCo v3 under torchrun (gloo): keys gathered over ranks, BN synchronised (AllReduceBatchNorm on CPU), so every
    parameter and every BN running statistic of both encoders and the predictor is the same on both ranks."""
    out = tmp_path / "run"
    args = tiny_args(tiny_imagefolder, out, "--moco-version", "v3", "--moco-mlp-dim", "64",
                     "--moco-dim", "32", "--set", "max_steps=3", "warmup_epochs=1")
    r0, r1 = _torchrun_two_ranks(tmp_path, args)
    assert r0.keys() == r1.keys() and any(k.startswith("momentum_encoder.fc.") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ck = safe_torch_load(list_checkpoints(out / "checkpoints")[0][1])
    assert ck["moco_version"] == "v3" and ck["global_step"] == 3 and ck["config"]["optimizer"] == "lars"
    sd = ck["state_dict"]
    assert not torch.equal(sd["base_encoder.fc.0.weight"], sd["momentum_encoder.fc.0.weight"])
