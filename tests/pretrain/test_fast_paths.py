"""The engine's speed paths compute the same thing as the plain ones: block-grouped split BN (keeps channels_last),
fused SGD, the host mirror of the queue pointer, persistent DataLoader workers by default."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_zoo.pretrain.builder import MoCo
from moco_zoo.pretrain.config import make_config
from moco_zoo.pretrain.engine import fused_sgd_supported, make_sgd
from moco_zoo.pretrain.shuffle_bn import SplitBatchNorm2d, split_block_order


class InterleavedSplitBatchNorm(nn.BatchNorm2d):
    """Reference for the split emulation, written another way: sample i in group i % G, the groups folded into
    channels (NxCxHxW -> (N/G)x(G*C)xHxW) and normalised by one batch_norm call."""

    def __init__(self, bn: nn.BatchNorm2d, num_splits: int) -> None:
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum)
        self.load_state_dict(bn.state_dict())
        self.num_splits = num_splits

    def forward(self, x):
        n, c = x.shape[:2]
        g = max(1, min(self.num_splits, n // 2))
        if not self.training or g == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        rm, rv = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(x.reshape(n // g, g * c, *x.shape[2:]), rm, rv, self.weight.repeat(g), self.bias.repeat(g),
                           True, factor, self.eps).view_as(x)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(g, c).mean(0))
            self.running_var.copy_(rv.view(g, c).mean(0))
        return out


@pytest.mark.parametrize("momentum", [0.1, None])
def test_block_grouping_equals_per_group_batch_norm(momentum):
    """Blocks of the reordered batch are the groups {i : i % G == j}: output and running statistics equal plain
    F.batch_norm on each group's gathered samples (computed independently), and the layout stays channels_last."""
    torch.manual_seed(0)
    n, c, g = 12, 5, 4
    x = (torch.randn(n, c, 6, 6) * torch.arange(1, n + 1).view(n, 1, 1, 1)).contiguous(
        memory_format=torch.channels_last)
    bn = SplitBatchNorm2d(c, num_splits=g, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    interleaved = InterleavedSplitBatchNorm(bn, g)

    order = split_block_order(n, g)
    assert sorted(order.tolist()) == list(range(n))
    out = bn(x[order])[torch.argsort(order)]
    assert out.is_contiguous(memory_format=torch.channels_last)

    factor = 1.0 if momentum is None else momentum  # first update of a cumulative average: factor 1/1
    rms, rvs = [], []
    for j in range(g):
        rm, rv = rm0.clone(), rv0.clone()
        ref = F.batch_norm(x[j::g].contiguous(), rm, rv, bn.weight, bn.bias, True, factor, bn.eps)
        torch.testing.assert_close(out[j::g], ref, rtol=1e-5, atol=1e-5)
        rms.append(rm)
        rvs.append(rv)
    torch.testing.assert_close(bn.running_mean, torch.stack(rms).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(rvs).mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1

    # ... and the same as the interleaved (fold-into-channels) implementation on the original order
    torch.testing.assert_close(interleaved(x), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(interleaved.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(interleaved.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_block_grouping_gradients_match_interleaved():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4)
    w = torch.randn(8, 3, 4, 4)
    blocks = SplitBatchNorm2d(3, num_splits=4)
    inter = InterleavedSplitBatchNorm(blocks, 4)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    order = split_block_order(8, 4)
    (blocks(xa[order])[torch.argsort(order)] * w).sum().backward()
    (inter(xb) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    assert split_block_order(7, 3) is None and split_block_order(8, 1) is None  # uneven / one group: no reorder


def _set_interleaved(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, SplitBatchNorm2d):
            setattr(model, name, InterleavedSplitBatchNorm(child, child.num_splits).to(child.weight.dtype))
        else:
            _set_interleaved(child)


@pytest.mark.parametrize("channels_last", [False, True])
def test_moco_split_encoders_equal_the_interleaved_computation(channels_last):
    """Query features, shuffled keys and every BN running statistic of one MoCo forward equal the direct
    computation with interleaved groups (encoder on the input as is, keys shuffled with the same permutation)."""
    torch.manual_seed(0)
    # float64: groups of 2 samples at 1x1 resolution (layer4 at 32 px) amplify the rounding differences of the
    # convolution algorithms (NCHW vs channels_last) far beyond float32 tolerances
    model = MoCo("resnet18", dim=8, K=16, shuffle_bn="split", shuffle_groups=4).double().train()
    old = copy.deepcopy(model)
    _set_interleaved(old)
    x_q, x_k = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randn(8, 3, 32, 32, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x_q, x_k = (t.contiguous(memory_format=torch.channels_last) for t in (x_q, x_k))

    q_new = model._encode(model.encoder_q, x_q)
    q_old = old.encoder_q(x_q)
    torch.testing.assert_close(q_new, q_old, rtol=1e-7, atol=1e-7)
    torch.manual_seed(5)
    k_new = model.encode_keys(x_k)
    torch.manual_seed(5)
    perm = torch.randperm(8)
    with torch.no_grad():
        k_old = F.normalize(old.encoder_k(x_k[perm]), dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(k_new, k_old, rtol=1e-7, atol=1e-7)
    new_sd, old_sd = model.state_dict(), old.state_dict()
    for k, v in old_sd.items():
        if "running_" in k or "num_batches" in k:
            torch.testing.assert_close(new_sd[k], v, rtol=1e-7, atol=1e-7, msg=k)


def test_fused_sgd_matches_default():
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 16)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    results = []
    for fused in (None, True):
        params = [p.clone().requires_grad_(True) for p in init]
        opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(([p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the engine's choice: fused where PyTorch has the kernel (CPU in recent versions), the default otherwise
    params = [torch.zeros(3, requires_grad=True)]
    assert bool(make_sgd(params, 0.1, 0.9, 1e-4).param_groups[0]["fused"]) == fused_sgd_supported(params)


def test_queue_pointer_mirror_follows_the_buffer():
    model = MoCo("resnet18", dim=4, K=10, shuffle_bn="off")
    keys = torch.ones(3, 4)
    model.dequeue_and_enqueue(keys)
    assert int(model.queue_ptr) == 3
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.dequeue_and_enqueue(keys * 2)
    assert int(model.queue_ptr) == 6
    model.load_state_dict(sd)  # resume: the mirror is re-read from the restored buffer
    model.dequeue_and_enqueue(keys * 3)
    assert int(model.queue_ptr) == 6 and torch.equal(model.queue[:, 3:6], torch.full((4, 3), 3.0))
    model.queue_ptr.fill_(8)  # a direct write to the buffer is honoured too (wraps around the end)
    model.dequeue_and_enqueue(keys * 4)
    assert int(model.queue_ptr) == 1
    assert torch.equal(model.queue[:, [8, 9, 0]], torch.full((4, 3), 4.0))
    fresh = MoCo("resnet18", dim=4, K=10, shuffle_bn="off")
    fresh.load_state_dict(model.state_dict())
    fresh.dequeue_and_enqueue(keys * 5)
    assert int(fresh.queue_ptr) == 4 and torch.equal(fresh.queue[:, 1:4], torch.full((4, 3), 5.0))


def test_persistent_workers_by_default():
    assert make_config().persistent_workers is True
    assert make_config(persistent_workers=False).persistent_workers is False
