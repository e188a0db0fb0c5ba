"""The scene generator: classes, determinism, exact masks/boxes, occlusion, and colour carrying no class signal."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from moco_zoo.data import CLASSES
from moco_zoo.data.synthetic import SUPERCATEGORIES, render_scene, scene_rng, voc_palette
from moco_zoo.data.writers import mask_to_polygons, mask_to_rle

# pycocotools with numpy 2 warns about its own __array__ use; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_classes_are_distinct_shapes():
    assert len(CLASSES) >= 8
    assert len(set(CLASSES)) == len(CLASSES)
    assert set(SUPERCATEGORIES) == set(CLASSES)


def test_scene_rng_depends_on_seed_stream_and_index():
    a = scene_rng(0, "voc2007", 3).random(4)
    assert np.array_equal(a, scene_rng(0, "voc2007", 3).random(4))
    assert not np.array_equal(a, scene_rng(1, "voc2007", 3).random(4))
    assert not np.array_equal(a, scene_rng(0, "voc2012", 3).random(4))
    assert not np.array_equal(a, scene_rng(0, "voc2007", 4).random(4))


def test_render_is_deterministic():
    a = render_scene(scene_rng(5, "t", 0), 96, 80, crowd_prob=0.5)
    b = render_scene(scene_rng(5, "t", 0), 96, 80, crowd_prob=0.5)
    assert a.image.shape == (80, 96, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instance_map, b.instance_map)


def test_instances_are_exact_visible_masks_with_tight_boxes():
    seen_truncated = seen_difficult = seen_occluded = 0
    for i in range(40):
        scene = render_scene(scene_rng(0, "t", i), 128, 96)
        assert len(scene.instances) <= 5
        union = np.zeros(scene.instance_map.shape, dtype=int)
        for k, inst in enumerate(scene.instances, start=1):
            assert np.array_equal(inst.mask, scene.instance_map == k)  # masks come from the painted instance map
            ys, xs = np.nonzero(inst.mask)
            assert inst.box == (xs.min(), ys.min(), xs.max(), ys.max())
            assert inst.area == len(xs) > 0
            union += inst.mask
            seen_truncated += inst.truncated
            seen_difficult += inst.difficult
            assert 0.2 <= inst.visible_fraction <= 1.0
            seen_occluded += (not inst.truncated) and inst.visible_fraction < 0.9
        assert union.max() <= 1  # visible masks never overlap
    assert seen_truncated and seen_difficult and seen_occluded


def test_occlusion_later_objects_win():
    # Find a scene where two instances' boxes overlap: the overlap pixels belong to exactly one of them.
    for i in range(60):
        scene = render_scene(scene_rng(1, "occ", i), 96, 96, num_objects=(5, 5))
        if len(scene.instances) >= 2:
            masks = np.stack([inst.mask for inst in scene.instances])
            assert masks.sum(0).max() == 1
            return
    pytest.fail("no multi-object scene generated")


def test_dominant_object_is_large_and_of_requested_class():
    for c in range(len(CLASSES)):
        scene = render_scene(scene_rng(0, "dom", c), 64, 64, dominant=c)
        biggest = max(scene.instances, key=lambda inst: inst.area)
        assert biggest.category == c
        assert biggest.area > 0.08 * 64 * 64


def test_crowd_regions():
    crowds = [inst for i in range(30) for inst in render_scene(scene_rng(0, "c", i), 128, 128, crowd_prob=1.0).instances
              if inst.iscrowd]
    assert crowds and all(not inst.difficult for inst in crowds)


def test_colour_does_not_identify_class():
    """A nearest-centroid classifier on the object's mean colour stays near chance level."""
    n_cls = len(CLASSES)
    feats, labels = [], []
    for i in range(24 * n_cls):
        c = i % n_cls
        scene = render_scene(scene_rng(3, "colour", i), 48, 48, dominant=c)
        inst = max(scene.instances, key=lambda x: x.area)
        feats.append(scene.image[inst.mask].mean(0))
        labels.append(c)
    x, y = np.asarray(feats), np.asarray(labels)
    rounds = np.arange(len(y)) // n_cls
    train, test = rounds % 2 == 0, rounds % 2 == 1
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(n_cls)])
    pred = np.argmin(((x[test][:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((pred == y[test]).mean())
    assert accuracy < 2.5 / n_cls, accuracy


def test_voc_palette():
    pal = voc_palette()
    assert len(pal) == 768
    assert pal[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert pal[255 * 3 : 256 * 3] == [224, 224, 192]


@pytest.mark.parametrize("seed", range(4))
def test_mask_to_polygons_is_exact_for_random_masks(seed):
    """Random masks are full of holes, islands and corner-touching pixels: pycocotools must decode them exactly."""
    rng = np.random.default_rng(seed)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        if not m.any():
            continue
        polys = mask_to_polygons(m)
        assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polys)
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
        assert np.array_equal(decoded, m)
        rle = mask_to_rle(m)
        assert sum(rle["counts"]) == h * w
        assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, h, w)).astype(bool), m)


def test_mask_to_polygons_ring_with_island():
    m = np.zeros((20, 20), dtype=bool)
    m[2:18, 2:18] = True
    m[5:15, 5:15] = False  # hole
    m[8:12, 8:12] = True  # island inside the hole
    polys = mask_to_polygons(m)
    assert len(polys) == 2  # ring (with its hole) and island
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 20, 20))).astype(bool)
    assert np.array_equal(decoded, m)


def test_each_class_has_its_own_texture_and_context_used_at_the_prior_rate():
    from moco_zoo.data.synthetic import (APPEARANCE_PRIOR, BACKGROUNDS, CLASS_BACKGROUND, CLASS_TEXTURE, TEXTURES,
                                         _pick)

    pairs = set(zip(CLASS_TEXTURE, CLASS_BACKGROUND))
    assert len(pairs) == len(CLASSES)  # no two classes share both cues
    rng = np.random.default_rng(0)
    n = 20000
    for choices, preferred in ((TEXTURES, "checker"), (BACKGROUNDS, "gradient")):
        rate = sum(_pick(rng, choices, preferred) == preferred for _ in range(n)) / n
        expected = APPEARANCE_PRIOR + (1 - APPEARANCE_PRIOR) / len(choices)  # the prior, plus a uniform draw's share
        assert abs(rate - expected) < 4 * (expected * (1 - expected) / n) ** 0.5
        uniform = sum(_pick(rng, choices, None) == preferred for _ in range(n)) / n
        assert abs(uniform - 1 / len(choices)) < 0.02
