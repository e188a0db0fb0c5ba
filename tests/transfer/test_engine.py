"""moco_zoo.transfer.engine: lr schedules, the seeded resumable sampler, exact resume, periodic evaluation."""
from __future__ import annotations

import json

import pytest
import torch

from moco_zoo.transfer.config import resolve
from moco_zoo.transfer.data import InfiniteSampler
from moco_zoo.transfer.engine import TransferRun, lr_factor

SMALL_DET = dict(arch="resnet18", batch_size=2, max_test_images=2, log_period=1, checkpoint_period=3, num_vis=0,
                 detector="c4", box_batch_size_per_image=16, rpn_post_nms_top_n_test=30, box_detections_per_img=10,
                 min_size_train=[96, 112], min_size_test=112, threads=1)
SMALL_SEG = dict(arch="resnet18", batch_size=2, max_test_images=2, log_period=1, checkpoint_period=3, num_vis=0,
                 crop_size=48, head_channels=16, threads=1)


def test_lr_schedules():
    step = {"lr_schedule": "step", "gamma": 0.1, "steps": [10, 20], "warmup_iters": 4, "warmup_factor": 0.001,
            "iters": 30, "poly_power": 0.9}
    assert lr_factor(0, step) == pytest.approx(0.001)
    assert lr_factor(2, step) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(4, step) == 1.0 and lr_factor(9, step) == 1.0
    assert lr_factor(10, step) == pytest.approx(0.1) and lr_factor(25, step) == pytest.approx(0.01)
    poly = dict(step, lr_schedule="poly", warmup_iters=0)
    assert lr_factor(15, poly) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(0, dict(step, steps=[30, 40])) == pytest.approx(0.001)  # steps past the end never happen


def test_sampler_shards_an_epoch_and_resumes_with_the_same_seeds():
    take = lambda s, n: [next(it) for it in [iter(s)] for _ in range(n)]  # noqa: E731
    a = take(InfiniteSampler(10, seed=3, rank=0, world_size=2), 5)
    b = take(InfiniteSampler(10, seed=3, rank=1, world_size=2), 5)
    assert sorted(i for i, _ in a + b) == list(range(10))  # one epoch split between the ranks
    assert len({s for _, s in a + b}) == 10  # every sample has its own augmentation seed
    full = take(InfiniteSampler(10, seed=3), 25)
    assert take(InfiniteSampler(10, seed=3, start=13), 12) == full[13:]


def _interrupted_then_resumed(cfg, data, out, stop_at):
    run = TransferRun(cfg, "random", str(data), str(out))
    run.setup()
    run.trainer.max_iter = stop_at  # as if killed right after the checkpoint of iteration `stop_at`
    run.trainer.train()
    return TransferRun(cfg, "random", str(data), str(out), resume="auto").run()


@pytest.mark.parametrize("task,small,workers", [("voc_det", SMALL_DET, 0), ("voc_seg", SMALL_SEG, 1)])
def test_resume_is_bit_identical(synthetic_voc, tmp_path, task, small, workers):
    cfg = resolve(task, "cpu", flags={"iters": 6, "workers": workers}, overrides=small)
    straight = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path / "straight")).run()
    resumed = _interrupted_then_resumed(cfg, synthetic_voc, tmp_path / "resumed", stop_at=4)
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["history"] == b["history"] and straight["metrics"] == resumed["metrics"]


def test_periodic_evaluation_records_curves_without_changing_training(synthetic_voc, tmp_path):
    cfg = resolve("voc_det", "cpu", flags={"iters": 4, "workers": 0}, overrides=SMALL_DET)
    plain = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path / "plain")).run()
    cfg.eval_period = 2
    curve = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path / "curve")).run()
    assert [e["iter"] for e in curve["eval_history"]] == [2]
    assert set(curve["eval_history"][0]["metrics"]) >= {"AP50", "AP", "AP75"}
    assert curve["metrics"] == plain["metrics"] and curve["final_loss"] == plain["final_loss"]
    saved = json.loads((tmp_path / "curve" / "metrics.json").read_text())
    assert saved["eval_history"] == curve["eval_history"]
    assert (tmp_path / "curve" / "eval_curve.png").stat().st_size > 1000


def test_eval_only_on_the_final_checkpoint_reproduces_the_run_with_precise_bn(synthetic_voc, tmp_path):
    cfg = resolve("voc_seg", "cpu", flags={"iters": 3, "workers": 0}, overrides={**SMALL_SEG, "precise_bn_iters": 2})
    trained = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path)).run()
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    assert ckpt["model"]["stem.1.num_batches_tracked"] == 2  # reset by precise BN, then its 2 batches
    tested = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path / "again"),
                         resume=str(tmp_path / "checkpoint_last.pth"), eval_only=True).run()
    assert tested["metrics"] == trained["metrics"]


def test_channels_last_changes_the_layout_only(synthetic_voc, tmp_path):
    """channels_last: NHWC weights and feature maps with the NCHW model's values (same init, FPN features equal up to
    fp32 summation order, the same RPN losses on the same batch; the RoI head's losses are left out: its proposal
    top-k / NMS on a random init is decided by near-ties that summation order can flip)."""
    small = dict(SMALL_DET, detector="fpn", anchor_sizes=[16, 32, 64, 128, 256], precision="fp32")
    got = {}
    for cl in (False, True):
        cfg = resolve("voc_det", "cpu", flags={"iters": 1, "workers": 0}, overrides=dict(small, channels_last=cl))
        run = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path / str(cl)))
        run.setup()
        convs = [m.weight for m in run.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == cl for w in convs if w.shape[-1] > 1)
        init = {k: v.clone() for k, v in run.model.state_dict().items()}
        images, targets = next(run._batches(0))
        run.model.eval()
        with torch.no_grad():
            x = run.model.transform(images)[0].tensors
            feats = run.model.backbone(x)
        assert all(f.is_contiguous(memory_format=torch.channels_last) == cl for f in feats.values())
        run.model.train()
        torch.manual_seed(0)  # the RPN's anchor sampling
        losses = run.task.losses(run.model, (images, targets), run.device)
        got[cl] = ({k: v.contiguous() for k, v in feats.items()}, init,
                   {k: float(losses[k]) for k in ("loss_objectness", "loss_rpn_box_reg")})
    (fa, sa, la), (fb, sb, lb) = got[False], got[True]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-4, atol=1e-4)
    assert lb == pytest.approx(la, rel=1e-4)


def test_fused_sgd_makes_the_default_sgd_update(synthetic_voc, tmp_path):
    """The engine's optimizer is the fused SGD kernel where the device has one; its steps (momentum, per-group weight
    decay, per-group lr) equal torch.optim.SGD's default implementation on a copy of the parameters."""
    from moco_zoo.pretrain.engine import fused_sgd_supported

    cfg = resolve("voc_det", "cpu", flags={"iters": 1, "workers": 0}, overrides=dict(SMALL_DET, weight_decay=0.01))
    run = TransferRun(cfg, "random", str(synthetic_voc), str(tmp_path))
    run.setup()
    opt = run.trainer.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(g["fused"] for g in opt.param_groups) == fused_sgd_supported(params)
    assert len({g["weight_decay"] for g in opt.param_groups}) == 2  # norm parameters have their own group
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    it = iter(copies)
    ref = torch.optim.SGD([dict(g, params=[next(it) for _ in g["params"]], fused=None, foreach=False)
                           for g in opt.param_groups], lr=opt.defaults["lr"], momentum=opt.defaults["momentum"])
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        for p, c in zip(params, copies):
            # in the parameter's layout (NHWC under channels_last), as autograd's gradient layout contract makes them
            p.grad = torch.empty_like(p).normal_(generator=g)
            c.grad = p.grad.clone()
        for group, ref_group in zip(opt.param_groups, ref.param_groups):
            group["lr"] = ref_group["lr"] = 0.1 * (step + 1) * group["lr_mult"]
        opt.step()
        ref.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-7)
