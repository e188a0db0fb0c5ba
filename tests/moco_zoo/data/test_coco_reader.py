"""COCO reader: validation errors naming the file and annotation id, and the CocoInstances dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from moco_zoo.data.coco import CocoFormatError, CocoInstances, validate_coco_json


def base_dataset():
    h, w = 40, 60
    crowd = np.zeros((h, w), np.uint8, order="F")
    crowd[30:40, 0:20] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "images": [{"id": 7, "width": w, "height": h, "file_name": "7.jpg"},
                   {"id": 9, "width": w, "height": h, "file_name": "9.jpg"}],
        "categories": [{"id": 3, "name": "circle"}, {"id": 1, "name": "square"}],  # unsorted on purpose
        "annotations": [
            {"id": 100, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200.0, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 101, "image_id": 7, "category_id": 1, "bbox": [0, 30, 20, 10], "area": 200.0, "iscrowd": 1,
             "segmentation": rle},
            {"id": 102, "image_id": 7, "category_id": 1, "bbox": [40, 0, 20, 40], "area": 800.0, "iscrowd": 0,
             "segmentation": [[40, 0, 60, 0, 60, 40, 40, 40]]},
        ],
    }


def write(root: Path, data, split="val2017") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    for img in data["images"]:
        Image.fromarray(np.full((img["height"], img["width"], 3), 200, np.uint8)).save(root / split / img["file_name"])
    return path


def test_valid_file_passes(tmp_path):
    path = write(tmp_path, base_dataset())
    assert len(validate_coco_json(path)["annotations"]) == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"][1].update(area=-5.0), r"annotation id 101: area -5.0 must be a positive number"),
    (lambda d: d["annotations"][0].update(area=0), r"annotation id 100: area 0 must be a positive number"),
    (lambda d: d["annotations"][2].update(bbox=[50, 0, 20, 40]), r"annotation id 102: bbox .* lies outside image id 7"),
    (lambda d: d["annotations"][0].update(category_id=5), r"annotation id 100: unknown category id 5"),
    (lambda d: d["annotations"][0].update(image_id=8), r"annotation id 100: unknown image id 8"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotation id 100: missing key 'bbox'"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), r"annotation id 100: segmentation polygon #0 has an odd"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), r"annotation id 100: segmentation has no polygon"),
    (lambda d: d["annotations"][1]["segmentation"].update(size=[10, 10]), r"annotation id 101: RLE size"),
    (lambda d: d["annotations"][0].update(segmentation="x"), r"annotation id 100: segmentation must be"),
    (lambda d: d.pop("categories"), r"missing top-level key 'categories'"),
])
def test_errors_name_file_and_annotation(tmp_path, mutate, message):
    data = base_dataset()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(CocoFormatError, match=message) as e:
        validate_coco_json(path)
    assert str(path) in str(e.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(CocoFormatError, match="COCO annotation file not found") as e:
        validate_coco_json(tmp_path / "instances_val2017.json")
    assert "instances_val2017.json" in str(e.value)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(CocoFormatError, match="x.json: not valid JSON"):
        validate_coco_json(tmp_path / "x.json")
    with pytest.raises(CocoFormatError, match="annotation file not found"):
        (tmp_path / "val2017").mkdir()
        CocoInstances(tmp_path, "val2017")


def test_dataset_targets(tmp_path):
    write(tmp_path, base_dataset())
    ds = CocoInstances(tmp_path, "val2017")
    assert ds.ids == [7, 9] and ds.class_names == ["square", "circle"]  # sorted by category id
    assert ds.cat_ids == {1: 1, 2: 3} and ds.label_of == {1: 1, 3: 2}
    img, t = ds[0]
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32 and img.max() <= 1
    assert t["image_id"] == 7 and t["orig_size"].tolist() == [40, 60]
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [0, 30, 20, 40], [40, 0, 60, 40]]
    assert t["labels"].tolist() == [2, 1, 1] and t["iscrowd"].tolist() == [0, 1, 0]
    assert t["area"].tolist() == [200, 200, 800]
    m = t["masks"]
    assert m.shape == (3, 40, 60) and m.dtype == torch.uint8
    assert m[1].sum() == 200 and m[1][35, 5] == 1  # the crowd RLE decoded
    assert m[2][20, 50] == 1 and m[0][10, 20] == 1 and m[0][30, 5] == 0
    img, t = ds[1]  # no annotations
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 40, 60) and t["labels"].shape == (0,)
    assert CocoInstances(tmp_path, "val2017", remove_images_without_annotations=True).ids == [7]
    assert "masks" not in CocoInstances(tmp_path, "val2017", with_masks=False)[0][1]


def test_dataset_validates_on_construction(tmp_path):
    data = base_dataset()
    data["annotations"][2]["area"] = -1
    path = write(tmp_path, data)
    with pytest.raises(CocoFormatError, match="annotation id 102: area -1") as e:
        CocoInstances(tmp_path, "val2017")
    assert str(path) in str(e.value)


def _synthetic_writer_available() -> bool:
    import moco_zoo.data as d

    return hasattr(d, "write_coco")


@pytest.mark.skipif(not _synthetic_writer_available(), reason="synthetic COCO writer not available yet")
def test_reads_synthetic_coco(synthetic_coco):
    for split in ("train2017", "val2017"):
        validate_coco_json(synthetic_coco / "annotations" / f"instances_{split}.json")
        ds = CocoInstances(synthetic_coco, split)
        assert len(ds) > 0 and len(ds.class_names) >= 8
    ds = CocoInstances(synthetic_coco, "train2017")
    crowd_seen = False
    for i in range(min(len(ds), 10)):
        img, t = ds[i]
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, *img.shape[1:])
        assert (t["labels"] >= 1).all() and (t["labels"] <= len(ds.class_names)).all()
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        crowd_seen |= bool(t["iscrowd"].any())
        for j in range(n):  # masks agree with boxes roughly (mask pixels inside the box, slack 1 px)
            ys, xs = torch.nonzero(t["masks"][j], as_tuple=True)
            if len(xs):
                assert xs.min() >= t["boxes"][j, 0] - 1 and xs.max() <= t["boxes"][j, 2] + 1
