"""VOC readers: XML parsing (box convention, difficult), datasets, segmentation PNGs, and clear errors on bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_zoo.data.voc import (VOC_CLASSES, VOCDetection, VOCFormatError, VOCSegmentation, parse_voc_xml,
                               read_class_list, read_segmentation_png, voc_palette)

OBJ = """<object><name>{name}</name><truncated>{trunc}</truncated><difficult>{diff}</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def xml(objects, width=64, height=48, filename="a.jpg"):
    objs = "".join(OBJ.format(**{"trunc": 0, "diff": 0, **o}) for o in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


def write_devkit(root: Path, classes=("circle", "square"), with_classes_txt=True) -> Path:
    """A two-image VOC2007 devkit written by hand (independent of the synthetic writers)."""
    dk = root / "VOCdevkit"
    base = dk / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if with_classes_txt:
        (dk / "classes.txt").write_text("\n".join(classes) + "\n")
    anns = {
        "000001": [dict(name=classes[0], x0=1, y0=1, x1=10, y1=20), dict(name=classes[1], x0=30, y0=5, x1=64, y1=48, diff=1)],
        "000002": [dict(name=classes[1], x0=5, y0=6, x1=7, y1=8, trunc=1)],
    }
    for vid, objs in anns.items():
        (base / "Annotations" / f"{vid}.xml").write_text(xml(objs, filename=f"{vid}.jpg"))
        Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(base / "JPEGImages" / f"{vid}.jpg")
        mask = np.zeros((48, 64), np.uint8)
        mask[0:20, 0:10] = 1
        mask[20, :] = 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(voc_palette().ravel().tolist())
        png.save(base / "SegmentationClass" / f"{vid}.png")
    (base / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    (base / "ImageSets/Main/test.txt").write_text("000002\n")
    (base / "ImageSets/Segmentation/train.txt").write_text("000001\n000002\n")
    return dk


def test_voc_classes_standard_order():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person" and VOC_CLASSES[-1] == "tvmonitor"


def test_parse_converts_to_zero_based_continuous_boxes(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(xml([dict(name="cat", x0=1, y0=2, x1=64, y1=48, diff=1, trunc=1), dict(name="dog", x0=3, y0=3, x1=3, y1=3)]))
    ann = parse_voc_xml(p, VOC_CLASSES)
    assert ann["width"] == 64 and ann["height"] == 48 and ann["filename"] == "a.jpg"
    np.testing.assert_array_equal(ann["boxes"], [[0, 1, 64, 48], [2, 2, 3, 3]])  # a 1-pixel box has width 1
    assert ann["boxes"].dtype == np.float32 and ann["labels"].dtype == np.int64
    assert ann["labels"].tolist() == [VOC_CLASSES.index("cat") + 1, VOC_CLASSES.index("dog") + 1]
    assert ann["difficult"].tolist() == [True, False] and ann["truncated"].tolist() == [True, False]


def test_parse_no_objects(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(xml([]))
    ann = parse_voc_xml(p, VOC_CLASSES)
    assert ann["boxes"].shape == (0, 4) and ann["labels"].shape == (0,)


@pytest.mark.parametrize("objects, message", [
    ([dict(name="cat", x0=1, y0=1, x1=5, y1=5), dict(name="zebra", x0=1, y0=1, x1=5, y1=5)],
     r"object #1: class 'zebra' is not in the class list"),
    ([dict(name="cat", x0=1, y0=1, x1=5, y1=5), dict(name="cat", x0=10, y0=10, x1=65, y1=20)],
     r"object #1 \(cat\): box .*xmax=65.* lies outside the 64x48 image"),
    ([dict(name="cat", x0=10, y0=1, x1=5, y1=5)], r"object #0 \(cat\): degenerate box"),
])
def test_parse_errors_name_file_and_object(tmp_path, objects, message):
    p = tmp_path / "bad.xml"
    p.write_text(xml(objects))
    with pytest.raises(VOCFormatError, match=message) as e:
        parse_voc_xml(p, VOC_CLASSES)
    assert str(p) in str(e.value)


def test_parse_missing_and_malformed(tmp_path):
    with pytest.raises(VOCFormatError, match="annotation file not found") as e:
        parse_voc_xml(tmp_path / "nope.xml", VOC_CLASSES)
    assert "nope.xml" in str(e.value)
    p = tmp_path / "broken.xml"
    p.write_text("<annotation><size>")
    with pytest.raises(VOCFormatError, match="broken.xml: malformed XML"):
        parse_voc_xml(p, VOC_CLASSES)
    p.write_text("<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(VOCFormatError, match="missing <size>"):
        parse_voc_xml(p, VOC_CLASSES)


def test_class_list(tmp_path):
    assert read_class_list(tmp_path) == list(VOC_CLASSES)
    (tmp_path / "classes.txt").write_text("a\nb\n\n")
    assert read_class_list(tmp_path) == ["a", "b"]


def test_detection_dataset_on_hand_written_devkit(tmp_path):
    dk = write_devkit(tmp_path)
    ds = VOCDetection(dk, image_sets=[("2007", "trainval")])
    assert ds.class_names == ["circle", "square"] and len(ds) == 2
    assert ds.ids == [("2007", "000001"), ("2007", "000002")]
    img, tgt = ds[0]
    assert img.shape == (3, 48, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert tgt["boxes"].tolist() == [[0, 0, 10, 20], [29, 4, 64, 48]]
    assert tgt["labels"].tolist() == [1, 2] and tgt["difficult"].tolist() == [False, True]
    assert tgt["image_id"] == 0 and tgt["orig_size"].tolist() == [48, 64]
    no_diff = VOCDetection(dk, image_sets="2007-trainval", keep_difficult=False)
    assert no_diff[0][1]["labels"].tolist() == [1]
    gts = ds.ground_truths()
    assert set(gts) == {0, 1} and gts[1]["labels"].tolist() == [2]

    seen = []
    ds_t = VOCDetection(dk, image_sets=[("2007", "test")], transforms=lambda i, t: (seen.append(1) or i * 0, t))
    assert ds_t[0][0].sum() == 0 and seen


def test_detection_dataset_errors(tmp_path):
    dk = write_devkit(tmp_path)
    with pytest.raises(VOCFormatError, match=r"VOC2012.*ImageSets.*Main.*trainval.txt: image-set file not found"):
        VOCDetection(dk)  # default image sets include VOC2012 trainval, absent here
    (dk / "VOC2007/Annotations/000002.xml").unlink()
    with pytest.raises(VOCFormatError, match=r"000002.xml: annotation file not found"):
        VOCDetection(dk, image_sets=[("2007", "trainval")])
    (dk / "VOC2007/Annotations/000002.xml").write_text(xml([dict(name="triangle", x0=1, y0=1, x1=5, y1=5)]))
    with pytest.raises(VOCFormatError, match=r"000002.xml: object #0: class 'triangle' is not in the class list"):
        VOCDetection(dk, image_sets=[("2007", "trainval")])


def test_segmentation_dataset_and_png(tmp_path):
    dk = write_devkit(tmp_path)
    ds = VOCSegmentation(dk, image_sets=[("2007", "train")])
    assert ds.num_classes == 3 and len(ds) == 2
    img, mask = ds[0]
    assert img.shape == (3, 48, 64) and mask.shape == (48, 64) and mask.dtype == torch.int64
    assert mask[0, 0] == 1 and mask[20, 5] == 255 and mask[40, 40] == 0
    # An RGB-coloured mask reads back to the same indices through the VOC palette.
    p = dk / "VOC2007/SegmentationClass/000001.png"
    rgb = voc_palette()[np.array(Image.open(p))]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_segmentation_png(tmp_path / "rgb.png"), np.array(Image.open(p)))
    # A class index beyond the class list is reported with the file and the pixel.
    bad = np.zeros((48, 64), np.uint8)
    bad[3, 7] = 9
    Image.fromarray(bad, mode="L").save(p)
    with pytest.raises(VOCFormatError, match=r"000001.png: pixel \(x=7, y=3\) has class index 9"):
        ds[0]


def test_palette_is_standard():
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]


def _synthetic_writer_available() -> bool:
    import moco_zoo.data as d

    return hasattr(d, "write_voc")


@pytest.mark.skipif(not _synthetic_writer_available(), reason="synthetic VOC writer not available yet")
def test_reads_synthetic_voc(synthetic_voc):
    ds = VOCDetection(synthetic_voc, image_sets=[("2007", "trainval"), ("2012", "trainval")])
    assert ds.class_names == read_class_list(synthetic_voc) and len(ds) > 0
    img, tgt = ds[0]
    h, w = tgt["orig_size"].tolist()
    assert img.shape == (3, h, w)
    assert len(tgt["boxes"]) == len(tgt["labels"]) and (tgt["labels"] >= 1).all()
    assert (tgt["boxes"][:, 2:] > tgt["boxes"][:, :2]).all()
    test = VOCDetection(synthetic_voc, image_sets=[("2007", "test")])
    assert len(test) > 0
    seg = VOCSegmentation(synthetic_voc, image_sets=[("2007", "train")])
    img, mask = seg[0]
    assert mask.shape == img.shape[1:]
    vals = set(mask.unique().tolist())
    assert vals <= set(range(seg.num_classes)) | {255}
