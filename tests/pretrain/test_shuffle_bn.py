"""Shuffle BN: shuffle/unshuffle restores order; the split emulation really uses separate BN statistics per group."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_zoo.pretrain.builder import MoCo
from moco_zoo.pretrain.shuffle_bn import (SplitBatchNorm2d, batch_shuffle_ddp, batch_shuffle_single, batch_unshuffle_ddp,
                                 batch_unshuffle_single, resolve_shuffle_mode)


def test_single_device_shuffle_unshuffle_restores_order():
    x = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    shuffled, idx = batch_shuffle_single(x)
    assert not torch.equal(shuffled, x)  # P(identity) = 1/10!
    assert torch.equal(batch_unshuffle_single(shuffled, idx), x)


def test_ddp_shuffle_unshuffle_without_process_group_is_consistent():
    x = torch.randn(6, 3, 4, 4)
    shuffled, idx = batch_shuffle_ddp(x)
    assert sorted(shuffled[:, 0, 0, 0].tolist()) == sorted(x[:, 0, 0, 0].tolist())
    assert torch.equal(batch_unshuffle_ddp(shuffled.flatten(1), idx), x.flatten(1))


def test_split_bn_normalises_each_group_separately():
    torch.manual_seed(0)
    n, c, g = 8, 3, 4
    x = torch.randn(n, c, 5, 5) * torch.arange(1, n + 1).view(n, 1, 1, 1)  # groups with different statistics
    bn = nn.BatchNorm2d(c)
    split = SplitBatchNorm2d(c, num_splits=g)
    split.load_state_dict(bn.state_dict())
    assert set(split.state_dict()) == set(bn.state_dict())  # interchangeable checkpoints
    out = split(x)
    full = bn(x.clone())
    assert not torch.allclose(out, full, atol=1e-3)  # statistics really differ from the full batch
    blocks = x.split(n // g)
    for j in range(g):  # block j alone through plain BN
        ref = F.batch_norm(blocks[j], None, None, training=True, eps=split.eps)
        torch.testing.assert_close(out.split(n // g)[j], ref, rtol=1e-4, atol=1e-5)
    # running stats: average of the groups' updates
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in blocks]).mean(0)
    torch.testing.assert_close(split.running_mean, 0.1 * means, rtol=1e-4, atol=1e-6)
    split.eval()
    bn.eval()
    bn.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), bn(x))  # eval: plain BN


def test_split_bn_uneven_batches_use_contiguous_groups():
    x = torch.randn(7, 2, 3, 3)
    split = SplitBatchNorm2d(2, num_splits=3)
    out = split(x)
    for chunk_x, chunk_o in zip(torch.tensor_split(x, 3), torch.tensor_split(out, 3)):
        torch.testing.assert_close(chunk_o, F.batch_norm(chunk_x, None, None, training=True), rtol=1e-4, atol=1e-5)


def test_split_mode_converts_both_encoders_and_changes_key_statistics():
    torch.manual_seed(0)
    split = MoCo("resnet18", dim=8, K=8, shuffle_bn="split", shuffle_groups=4)
    assert all(isinstance(m, SplitBatchNorm2d) for m in split.encoder_k.modules() if isinstance(m, nn.BatchNorm2d))
    off = MoCo("resnet18", dim=8, K=8, shuffle_bn="off")
    off.load_state_dict(split.state_dict())
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    k_split = split.encode_keys(x)
    k_off = off.encode_keys(x)
    assert k_split.shape == k_off.shape == (8, 8)
    assert not torch.allclose(k_split, k_off, atol=1e-4)  # group statistics, not full-batch statistics


def test_resolve_shuffle_mode():
    assert resolve_shuffle_mode("auto", False, "moco") == "off"  # the original on one GPU: a no-op permutation
    assert resolve_shuffle_mode("auto", True, "moco") == "ddp"
    assert resolve_shuffle_mode("auto", True, "end2end") == "split"
    assert resolve_shuffle_mode("off", True, "moco") == "off"
    with pytest.raises(ValueError, match="torchrun"):
        resolve_shuffle_mode("ddp", False, "moco")


@pytest.mark.parametrize("n", [8, 7])
def test_split_bn_blocks_gradients_equal_per_block_batch_norm(n):
    """Input, weight and bias gradients of the blocks grouping equal those of plain BN run on each block alone."""
    torch.manual_seed(0)
    c, g = 3, 3
    x = (torch.randn(n, c, 4, 4) * torch.arange(1, n + 1).view(n, 1, 1, 1)).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    split = SplitBatchNorm2d(c, num_splits=g)
    nn.init.uniform_(split.weight, 0.5, 1.5)
    nn.init.uniform_(split.bias, -0.5, 0.5)
    upstream = torch.randn(n, c, 4, 4)
    (split(x) * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    w, b = split.weight.detach().clone().requires_grad_(), split.bias.detach().clone().requires_grad_()
    sizes = [len(chunk) for chunk in torch.tensor_split(torch.arange(n), g)]
    out = torch.cat([F.batch_norm(chunk, None, None, w, b, training=True, eps=split.eps)
                     for chunk in x_ref.split(sizes)])
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.weight.grad, w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.bias.grad, b.grad, rtol=1e-4, atol=1e-5)
