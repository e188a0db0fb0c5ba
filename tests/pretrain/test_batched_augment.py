"""--augment batched: loader geometry + batched colour ops, checked against torchvision's per-image functional ops
and against the PIL pipeline of moco_zoo.pretrain.augment drawn with the same sample seeds."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from moco_zoo.pretrain import batched_augment as BA
from moco_zoo.pretrain.augment import IMAGENET_MEAN, IMAGENET_STD, moco_v3_transform, pretrain_transform


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5  # a gray image: hue undefined, saturation 0
    x[1, :, :4] = 1.0  # saturated pixels hit the clamps
    return x


@pytest.mark.parametrize("op,tv_op,factors", [
    (BA.adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.8, 1.2]),
    (BA.adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.8, 1.2]),
    (BA.adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0, 1.2]),
    (BA.adjust_hue, TF.adjust_hue, [-0.4, 0.0, 0.1, 0.25, 0.5]),
])
def test_each_colour_op_matches_torchvision_per_image(op, tv_op, factors):
    x = _images(len(factors))
    out = op(x.clone(), torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], tv_op(x[i], f), atol=2e-5, rtol=0)


def test_grayscale_matches_torchvision():
    x = _images(3)
    torch.testing.assert_close(BA.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [16, 20])
def test_blur_matches_torchvision_gaussian_blur(size):
    x = _images(4, size)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = BA.gaussian_blur(x, sigma, radius=6)
    for i, s in enumerate(sigma.tolist()):
        ref = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[s, s])  # reflect padding, as ours
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_blur_radius_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="larger than 4x4"):
        BA.gaussian_blur(torch.rand(1, 3, 4, 4), torch.tensor([1.0]), radius=6)


def _torchvision_photometric(recipe: str, img: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """One view through torchvision's functional ops in the recipe's order (the independent expectation)."""
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in BA.Recipe(recipe).ops:
        if op == "jitter" and row[BA.JITTER] > 0:
            for j in row[BA.ORDER:BA.ORDER + 4].long().tolist():
                img = tv_ops[j](img, float(row[BA.BRIGHTNESS + j]))
        elif op == "gray" and row[BA.GRAY] > 0:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        elif op == "blur" and row[BA.BLUR] > 0:
            s = float(row[BA.SIGMA])
            img = TF.gaussian_blur(img, kernel_size=[13, 13], sigma=[s, s])
        elif op == "solarize" and row[BA.SOLARIZE] > 0:
            img = TF.solarize(img, 128 / 255)
    return TF.normalize(img, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _source_image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def _seeded(seed: int, fn, *args):
    torch.manual_seed(seed)
    random.seed(seed)
    return fn(*args)


@pytest.mark.parametrize("recipe", ["v1", "v2", "v3"])
def test_batched_photometric_equals_per_image_torchvision_in_drawn_order(recipe):
    geo, photo = BA.GeometricViews(recipe, 24), BA.BatchedPhotometric(recipe)
    items = [_seeded(s, geo, _source_image(s)) for s in range(12)]
    views = torch.stack([v for v, _ in items])  # Nx2xSxSx3
    params = torch.stack([p for _, p in items])  # Nx2xP
    assert params[:, :, BA.JITTER].sum() > 0 and params[:, :, BA.GRAY].sum() > 0
    if recipe == "v2":
        assert 0 < params[:, :, BA.BLUR].sum() < params.shape[0] * 2
    if recipe == "v3":  # blur always on the first view, solarize only on the second
        assert params[:, 0, BA.BLUR].sum() == params.shape[0] and params[:, 0, BA.SOLARIZE].sum() == 0
    q, k = photo((views, params))
    for i in range(len(items)):
        for j, out in enumerate((q, k)):
            img = views[i, j].permute(2, 0, 1).float() / 255
            torch.testing.assert_close(out[i], _torchvision_photometric(recipe, img, params[i, j]),
                                       atol=1e-4, rtol=0)


@pytest.mark.parametrize("recipe,which", [("v1", 0), ("v2", 0), ("v3", 0), ("v3", 1)])
def test_same_seed_draws_the_same_augmentation_as_the_pil_pipeline(recipe, which):
    """Same sample seed -> same crop, flip, jitter factors and order, grayscale, blur and sigma as the PIL
    pipeline: the two outputs differ only by arithmetic (uint8 rounding in PIL's colour ops, PIL's box-filter blur).
    A different draw (e.g. another crop) would differ by far more."""
    size = 32
    if recipe == "v3":  # asymmetric: each view has its own PIL pipeline
        pil, geo = moco_v3_transform(which, size, 0.08), BA.GeometricViews(recipe, size, scale=(0.08, 1.0))
    else:
        pil, geo = pretrain_transform(recipe, size), BA.GeometricViews(recipe, size)
    photo = BA.BatchedPhotometric(recipe)
    diffs, shifted = [], []
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for s in range(24):
        img = _source_image(s, 48)
        ref = _seeded(s, pil, img)
        torch.manual_seed(s)
        random.seed(s)
        v, row = geo.view(img, which)
        out = photo((torch.from_numpy(np.stack([v, v]))[None], torch.tensor([row, row])[None]))[0][0]
        diffs.append(float(((out - ref) * std).abs().mean()))  # in [0, 1] pixel units
        other = _seeded(s + 1000, pil, img)
        shifted.append(float(((other - ref) * std).abs().mean()))
    diffs_t, shifted_t = torch.tensor(diffs), torch.tensor(shifted)
    assert diffs_t.median() < 0.01 and diffs_t.max() < 0.03, diffs
    assert shifted_t.median() > 5 * diffs_t.median()


def test_geometric_views_shapes_and_param_ranges():
    geo = BA.GeometricViews("v2", 16)
    torch.manual_seed(0)
    random.seed(0)
    rows = []
    for s in range(200):
        views, params = geo(_source_image(s % 7, 30))
        assert views.shape == (2, 16, 16, 3) and views.dtype == torch.uint8
        rows.append(params)
    p = torch.cat(rows)
    on = p[:, BA.JITTER] > 0
    assert 0.7 < on.float().mean() < 0.9  # RandomApply p = 0.8
    assert 0.12 < p[:, BA.GRAY].mean() < 0.28 and 0.4 < p[:, BA.BLUR].mean() < 0.6
    assert p[on, BA.BRIGHTNESS:BA.SATURATION + 1].min() >= 0.6 and p[on, BA.BRIGHTNESS:BA.SATURATION + 1].max() <= 1.4
    assert p[on, BA.HUE].abs().max() <= 0.1
    assert (p[on, BA.ORDER:BA.ORDER + 4].sort(1).values == torch.arange(4.0)).all()  # a permutation
    blur = p[:, BA.BLUR] > 0
    assert p[blur, BA.SIGMA].min() >= 0.1 and p[blur, BA.SIGMA].max() <= 2.0
    assert (p[~on, BA.BRIGHTNESS:BA.SATURATION + 1] == 1).all() and (p[~on, BA.HUE] == 0).all()


def test_bad_batch_is_refused():
    photo = BA.BatchedPhotometric("v2")
    with pytest.raises(ValueError, match="Nx2xSxSx3"):
        photo((torch.zeros(2, 2, 3, 8, 8), torch.zeros(2, 2, BA.NUM_PARAMS)))
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        BA.BatchedPhotometric("v4")


def test_channels_last_output_and_query_key_split():
    geo, photo = BA.GeometricViews("v2", 16), BA.BatchedPhotometric("v2")
    items = [_seeded(s, geo, _source_image(s, 20)) for s in range(3)]
    batch = (torch.stack([v for v, _ in items]), torch.stack([p for _, p in items]))
    q, k = photo(batch, channels_last=True)
    assert q.shape == k.shape == (3, 3, 16, 16) and q.is_contiguous(memory_format=torch.channels_last)
    q2, k2 = photo(batch)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(k, k2)
    assert not torch.equal(q, k)  # independent views


def _batched_cfg(tiny_imagefolder, tmp_path, workers):
    from moco_zoo.pretrain.config import make_config

    return make_config(data=str(tiny_imagefolder), arch="resnet18", image_size=32, batch_size=8, moco_k=16,
                       epochs=1, max_steps=2, workers=workers, augment_backend="batched", precision="bf16",
                       channels_last=True, output_dir=str(tmp_path / f"run{workers}"), progress=False, plots=False,
                       knn_every=0, log_every_steps=1)


def test_engine_with_batched_augment(tiny_imagefolder, tmp_path):
    """Without loader workers the loader collates (uint8 views, parameters) deterministically per sample seed and
    the engine turns them into normalised channels_last views between steps, then trains."""
    from moco_zoo.pretrain.engine import Trainer

    trainer = Trainer(_batched_cfg(tiny_imagefolder, tmp_path, workers=0))
    assert isinstance(trainer.dataset.transform, BA.GeometricViews)
    trainer.sampler.set_epoch(0)
    (views, params), _, index = next(iter(trainer.loader))
    assert views.shape == (8, 2, 32, 32, 3) and views.dtype == torch.uint8 and params.shape == (8, 2, BA.NUM_PARAMS)
    first_index, first_seed = next(iter(trainer.sampler))[0]
    assert int(index[0]) == first_index
    (v0, p0), _, _ = trainer.dataset[(first_index, first_seed)]  # in this process, same seed
    assert torch.equal(v0, views[0]) and torch.equal(p0, params[0])
    q, k = trainer._views([views, params])
    assert q.shape == (8, 3, 32, 32) and q.is_contiguous(memory_format=torch.channels_last)
    summary = trainer.fit()
    assert summary["global_step"] == 2
    losses = [r["loss"] for r in trainer.log.records if r.get("type") == "step"]
    assert losses and all(np.isfinite(losses))


def test_cpu_loader_workers_run_the_colour_ops(tiny_imagefolder, tmp_path):
    """On the CPU with loader workers, the workers hand out finished views: exactly what the colour ops give in
    this process on the same samples (same seeds), already channels_last."""
    from torch.utils.data import default_collate

    from moco_zoo.pretrain.engine import Trainer

    trainer = Trainer(_batched_cfg(tiny_imagefolder, tmp_path, workers=1))
    trainer.sampler.set_epoch(0)
    (q, k), _, index = next(iter(trainer.loader))
    assert q.dtype == torch.float32 and q.shape == (8, 3, 32, 32)
    assert q.is_contiguous(memory_format=torch.channels_last)
    samples = [trainer.dataset[item] for item in next(iter(trainer.sampler))]
    (views, params), _, ref_index = default_collate(samples)
    q_ref, k_ref = BA.BatchedPhotometric("v2")((views, params), "cpu", channels_last=True)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=0)
    assert trainer._views([q, k])[0] is not None and trainer.fit()["global_step"] == 2


def test_augment_flag_is_validated():
    from moco_zoo.pretrain.config import make_config

    with pytest.raises(ValueError, match="augment_backend must be pil or batched"):
        make_config(augment_backend="gpu")
