"""`moco-zoo make-data` through moco_zoo.cli.main."""
from __future__ import annotations

import json

import pytest
import torchvision

from moco_zoo.cli import main
from moco_zoo.data import CLASSES
from moco_zoo.data.writers import MARKER


def test_make_data_imagefolder(tmp_path, capsys):
    out = tmp_path / "if"
    assert main(["make-data", "imagefolder", "--out", str(out), "--num-images", "40", "--image-size", "32"]) == 0
    assert str(out) in capsys.readouterr().out
    ds = torchvision.datasets.ImageFolder(str(out / "train"))
    assert ds.classes == sorted(CLASSES) and len(ds) == 30


def test_make_data_voc_and_coco(tmp_path):
    voc = tmp_path / "voc"
    assert main(["make-data", "voc", "--out", str(voc), "--num-images", "4", "--image-size", "48", "--voc2012",
                 "--seed", "3"]) == 0
    assert (voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").is_file()
    assert json.loads((voc / MARKER).read_text())["seed"] == 3
    coco = tmp_path / "coco"
    assert main(["make-data", "coco", "--out", str(coco), "--num-images", "4", "--image-size", "48"]) == 0
    assert (coco / "annotations" / "instances_train2017.json").is_file()
    # non-empty without --overwrite: clear error, exit code 2, nothing changed
    before = sorted(p.name for p in coco.rglob("*"))
    assert main(["make-data", "coco", "--out", str(coco), "--num-images", "2", "--image-size", "48"]) == 2
    assert sorted(p.name for p in coco.rglob("*")) == before
    assert main(["make-data", "coco", "--out", str(coco), "--num-images", "2", "--image-size", "48",
                 "--overwrite"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["make-data", "coco", "--num-images", "0"], "num_images must be >= 1"),
    (["make-data", "coco", "--num-images", "-5"], "num_images must be >= 1"),
    (["make-data", "voc", "--image-size", "4"], "image_size"),
    (["make-data", "coco", "--voc2012"], "--voc2012 only applies"),
])
def test_make_data_bad_arguments(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "make-data: error:" in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_make_data_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["make-data", "imagenet", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
