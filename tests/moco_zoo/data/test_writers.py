"""Writers: the on-disk datasets read back with independent readers (torchvision, pycocotools), determinism,
atomic writes and argument errors, and the ensure_dataset cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from moco_zoo.data import CLASSES, ensure_dataset, write_coco, write_imagefolder, write_voc
from moco_zoo.data import writers
from moco_zoo.data.synthetic import voc_palette
from moco_zoo.data.writers import MARKER, scene_for

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Parameters of the session fixtures in tests/conftest.py (they call the writers with these).
IF_N, IF_SIZE = 320, 64
VOC_N, VOC_SIZE = 48, 128
COCO_N, COCO_SIZE = 40, 128


def tree_hashes(root: Path) -> Dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_read_by_torchvision(synthetic_imagefolder):
    n_val = round(IF_N * 0.25)
    for split, count in (("train", IF_N - n_val), ("val", n_val)):
        ds = torchvision.datasets.ImageFolder(str(synthetic_imagefolder / split))
        assert ds.classes == sorted(CLASSES)
        assert len(ds) == count
        per_class = np.bincount([t for _, t in ds.samples], minlength=len(CLASSES))
        assert per_class.max() - per_class.min() <= 1  # balanced
        img, _ = ds[0]
        assert img.size == (IF_SIZE, IF_SIZE) and img.mode == "RGB"


def test_imagefolder_files_are_the_drawn_scenes(synthetic_imagefolder):
    path = synthetic_imagefolder / "train" / CLASSES[3] / "train_000003.jpg"
    with Image.open(path) as im:
        assert im.format == "JPEG"
        on_disk = np.asarray(im.convert("RGB"), dtype=np.float32)
    drawn = scene_for("imagefolder", "train", 3, IF_SIZE).image.astype(np.float32)
    assert np.abs(on_disk - drawn).mean() < 12  # JPEG-close to what was drawn


# ------------------------------------------------------------------------------------------------------------- VOC


def _voc_boxes(target):
    return [
        (o["name"], tuple(int(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")), int(o["truncated"]),
         int(o["difficult"]))
        for o in target["annotation"]["object"]
    ]


@pytest.mark.parametrize("year,image_set,expected", [
    ("2007", "trainval", VOC_N // 2), ("2007", "test", VOC_N // 2), ("2007", "train", VOC_N // 4),
    ("2012", "trainval", VOC_N), ("2012", "val", VOC_N // 2),
])
def test_voc_read_by_torchvision(synthetic_voc, year, image_set, expected):
    assert synthetic_voc.name == "VOCdevkit"
    ds = torchvision.datasets.VOCDetection(str(synthetic_voc.parent), year=year, image_set=image_set, download=False)
    assert len(ds) == expected
    for i in range(0, len(ds), 5):
        img, target = ds[i]
        ann = target["annotation"]
        stem = ann["filename"][:-4]
        index = int(stem.split("_")[-1]) - 1
        scene = scene_for("voc", year, index, VOC_SIZE)
        assert img.size == (scene.width, scene.height) == (int(ann["size"]["width"]), int(ann["size"]["height"]))
        expected_objects = [
            (inst.name, tuple(v + 1 for v in inst.box), int(inst.truncated), int(inst.difficult))
            for inst in scene.instances
        ]
        assert _voc_boxes(target) == expected_objects


def test_voc_tree_layout_and_lists(synthetic_voc):
    assert (synthetic_voc / "classes.txt").read_text().split() == list(CLASSES)
    for year, splits in (("2007", ("train", "val", "trainval", "test")), ("2012", ("train", "val", "trainval"))):
        root = synthetic_voc / f"VOC{year}"
        main = root / "ImageSets" / "Main"
        ids = {s: main.joinpath(f"{s}.txt").read_text().split() for s in splits}
        assert set(ids["trainval"]) == set(ids["train"]) | set(ids["val"])
        assert not set(ids["train"]) & set(ids["val"])
        if year == "2007":
            assert not set(ids["trainval"]) & set(ids["test"])
        all_ids = set().union(*ids.values())
        assert {p.stem for p in (root / "JPEGImages").glob("*.jpg")} == all_ids
        assert {p.stem for p in (root / "Annotations").glob("*.xml")} == all_ids
        for s in ("train", "val", "trainval"):
            assert (root / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() == ids[s]
        # per-class lists: 1 = a non-difficult object of the class, 0 = only difficult ones, -1 = none
        ds = torchvision.datasets.VOCDetection(str(synthetic_voc.parent), year=year, image_set="trainval")
        objects = {t["annotation"]["filename"][:-4]: t["annotation"]["object"] for t in (ds[i][1] for i in range(len(ds)))}
        for c in CLASSES:
            rows = [line.split() for line in (main / f"{c}_trainval.txt").read_text().splitlines()]
            assert [r[0] for r in rows] == ids["trainval"]
            for image_id, flag in rows:
                objs = [o for o in objects[image_id] if o["name"] == c]
                want = -1 if not objs else (1 if any(o["difficult"] == "0" for o in objs) else 0)
                assert int(flag) == want


def test_voc_segmentation_pngs_match_annotations(synthetic_voc):
    root = synthetic_voc / "VOC2007"
    palette = voc_palette()
    for index in range(0, VOC_N, 7):
        image_id = f"{index + 1:06d}"
        scene = scene_for("voc", "2007", index, VOC_SIZE)
        with Image.open(root / "SegmentationObject" / f"{image_id}.png") as im:
            assert im.mode == "P" and im.getpalette()[:768] == palette
            obj = np.asarray(im)
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode == "P"
            cls = np.asarray(im)
        assert obj.shape == (scene.height, scene.width)
        for k, inst in enumerate(scene.instances, start=1):
            assert np.array_equal(obj == k, inst.mask)
            assert np.all(cls[inst.mask] == inst.category + 1)
        assert set(np.unique(obj)) <= set(range(len(scene.instances) + 1)) | {255}
        assert np.array_equal(obj == 0, cls == 0) and np.array_equal(obj == 255, cls == 255)


def test_voc_flags_occur(synthetic_voc):
    ds = torchvision.datasets.VOCDetection(str(synthetic_voc.parent), year="2007", image_set="test")
    flags = [(o["truncated"], o["difficult"]) for i in range(len(ds)) for o in ds[i][1]["annotation"]["object"]]
    assert any(t == "1" for t, _ in flags) and any(d == "1" for _, d in flags)
    assert any(t == "0" and d == "0" for t, d in flags)


def test_voc_image_sizes_vary(synthetic_voc):
    sizes = {Image.open(p).size for p in (synthetic_voc / "VOC2007" / "JPEGImages").glob("*.jpg")}
    assert len(sizes) > 3 and all(max(s) == VOC_SIZE for s in sizes)


def test_voc2012_has_different_images(synthetic_voc):
    a = (synthetic_voc / "VOC2007" / "JPEGImages" / "000001.jpg").read_bytes()
    b = (synthetic_voc / "VOC2012" / "JPEGImages" / "2012_000001.jpg").read_bytes()
    assert a != b


# ------------------------------------------------------------------------------------------------------------ COCO


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_read_by_pycocotools_and_torchvision(synthetic_coco, split):
    ann_file = synthetic_coco / "annotations" / f"instances_{split}2017.json"
    coco = COCO(str(ann_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert coco.getCatIds() == list(range(1, len(CLASSES) + 1))
    ds = torchvision.datasets.CocoDetection(str(synthetic_coco / f"{split}2017"), str(ann_file))
    n_val = round(COCO_N * 0.25)
    assert len(ds) == (n_val if split == "val" else COCO_N - n_val)
    img, anns = ds[0]
    assert img.size == (coco.imgs[ds.ids[0]]["width"], coco.imgs[ds.ids[0]]["height"])
    offset = 1_000_000 if split == "val" else 0
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        scene = scene_for("coco", split, image_id - offset - 1, COCO_SIZE)
        assert (info["width"], info["height"]) == (scene.width, scene.height)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        assert len(anns) == len(scene.instances)
        for ann, inst in zip(anns, scene.instances):
            decoded = coco.annToMask(ann).astype(bool)
            assert np.array_equal(decoded, inst.mask)  # exact, not just IoU >= 0.9
            assert ann["area"] == float(decoded.sum())
            rle = mask_utils.encode(np.asfortranarray(decoded.astype(np.uint8)))
            assert ann["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
            assert ann["category_id"] == inst.category + 1
            assert ann["iscrowd"] == int(inst.iscrowd)
            if ann["iscrowd"]:
                assert isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], list)
            else:
                assert isinstance(ann["segmentation"], list)


def test_coco_has_crowd_regions(synthetic_coco):
    crowds = 0
    for split in ("train", "val"):
        data = json.loads((synthetic_coco / "annotations" / f"instances_{split}2017.json").read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        crowds += sum(a["iscrowd"] for a in data["annotations"])
        ids = [a["id"] for a in data["annotations"]]
        assert len(ids) == len(set(ids))
    assert crowds > 0


# ----------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_imagefolder(tmp_path / name / "if", num_images=40, image_size=32, seed=seed)
        write_voc(tmp_path / name / "voc", num_images=4, image_size=48, seed=seed, voc2012=True)
        write_coco(tmp_path / name / "coco", num_images=4, image_size=48, seed=seed)
        runs[name] = tree_hashes(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"].keys() == runs["c"].keys()
    jpgs = [k for k in runs["a"] if k.endswith(".jpg")]
    assert all(runs["a"][k] != runs["c"][k] for k in jpgs)


def test_images_do_not_depend_on_num_images(tmp_path):
    small = write_coco(tmp_path / "small", num_images=4, image_size=48)
    large = write_coco(tmp_path / "large", num_images=8, image_size=48)
    for p in (small / "train2017").glob("*.jpg"):
        assert p.read_bytes() == (large / "train2017" / p.name).read_bytes()


# ---------------------------------------------------------------------------------------------- errors, atomicity


def _leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_images=0), "num_images"),
    (dict(num_images=-3), "num_images"),
    (dict(num_images=2.5), "num_images"),
    (dict(image_size=8), "image_size"),
    (dict(seed=-1), "seed"),
])
@pytest.mark.parametrize("writer", [write_imagefolder, write_voc, write_coco])
def test_bad_arguments(tmp_path, writer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        writer(tmp_path / "sub" / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_too_few_images_for_the_layout(tmp_path):
    with pytest.raises(ValueError, match="one image per class"):
        write_imagefolder(tmp_path / "if", num_images=12)
    with pytest.raises(ValueError, match="num_images must be >= 4"):
        write_voc(tmp_path / "voc", num_images=3)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_needs_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_coco(out, num_images=2, image_size=32)
    # overwrite=True refuses directories that make-data did not write
    with pytest.raises(FileExistsError, match="refusing"):
        write_coco(out, num_images=2, image_size=32, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert _leftovers(tmp_path) == []
    # a file in the way
    with pytest.raises(FileExistsError, match="not a directory"):
        write_coco(out / "precious.txt", num_images=2, image_size=32)


def test_empty_output_dir_and_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    write_coco(out, num_images=2, image_size=32, seed=1)
    first = tree_hashes(out)
    write_coco(out, num_images=3, image_size=32, seed=2, overwrite=True)
    second = tree_hashes(out)
    assert first != second and json.loads((out / MARKER).read_text())["num_images"] == 3
    assert _leftovers(tmp_path) == []


def test_error_while_writing_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writers.scene_for

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "scene_for", failing)
    with pytest.raises(RuntimeError, match="boom"):
        write_voc(tmp_path / "new" / "nested" / "voc", num_images=4, image_size=32)
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too

    existing = tmp_path / "old"
    write_coco(existing, num_images=2, image_size=32)  # scene_for call 4+ do not fail
    before = tree_hashes(existing)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        write_coco(existing, num_images=4, image_size=32, overwrite=True)
    assert tree_hashes(existing) == before  # the previous dataset is untouched
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------ cache


def test_ensure_dataset_caches(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    a = ensure_dataset("imagefolder", root=root, num_images=40, image_size=32)
    assert (a / "train").is_dir() and a.parent == root
    mtime = (a / MARKER).stat().st_mtime_ns
    assert ensure_dataset("imagefolder", root=root, num_images=40, image_size=32, seed=0) == a
    assert (a / MARKER).stat().st_mtime_ns == mtime  # reused, not regenerated
    assert ensure_dataset("imagefolder", root=root, num_images=40, image_size=32, seed=1) != a
    voc = ensure_dataset("voc", root=root, num_images=4, image_size=32)
    assert voc.name == "VOCdevkit" and (voc / "VOC2007" / "Annotations").is_dir()
    monkeypatch.setenv("MOCO_ZOO_DATA", str(tmp_path / "env"))
    c = ensure_dataset("coco", num_images=2, image_size=32)
    assert c.parent == tmp_path / "env" and (c / "annotations" / "instances_val2017.json").is_file()
    with pytest.raises(ValueError, match="unknown dataset kind"):
        ensure_dataset("imagenet", root=root)
    with pytest.raises(ValueError, match="bad parameters"):
        ensure_dataset("coco", root=root, num_imgs=3)
