"""The MoCo module: loss, queue, momentum update, gradients, heads, mechanisms (arXiv:1911.05722, 2003.04297)."""
from __future__ import annotations

import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from moco_zoo.pretrain.builder import MoCo, infonce_logits
from moco_zoo.pretrain.heads import UnknownArchError, build_encoder


@pytest.fixture(scope="module")
def moco_small() -> MoCo:
    torch.manual_seed(0)
    return MoCo("resnet18", dim=4, K=10, m=0.9, T=0.2, mlp=True, shuffle_bn="split", shuffle_groups=2)


def test_loss_equals_written_out_log_softmax():
    g = torch.Generator().manual_seed(0)
    n, c, k, t = 5, 8, 13, 0.07
    q = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    key = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(c, k, generator=g, dtype=torch.float64), dim=0)
    logits = infonce_logits(q, key, queue, t)
    loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    expected = 0.0
    for i in range(n):  # -log( exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.k_j/T)) ), Eq. (1)
        pos = math.exp(sum(q[i, d].item() * key[i, d].item() for d in range(c)) / t)
        neg = sum(math.exp(sum(q[i, d].item() * queue[d, j].item() for d in range(c)) / t) for j in range(k))
        expected += -math.log(pos / (pos + neg))
    assert logits.shape == (n, 1 + k)
    assert loss.item() == pytest.approx(expected / n, rel=1e-10)


def test_queue_is_fifo_with_wraparound_and_short_batches(moco_small):
    model = moco_small
    K, dim = model.K, model.dim
    model.queue_ptr.zero_()
    reference = deque(maxlen=K)
    initial = [model.queue[:, j].clone() for j in range(K)]
    reference.extend(initial)
    counter = 0
    for n in (3, 4, 3, 7, 1, 2, 13, 5):  # K=10: wraps, short batches, a batch larger than K
        keys = torch.arange(counter, counter + n, dtype=torch.float32).unsqueeze(1).repeat(1, dim)
        counter += n
        model.dequeue_and_enqueue(keys)
        reference.extend(keys)  # deque keeps the newest K, oldest first
        ptr = int(model.queue_ptr)
        assert ptr == counter % K
        oldest_first = torch.roll(model.queue, shifts=-ptr, dims=1).T  # KxC, oldest -> newest
        assert torch.equal(oldest_first, torch.stack(list(reference)))


def test_momentum_update_formula_and_buffers_copied(moco_small):
    model = moco_small
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in model.encoder_q.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    before_k = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    q = dict(model.encoder_q.named_parameters())
    model.m = 0.9
    model.momentum_update_key_encoder()
    for n, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.9 * before_k[n] + 0.1 * q[n], rtol=0, atol=1e-6)
    for (nk, bk), (nq, bq) in zip(model.encoder_k.named_buffers(), model.encoder_q.named_buffers()):
        assert nk == nq and torch.equal(bk, bq)
    model.m = 1.0  # m = 1: the key encoder stays fixed
    frozen = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    model.momentum_update_key_encoder()
    assert all(torch.equal(p, frozen[n]) for n, p in model.encoder_k.named_parameters())


def test_key_encoder_gets_no_gradient(moco_small):
    model = moco_small.train()
    x = torch.randn(4, 3, 32, 32)
    out = model(x, x.flip(3))
    F.cross_entropy(out.logits, out.labels).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert out.keys.requires_grad is False
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mlp,keys", [(False, {"fc.weight", "fc.bias"}),
                                      (True, {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"})])
def test_heads_follow_official_key_layout(mlp, keys):
    enc, feat = build_encoder("resnet18", 128, mlp)
    fc_keys = {k for k in enc.state_dict() if k.startswith("fc.")}
    assert fc_keys == keys and feat == 512
    assert enc.state_dict()["fc.weight" if not mlp else "fc.2.weight"].shape == (128, 512)
    tv, _ = build_encoder("tv:resnet18", 128, mlp)  # torchvision ResNets share the key names
    assert set(tv.state_dict()) == set(enc.state_dict())


def test_moco_state_dict_layout():
    m = MoCo("resnet18", K=16, mlp=True, shuffle_bn="split")
    sd = m.state_dict()
    assert {"queue", "queue_ptr", "encoder_q.conv1.weight", "encoder_k.conv1.weight", "encoder_q.fc.0.weight",
            "encoder_q.layer1.0.bn1.running_mean"} <= set(sd)
    assert sd["queue"].shape == (128, 16)
    torch.testing.assert_close(sd["queue"].norm(dim=0), torch.ones(16))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(UnknownArchError, match="resnet_does_not_exist"):
        build_encoder("resnet_does_not_exist")
    with pytest.raises(UnknownArchError, match="tv:nope"):
        build_encoder("tv:nope")
    with pytest.raises(UnknownArchError, match="fc"):
        build_encoder("vit_tiny_patch16_224")


def test_memory_bank_needs_k_below_dataset_size():
    with pytest.raises(ValueError, match=r"K=64 .*smaller than the number of training samples \(48\)"):
        MoCo("resnet18", K=64, mechanism="memory_bank", bank_size=48)


@pytest.mark.parametrize("mechanism", ["moco", "end2end", "memory_bank"])
def test_each_mechanism_trains(mechanism):
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=16, K=12, m=0.99, T=0.2, mlp=True, mechanism=mechanism, shuffle_bn="split",
                 shuffle_groups=2, bank_size=20)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    dictionary = {"moco": "queue", "memory_bank": "memory_bank"}.get(mechanism)
    before = getattr(model, dictionary).clone() if dictionary else None
    w0 = model.encoder_q.conv1.weight.detach().clone()
    x = torch.randn(8, 3, 32, 32)
    for step in range(3):
        index = torch.arange(step * 8, step * 8 + 8) % 20
        out = model(x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x), index)
        n_cols = 8 if mechanism == "end2end" else 1 + 12
        assert out.logits.shape == (8, n_cols)
        loss = F.cross_entropy(out.logits, out.labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_dictionary(out)
    assert not torch.equal(model.encoder_q.conv1.weight, w0)
    if dictionary:
        assert not torch.equal(getattr(model, dictionary), before)
    if mechanism == "memory_bank":
        torch.testing.assert_close(model.memory_bank.norm(dim=1), torch.ones(20))
        assert not hasattr(model, "encoder_k")


def test_prefill_replaces_the_random_queue_with_the_key_encoders_keys():
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=4, K=6, m=0.9, T=0.2, mlp=True, shuffle_bn="off").train()
    random_init = model.queue.clone()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(model.encoder_k(images), dim=1)  # no shuffle: the plain key encoder's keys
    assert model.prefill_dictionary(images) == 4
    assert model.prefill_dictionary(images) == 4  # second batch wraps around: K=6, columns 4, 5, 0, 1
    assert torch.allclose(model.queue[:, 0:2].T, expected[2:4], atol=1e-6)
    assert torch.allclose(model.queue[:, 2:4].T, expected[2:4], atol=1e-6)
    assert torch.allclose(model.queue[:, 4:6].T, expected[0:2], atol=1e-6)
    assert not torch.isclose(model.queue, random_init).any()
    assert int(model.queue_ptr) == 8 % 6


def test_prefill_writes_memory_bank_rows_of_the_batch_only():
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=4, K=3, mlp=False, mechanism="memory_bank", shuffle_bn="off", bank_size=10).train()
    before = model.memory_bank.clone()
    images, index = torch.randn(3, 3, 32, 32), torch.tensor([7, 2, 5])
    with torch.no_grad():
        expected = F.normalize(model.encoder_q(images), dim=1)  # the bank stores query-encoder features
    assert model.prefill_dictionary(images, index) == 3
    assert torch.allclose(model.memory_bank[index], expected, atol=1e-6)
    untouched = [i for i in range(10) if i not in (7, 2, 5)]
    assert torch.equal(model.memory_bank[untouched], before[untouched])


def test_prefill_is_a_no_op_for_end2end():
    model = MoCo("resnet18", dim=4, mechanism="end2end", shuffle_bn="off")
    assert model.prefill_dictionary(torch.randn(2, 3, 32, 32)) == 0
