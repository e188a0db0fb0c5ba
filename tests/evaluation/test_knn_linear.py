"""kNN against a brute-force numpy vote; the one-pass sweep's heads against heads trained one at a time with
torch.optim.SGD; the validation split's balance; DDP (2 gloo processes) against one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moco_zoo.evaluation.knn import knn_eval
from moco_zoo.evaluation.linear import (LinearSweep, balanced_split, cosine_factor, epoch_order, init_head,
                                        run_linear_sweep, train_sweep)


def _numpy_knn_top1(train, train_y, test, test_y, num_classes, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for q, label in zip(test, test_y):
        sims = np.array([float(np.dot(q, m)) for m in train])
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sims[j] / t)
        correct += int(np.argmax(votes) == label)
    return 100.0 * correct / len(test_y)


def test_knn_matches_a_brute_force_numpy_vote():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    train_y, test_y = rng.integers(0, 5, 300), rng.integers(0, 5, 80)
    train = centers[train_y] + 1.5 * rng.normal(size=(300, 16))
    test = centers[test_y] + 1.5 * rng.normal(size=(80, 16))
    got = knn_eval(torch.tensor(train, dtype=torch.float64), torch.tensor(train_y), torch.tensor(test,
                   dtype=torch.float64), torch.tensor(test_y), 5, ks=(1, 10, 20, 200), t=0.07)
    for k in (1, 10, 20, 200):
        want = _numpy_knn_top1(train, train_y, test, test_y, 5, k, 0.07)
        assert got[f"top1_k{k}"] == pytest.approx(want, abs=1e-4), k
    assert 20 < got["top1_k20"] < 100  # neither trivial nor chance


def _data(n=90, d=12, c=4, seed=0, centres_seed=100):
    """Gaussian clusters around ``c`` centres (drawn from ``centres_seed``), samples drawn from ``seed``."""
    y = torch.arange(n) % c
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(centres_seed))
    return centres[y] + torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), y


def _single_head(x, y, lr, wd, *, epochs, batch_size, seed, momentum=0.9):
    """One head trained alone: nn.Linear + torch.optim.SGD, same init, data order and schedule."""
    w0, b0 = init_head(x.shape[1], int(y.max()) + 1, seed)
    head = torch.nn.Linear(x.shape[1], w0.shape[0])
    with torch.no_grad():
        head.weight.copy_(w0)
        head.bias.copy_(b0)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_factor(epoch, epochs)
        order = epoch_order(len(y), seed, epoch)
        for i in range(0, len(y), batch_size):
            b = order[i:i + batch_size]
            loss = F.cross_entropy(head(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.weight.detach(), head.bias.detach()


def test_the_sweep_heads_equal_heads_trained_one_at_a_time():
    x, y = _data()
    lrs, wds = [0.05, 0.5, 2.0], [0.0, 1e-2]
    sweep = LinearSweep(x.shape[1], 4, lrs, wds, seed=7)
    train_sweep(sweep, x, y, epochs=4, batch_size=16, seed=7)
    assert len(sweep.grid) == 6
    for h, (lr, wd) in enumerate(sweep.grid):
        w, b = _single_head(x, y, lr, wd, epochs=4, batch_size=16, seed=7)
        assert torch.allclose(sweep.weight[h], w, atol=1e-5, rtol=1e-4), (lr, wd)
        assert torch.allclose(sweep.bias[h], b, atol=1e-5, rtol=1e-4), (lr, wd)
    # the heads did diverge from each other (the test would pass vacuously otherwise)
    assert (sweep.weight[0] - sweep.weight[4]).abs().max() > 1e-2


def test_sweep_resumes_from_its_checkpoint_to_the_same_heads(tmp_path):
    x, y = _data()
    full = train_sweep(LinearSweep(12, 4, [0.1, 1.0], [0.0], seed=1), x, y, epochs=5, batch_size=16, seed=1)
    ck = tmp_path / "sweep.pth"
    stopped = train_sweep(LinearSweep(12, 4, [0.1, 1.0], [0.0], seed=1), x, y, epochs=5, batch_size=16, seed=1,
                          checkpoint=ck, stop_epoch=3)
    assert not torch.allclose(stopped.weight, full.weight, atol=1e-4)
    resumed = train_sweep(LinearSweep(12, 4, [0.1, 1.0], [0.0], seed=1), x, y, epochs=5, batch_size=16, seed=1,
                          checkpoint=ck)
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)


def test_validation_split_is_per_class_balanced_and_deterministic():
    y = torch.tensor([0] * 50 + [1] * 20 + [2] * 3)
    tr, va = balanced_split(y, 0.1, seed=0)
    assert torch.bincount(y[va]).tolist() == [5, 2, 1]
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(y)))
    assert torch.equal(balanced_split(y, 0.1, seed=0)[1], va)
    assert not torch.equal(balanced_split(y, 0.1, seed=1)[1], va)


def test_run_linear_sweep_picks_the_best_validation_head():
    x, y = _data(n=200)
    xt, yt = _data(n=80, seed=1)  # same class centres, other samples
    res = run_linear_sweep(x, y, xt, yt, lrs=[0.0, 0.5], wds=[0.0], epochs=5, batch_size=32, seed=5)
    # lr 0 leaves the random init (chance level); the trained head must win on val and be the one reported
    assert res["best_lr"] == 0.5 and res["val_top1"] == max(g["val_top1"] for g in res["grid"])
    assert res["grid"][0]["val_top1"] < res["val_top1"]
    assert res["top1"] > 60.0


def _ddp_sweep_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        sweep = train_sweep(LinearSweep(12, 4, [0.05, 0.5], [0.0, 1e-2], seed=7), x, y, epochs=3, batch_size=16,
                            seed=7)
        if rank == 0:
            torch.save({"weight": sweep.weight.detach(), "bias": sweep.bias.detach()}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # ~12 s on the shared 2-core machine (two interpreters importing torch/timm)
def test_the_sweep_under_two_gloo_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_sweep_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    x, y = _data()
    ref = train_sweep(LinearSweep(12, 4, [0.05, 0.5], [0.0, 1e-2], seed=7), x, y, epochs=3, batch_size=16, seed=7)
    assert torch.allclose(got["weight"], ref.weight.detach(), atol=1e-5)
    assert torch.allclose(got["bias"], ref.bias.detach(), atol=1e-5)
