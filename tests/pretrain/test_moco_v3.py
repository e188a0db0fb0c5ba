"""MoCo v3 (arXiv:2104.02057): the module against the written-out formulas of the paper, the schedules, LARS, the
ViT adjustments and the loss over two ranks (gloo).

The same step was also run against facebookresearch/moco-v3's moco/builder.py (commit c349e6e) outside the repository
with identical weights and inputs; the measured differences are in pretrain/README.md.
"""
from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
import torch.nn as nn

from moco_zoo.pretrain.builder_v3 import (AllReduceBatchNorm, MoCoV3, build_mlp, moco_momentum,
                                          sincos_pos_embed_2d)
from moco_zoo.pretrain.optim import LARS, lars_param_groups, make_v3_optimizer


def _tiny_vit(**kw) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3.from_arch("vit_tiny", dim=16, mlp_dim=32, T=0.2, image_size=32, **kw)


def _tiny_resnet() -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3.from_arch("resnet18", dim=16, mlp_dim=32, T=1.0)


def _written_out_loss(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    """2T * mean_i -log( exp(<q_i, k_i>/T) / sum_j exp(<q_i, k_j>/T) ) with unit-norm rows, computed elementwise."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(q.shape[0]):
        s = torch.stack([(qn[i] * kn[j]).sum() / T for j in range(k.shape[0])])
        total = total + (torch.log(torch.exp(s).sum()) - s[i])
    return 2 * T * total / q.shape[0]


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_resnet], ids=["vit", "resnet"])
def test_loss_gradients_and_momentum_update_equal_the_written_out_step(make):
    model = make()
    model.train()
    with torch.no_grad():  # a momentum encoder that differs from the base encoder, as after some training
        for p in model.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model)  # the formula's copy of every weight
    x1, x2, m = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), 0.9

    loss = model(x1, x2, m)
    loss.backward()

    # theta_k <- m theta_k + (1 - m) theta_q, parameters only (BN buffers stay the momentum encoder's own)
    with torch.no_grad():
        for pk, pq in zip(ref.momentum_encoder.parameters(), ref.base_encoder.parameters()):
            pk.copy_(m * pk + (1 - m) * pq)
    q1, q2 = ref.predictor(ref.base_encoder(x1)), ref.predictor(ref.base_encoder(x2))
    with torch.no_grad():
        k1, k2 = ref.momentum_encoder(x1), ref.momentum_encoder(x2)
    expected = _written_out_loss(q1, k2, ref.T) + _written_out_loss(q2, k1, ref.T)
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            scale = max(1.0, p_ref.grad.abs().max().item())  # fp32 rounding grows with the gradient's size
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for a, b in zip(model.momentum_encoder.parameters(), ref.momentum_encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    # the momentum encoder's BN statistics come from its own forward passes, not from the base encoder
    bn_k = [b for n, b in model.momentum_encoder.named_buffers() if n.endswith("running_mean")]
    bn_q = [b for n, b in model.base_encoder.named_buffers() if n.endswith("running_mean")]
    assert any(not torch.equal(a, b) for a, b in zip(bn_k, bn_q))


def test_heads_follow_the_papers_design_and_the_official_key_layout():
    vit, res = _tiny_vit(), _tiny_resnet()
    lin = lambda s: [type(x).__name__ for x in s]  # noqa: E731
    assert lin(res.base_encoder.fc) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert lin(vit.base_encoder.head) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert lin(res.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]  # no output BN (ResNet)
    assert lin(vit.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not res.base_encoder.fc[4].affine and res.base_encoder.fc[1].affine
    assert all(not m.bias is not None for m in res.base_encoder.fc if isinstance(m, nn.Linear))
    assert res.base_encoder.fc[0].in_features == 512 and vit.base_encoder.head[0].in_features == 192
    assert vit.base_encoder.head[3].weight.shape == (32, 32) and vit.base_encoder.head[6].weight.shape == (16, 32)
    keys = set(vit.state_dict())
    assert {"base_encoder.head.0.weight", "momentum_encoder.head.6.weight", "predictor.3.weight",
            "base_encoder.pos_embed", "momentum_encoder.cls_token"} <= keys
    assert {"base_encoder.fc.0.weight", "momentum_encoder.fc.3.weight", "base_encoder.conv1.weight"} <= \
        set(res.state_dict())
    assert not any(p.requires_grad for p in vit.momentum_encoder.parameters())
    sizes = build_mlp(2, 8, 4096, 256)
    assert sizes[0].weight.shape == (4096, 8) and sizes[3].weight.shape == (256, 4096)


def test_momentum_schedule_is_a_half_cycle_cosine_from_m_to_one():
    total = 1000
    assert moco_momentum(0, total, 0.99) == pytest.approx(0.99)
    assert moco_momentum(total // 2, total, 0.99) == pytest.approx(0.995)
    assert moco_momentum(total, total, 0.99) == pytest.approx(1.0)
    for step in (1, 137, 750):  # 1 - (1 - m) (1 + cos(pi t / T)) / 2
        assert moco_momentum(step, total, 0.996) == pytest.approx(
            1 - 0.004 * (1 + math.cos(math.pi * step / total)) / 2, abs=1e-12)
    values = [moco_momentum(s, total) for s in range(0, total + 1, 50)]
    assert values == sorted(values)


def test_frozen_patch_projection_gets_no_gradient_and_never_moves():
    model = _tiny_vit()
    proj = model.base_encoder.patch_embed.proj
    before = proj.weight.detach().clone()
    opt = make_v3_optimizer(model, "adamw", 1e-2, 0.1)
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    assert all(p is not proj.weight for g in opt.param_groups for p in g["params"])
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.99).backward()
    opt.step()
    assert proj.weight.grad is None and model.base_encoder.pos_embed.grad is None
    assert torch.equal(proj.weight, before)
    assert model.base_encoder.blocks[0].attn.qkv.weight.grad is not None  # the rest trains
    # the learnable patch projection when the stability fix is off
    assert _tiny_vit(stop_grad_patch=False).base_encoder.patch_embed.proj.weight.requires_grad


def test_sincos_position_embedding_is_fixed_and_matches_the_formula():
    model = _tiny_vit()
    pe = model.base_encoder.pos_embed
    assert not pe.requires_grad and pe.shape == (1, 1 + 4, 192)
    d4 = 192 // 4
    grid = 2  # 32 px / patch 16
    for t in range(grid * grid):
        r, c = divmod(t, grid)  # token t = patch in row r, column c
        for j in (0, 1, d4 // 2, d4 - 1):
            w = 10000.0 ** (-j / d4)
            got = pe[0, 1 + t]
            assert got[j].item() == pytest.approx(math.sin(r * w), abs=1e-6)
            assert got[d4 + j].item() == pytest.approx(math.cos(r * w), abs=1e-6)
            assert got[2 * d4 + j].item() == pytest.approx(math.sin(c * w), abs=1e-6)
            assert got[3 * d4 + j].item() == pytest.approx(math.cos(c * w), abs=1e-6)
    assert torch.equal(pe[0, 0], torch.zeros(192))  # class token
    assert torch.equal(sincos_pos_embed_2d((14, 14), 384), sincos_pos_embed_2d((14, 14), 384))
    assert sincos_pos_embed_2d((14, 14), 384).shape == (1, 197, 384)


def test_lars_step_equals_the_written_out_update_and_skips_biases_and_norms():
    torch.manual_seed(0)
    lin, bn = nn.Linear(5, 4), nn.BatchNorm1d(4)
    model = nn.Sequential(lin, bn)
    groups = lars_param_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]  # weight | bias, gamma, beta
    opt = LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=0.001)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    mu_w, mu_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).sum().backward()
        g_w, g_b = lin.weight.grad.clone(), lin.bias.grad.clone()
        opt.step()
        u = g_w + 0.1 * w0
        u = u * (0.001 * w0.norm() / u.norm())
        mu_w = 0.9 * mu_w + u
        w0 = w0 - 0.5 * mu_w
        mu_b = 0.9 * mu_b + g_b  # no decay, no trust ratio
        b0 = b0 - 0.5 * mu_b
        torch.testing.assert_close(lin.weight.detach(), w0)
        torch.testing.assert_close(lin.bias.detach(), b0)


# ------------------------------------------------------------------------------------------ two ranks (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, state, x1, x2, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = AllReduceBatchNorm.convert(_tiny_vit())
        model.load_state_dict(state)
        n = x1.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        loss = model(x1[sl], x2[sl], 0.9)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        for g in grads:  # what DDP does: average over ranks
            dist.all_reduce(g)
            g /= world
        lsum = loss.detach().clone()
        dist.all_reduce(lsum)
        if rank == 0:
            torch.save({"loss": lsum / world, "grads": grads,
                        "momentum": [p.detach().clone() for p in model.momentum_encoder.parameters()]},
                       os.path.join(out_dir, "ranks.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~17 s: two spawned interpreters
def test_two_ranks_compute_the_loss_and_gradients_of_the_global_batch(tmp_path):
    """Keys gathered over ranks, positives at rank * N + i, synced BN in the heads: two ranks with N images each
    give the loss and (DDP-averaged) gradients of one process with the 2N images."""
    import torch.multiprocessing as mp

    model = _tiny_vit()
    state = copy.deepcopy(model.state_dict())
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    mp.start_processes(_rank_main, args=(2, _free_port(), state, x1, x2, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = torch.load(tmp_path / "ranks.pt", weights_only=True)
    loss = model(x1, x2, 0.9)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(got["grads"])
    for a, b in zip(got["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(got["momentum"], model.momentum_encoder.parameters()):
        torch.testing.assert_close(a, b)
