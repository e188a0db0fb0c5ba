"""moco_zoo.transfer.evaluation.object_knn / transfer/voc_object_knn.py: crops are the annotated boxes' pixels, the kNN probe
finds every object when the memory holds the same objects, and the CLI writes its table or names the bad input."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from moco_zoo.data.voc import VOCDetection
from moco_zoo.transfer.evaluation.object_knn import crop_batches, main, object_crops, object_knn
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD


def _objects_from_xml(devkit, year="2007", split="test"):
    """(voc_id, class name, xmin, ymin, xmax, ymax) of every non-difficult object, read with ElementTree."""
    root = devkit / f"VOC{year}"
    out = []
    for vid in (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
        for obj in ET.parse(root / "Annotations" / f"{vid}.xml").findall("object"):
            if obj.findtext("difficult", "0").strip() == "1":
                continue
            b = obj.find("bndbox")
            out.append((vid, obj.findtext("name"), *(int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return out


def test_crops_are_the_annotated_boxes(synthetic_voc):
    ds = VOCDetection(synthetic_voc, ("2007", "test"))
    x, y = map(torch.cat, zip(*crop_batches(ds, crop_size=32, batch_size=5)))
    assert len(list(object_crops(ds, 32))) == len(y)
    expected = _objects_from_xml(synthetic_voc)
    assert x.shape == (len(expected), 3, 32, 32)
    assert [ds.class_names[i] for i in y.tolist()] == [name for _, name, *_ in expected]
    for j in (0, len(expected) // 2, len(expected) - 1):  # VOC boxes are 1-based inclusive pixel indices
        vid, _, x0, y0, x1, y1 = expected[j]
        img = Image.open(synthetic_voc / "VOC2007" / "JPEGImages" / f"{vid}.jpg").convert("RGB")
        ref = np.asarray(img.crop((x0 - 1, y0 - 1, x1, y1)).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
        ours = (x[j] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        assert np.abs(ours.permute(1, 2, 0).numpy() - ref).mean() < 0.02


def test_knn_finds_every_object_in_its_own_memory(synthetic_voc):
    ds = VOCDetection(synthetic_voc, ("2007", "test"))
    torch.manual_seed(0)
    res = object_knn(torchvision.models.resnet18(), ds, ds, crop_size=32, k=1, batch_size=8)
    assert res["knn_top1"] == 100.0 and res["train_objects"] == res["test_objects"] == len(list(object_crops(ds, 32)))
    other = VOCDetection(synthetic_voc, ("2007", "trainval"))  # other objects: kNN is no longer exact
    assert object_knn(torchvision.models.resnet18(), other, ds, crop_size=32, k=1)["knn_top1"] < 100.0


def test_cli_writes_one_row_per_weights(synthetic_voc, tmp_path):
    torch.manual_seed(1)
    weights = tmp_path / "r18.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")},
               weights)
    out = tmp_path / "out"
    assert main(["--data-root", str(synthetic_voc), "--weights", str(weights), "random", "--arch", "resnet18",
                 "--crop-size", "32", "--out", str(out)]) == 0
    rows = json.loads((out / "object_knn.json").read_text())
    assert [r["weights"] for r in rows] == [str(weights), "random"]
    n_test = len(_objects_from_xml(synthetic_voc))
    n_train = len(_objects_from_xml(synthetic_voc, "2007", "trainval")) + len(
        _objects_from_xml(synthetic_voc, "2012", "trainval"))
    for r in rows:
        assert r["metrics"]["test_objects"] == n_test and r["metrics"]["train_objects"] == n_train
        assert 0.0 <= r["metrics"]["knn_top1"] <= r["metrics"]["knn_top5"] <= 100.0
    assert "| random | resnet18 |" in (out / "object_knn.md").read_text()


def test_cli_names_a_missing_devkit(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path / "nope"), "--weights", "random"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
