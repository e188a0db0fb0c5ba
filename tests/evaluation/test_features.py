"""The feature cache: the features are the backbone's pooled outputs, extraction resumes per chunk, a rerun reads
the cache without building the model, and the key changes with what the features depend on."""
from __future__ import annotations

import pytest
import torch

from moco_zoo.evaluation import features as feat_mod
from moco_zoo.evaluation.config import make_config


def _cfg(data, tmp_path, **kw):
    base = dict(backbone="random", arch="resnet18", data=str(data), image_size=32, batch_size=16, chunk_size=16,
                workers=0, precision="fp32", output_dir=str(tmp_path / "out"), progress=False)
    base.update(kw)
    return make_config("paper", **base)


def test_features_are_the_pooled_backbone_outputs_and_the_cache_resumes(eval_imagefolder, tmp_path, monkeypatch):
    cfg = _cfg(eval_imagefolder, tmp_path)
    fs = feat_mod.extract_cached(cfg, seed=3)
    assert fs.train.shape == (60, 512) and fs.test.shape == (20, 512) and fs.num_classes == 10

    # independent expectation: the same backbone run on the images by hand, one at a time
    import moco_zoo
    from moco_zoo.pretrain.augment import eval_transform
    from moco_zoo.pretrain.data import ImageFolderDataset

    model = moco_zoo.load_backbone("random", "resnet18", seed=3).eval()
    ds = ImageFolderDataset(eval_imagefolder / "val", eval_transform(32))
    with torch.no_grad():
        ref = torch.cat([model(ds[i][0].unsqueeze(0)) for i in (0, 7, 19)])
    assert torch.allclose(fs.test[[0, 7, 19]], ref, atol=1e-4, rtol=1e-4)
    assert fs.test_labels.tolist() == ds.targets

    folder = tmp_path / "out" / "feature_cache" / fs.key
    chunks = sorted(folder.rglob("chunk_*.safetensors"))
    assert len(chunks) == 4 + 2  # 60 train / 16 + 20 val / 16
    # interrupted run: one chunk missing -> only that chunk is extracted again
    before = {p: p.stat().st_mtime_ns for p in chunks}
    chunks[2].unlink()
    again = feat_mod.extract_cached(cfg, seed=3)
    assert torch.equal(again.train, fs.train) and torch.equal(again.test, fs.test)
    assert [p for p in chunks if p.stat().st_mtime_ns != before[p]] == [chunks[2]]

    # complete cache: the model is never built
    def no_model(*a, **k):
        raise AssertionError("the backbone was built although every chunk is cached")

    monkeypatch.setattr(feat_mod, "build_frozen_backbone", no_model)
    assert torch.equal(feat_mod.extract_cached(cfg, seed=3).train, fs.train)


def test_cache_key_follows_the_inputs(eval_imagefolder, tmp_path):
    cfg = _cfg(eval_imagefolder, tmp_path)
    ds = feat_mod.eval_datasets(cfg)
    k0 = feat_mod.cache_key(cfg, ds, 0, None)[0]
    assert feat_mod.cache_key(cfg, ds, 0, None)[0] == k0
    assert feat_mod.cache_key(cfg, ds, 1, None)[0] != k0  # random init: another seed, other weights
    assert feat_mod.cache_key(cfg, ds, 0, torch.bfloat16)[0] != k0
    assert feat_mod.cache_key(_cfg(eval_imagefolder, tmp_path, bn="recalibrate"), ds, 0, None)[0] != k0
    ds64 = feat_mod.eval_datasets(_cfg(eval_imagefolder, tmp_path, image_size=64))
    assert feat_mod.cache_key(cfg, ds64, 0, None)[0] != k0  # the transform is part of the key
    sup = _cfg(eval_imagefolder, tmp_path, backbone="torchvision-supervised")
    assert feat_mod.cache_key(sup, ds, 0, None)[0] == feat_mod.cache_key(sup, ds, 1, None)[0]


def test_missing_split_is_one_clear_error(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        feat_mod.data_root(_cfg(tmp_path / "d", tmp_path))


def _plain_fp32_features(cfg, seed):
    """The independent expectation: a plain ``torch.no_grad()`` fp32 NCHW loop over the same DataLoader."""
    import moco_zoo
    from moco_zoo.pretrain.data import make_loader

    model = moco_zoo.load_backbone("random", cfg.arch, num_classes=0, seed=seed).eval()
    out = {}
    with torch.no_grad():
        for split, ds in feat_mod.eval_datasets(cfg).items():
            loader = make_loader(ds, batch_size=cfg.batch_size, workers=0)
            out[split] = torch.cat([model(x) for x, _, _ in loader])
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_extraction_matches_a_plain_fp32_loop(eval_imagefolder, tmp_path, precision):
    """channels_last + inference mode (+ bf16 autocast) give the plain fp32 loop's features: exactly up to fp32
    rounding, and within bf16's precision (8-bit mantissa, errors accumulated over 18 layers) under bf16."""
    cfg = _cfg(eval_imagefolder, tmp_path, precision=precision, channels_last=True, batch_size=32, chunk_size=64)
    fs = feat_mod.extract_cached(cfg, seed=5)
    ref = _plain_fp32_features(cfg, 5)
    for got, want in ((fs.train, ref["train"]), (fs.test, ref["val"])):
        assert got.dtype == torch.float32 and got.shape == want.shape
        if precision == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            scale = want.abs().mean()
            assert (got - want).abs().mean() < 0.02 * scale
            assert torch.nn.functional.cosine_similarity(got, want, dim=1).min() > 0.995
            assert not torch.equal(got, want)  # bf16 was in effect
