"""VOC detection AP: hand-computed cases, and agreement with pycocotools where the definitions coincide."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from moco_zoo.transfer.evaluation.voc import VOCEvaluator, box_iou_numpy, evaluate_voc, voc_ap


def gt(boxes, labels, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64)
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool)
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


def det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.int64)}


def shift(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


G1, G2, G3 = [0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]


def test_iou_has_no_plus_one():
    # Two 10x10 boxes overlapping on a 5x10 strip: IoU = 50 / 150.
    assert box_iou_numpy([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(1 / 3)
    assert box_iou_numpy([[0, 0, 10, 10]], [[10, 0, 20, 10]])[0, 0] == 0.0  # touching edges: no overlap


def test_perfect_detections_give_100():
    gts = {0: gt([G1, G2], [1, 2]), 1: gt([G3], [1])}
    dets = {0: det([G1, G2], [0.9, 0.8], [1, 2]), 1: det([G3], [0.7], [1])}
    r = evaluate_voc(dets, gts, ["a", "b"])
    for key in ("AP50", "AP", "AP75", "AP50_area", "AP_area", "AP75_area"):
        assert r[key] == pytest.approx(100.0), key
    assert r["per_class"]["a"]["AP50"] == pytest.approx(100.0)
    assert r["per_class"]["a"]["npos"] == 2


def test_empty_detections_give_0():
    gts = {0: gt([G1, G2], [1, 2]), 1: gt([G3], [1])}
    r = evaluate_voc({}, gts, ["a", "b"])
    assert r["AP50"] == 0.0 and r["AP"] == 0.0 and r["AP50_area"] == 0.0
    r = evaluate_voc({0: det(np.zeros((0, 4)), [], []), 1: det(np.zeros((0, 4)), [], [])}, gts, ["a", "b"])
    assert r["AP50"] == 0.0 and r["num_detections"] == 0


def test_duplicate_detection_is_false_positive():
    gts = {0: gt([G1], [1])}
    # Highest-scoring duplicate comes first: TP then FP -> precision stays 1 up to recall 1 -> AP 100.
    r = evaluate_voc({0: det([G1, G1], [0.9, 0.8], [1, 1])}, gts, ["a"])
    assert r["AP50"] == pytest.approx(100.0)
    # A duplicate matched to an already-claimed box counts as FP: with two GTs and the duplicate scored above the
    # second true box: TP, FP, TP -> rec 1/2, 1/2, 1; prec 1, 1/2, 2/3.
    # 11-point: recall levels 0..0.5 (6 levels) -> 1; 0.6..1.0 (5 levels) -> 2/3; AP = (6 + 5 * 2/3) / 11 = 28/33.
    gts = {0: gt([G1, G2], [1, 1])}
    r = evaluate_voc({0: det([G1, shift(G1, 1), G2], [0.9, 0.8, 0.7], [1, 1, 1])}, gts, ["a"])
    assert r["AP50"] == pytest.approx(100 * 28 / 33)
    # area: 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert r["AP50_area"] == pytest.approx(100 * 5 / 6)


def test_difficult_boxes_are_ignored():
    # One normal and one difficult GT. Detecting the difficult one neither helps nor hurts; npos counts 1.
    gts = {0: gt([G1, G2], [1, 1], difficult=[False, True])}
    for dets in ({0: det([G1], [0.9], [1])},
                 {0: det([G2, G1], [0.95, 0.9], [1, 1])},       # difficult matched first: ignored, not FP
                 {0: det([G1, G2, G2], [0.9, 0.8, 0.7], [1, 1, 1])}):  # duplicates on a difficult box: ignored
        r = evaluate_voc(dets, gts, ["a"])
        assert r["AP50"] == pytest.approx(100.0)
        assert r["per_class"]["a"]["npos"] == 1
    # Missing the difficult box costs nothing; missing the normal one gives 0.
    r = evaluate_voc({0: det([G2], [0.9], [1])}, gts, ["a"])
    assert r["AP50"] == 0.0
    # A class whose only GT is difficult has undefined AP and is excluded from the mean.
    gts = {0: gt([G1, G2], [1, 2], difficult=[False, True])}
    r = evaluate_voc({0: det([G1], [0.9], [1])}, gts, ["a", "b"])
    assert r["per_class"]["b"]["AP50"] is None
    assert r["AP50"] == pytest.approx(100.0) and r["num_classes_evaluated"] == 1


def test_worked_example_by_hand():
    # One class, npos = 3 (g1, g2 in image 0; g3 in image 1). Detections in score order:
    #   d1 .9 on g1 -> TP;  d2 .8 on nothing -> FP;  d3 .7 on g3 -> TP;  d4 .6 duplicate of g1 -> FP;  d5 .5 on g2 -> TP
    #   cum TP 1 1 2 2 3, cum FP 0 1 1 2 2
    #   recall    1/3 1/3 2/3 2/3 1
    #   precision 1   1/2 2/3 1/2 3/5
    # 11-point: levels 0, .1, .2, .3 -> max prec at rec >= t = 1; .4, .5, .6 -> 2/3; .7, .8, .9, 1 -> 3/5
    #   AP = (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11 = 0.763636...
    # area: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 3/5 on (2/3, 1] -> 1/3 + 2/9 + 1/5 = 34/45 = 0.755555...
    gts = {0: gt([G1, G2], [1, 1]), 1: gt([G3], [1])}
    dets = {0: det([G1, [100, 100, 110, 110], shift(G1, 0.5), G2], [0.9, 0.8, 0.6, 0.5], [1, 1, 1, 1]),
            1: det([G3], [0.7], [1])}
    r = evaluate_voc(dets, gts, ["a"])
    assert r["AP50"] == pytest.approx(100 * 8.4 / 11)
    assert r["AP50_area"] == pytest.approx(100 * 34 / 45)
    # The same curve through voc_ap directly.
    rec = np.array([1, 1, 2, 2, 3]) / 3
    prec = np.array([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(8.4 / 11)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(34 / 45)


def test_iou_thresholds_ap_and_ap75():
    # A detection with IoU 0.6 (10x10 GT, box shifted so intersection/union = 0.6 -> shift s: (10-s)/(10+s) = .6,
    # s = 2.5) is a TP at IoU .50 and .55, a FP from .60 on (VOC uses strict IoU > t).
    gts = {0: gt([G1], [1])}
    r = evaluate_voc({0: det([shift(G1, 2.5)], [0.9], [1])}, gts, ["a"])
    assert r["AP50"] == pytest.approx(100.0)
    assert r["AP75"] == 0.0
    assert r["AP"] == pytest.approx(100.0 * 2 / 10)  # 2 of the 10 thresholds (.50, .55)
    assert r["AP_area"] == pytest.approx(100.0 * 2 / 10)


def test_bad_inputs_are_reported():
    gts = {0: gt([G1], [1])}
    with pytest.raises(KeyError, match="without ground truth"):
        evaluate_voc({7: det([G1], [0.9], [1])}, gts, ["a"])
    with pytest.raises(ValueError, match="labels must be in 1..1"):
        evaluate_voc({0: det([G1], [0.9], [0])}, gts, ["a"])


def test_evaluator_accumulates_batches_and_torch_inputs():
    gts = {0: gt([G1, G2], [1, 2]), 1: gt([G3], [1]), 2: gt([G2], [2])}
    ev = VOCEvaluator(gts, ["a", "b"])
    t = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    ev.update([0], [{"boxes": t([G1, G2]), "scores": t([0.9, 0.8]), "labels": t([1, 2], torch.int64)}])
    ev.update([torch.tensor(1)], [{"boxes": t([G3]), "scores": t([0.7]), "labels": t([1], torch.int64)}])
    r = ev.evaluate()
    # Image 2 was never passed to update(): it is not part of the evaluated set.
    assert r["num_images"] == 2 and r["AP50"] == pytest.approx(100.0)
    with pytest.raises(KeyError):
        ev.update([99], [{"boxes": t([G1]), "scores": t([0.5]), "labels": t([1], torch.int64)}])


def _cells(rng, n_images, n_classes):
    """Random GTs on a grid of disjoint 40 px cells and detections that only overlap their own cell's box, so VOC's
    "max-IoU box" matching and COCO's "best unmatched box" matching pick the same pairs."""
    gts, dets = {}, {}
    for i in range(n_images):
        gboxes, glabels, dboxes, dscores, dlabels = [], [], [], [], []
        for cell in range(9):
            cx, cy = (cell % 3) * 40, (cell // 3) * 40
            if rng.random() < 0.6:
                w, h = rng.uniform(14, 22, size=2)
                x0, y0 = cx + rng.uniform(4, 10), cy + rng.uniform(4, 10)
                label = int(rng.integers(1, n_classes + 1))
                gboxes.append([x0, y0, x0 + w, y0 + h])
                glabels.append(label)
                for _ in range(int(rng.integers(0, 3))):  # 0-2 detections near it, some with a wrong label
                    j = rng.uniform(-3.5, 3.5, size=4)
                    dboxes.append([x0 + j[0], y0 + j[1], x0 + w + j[2], y0 + h + j[3]])
                    dscores.append(rng.random())
                    dlabels.append(label if rng.random() < 0.8 else int(rng.integers(1, n_classes + 1)))
            elif rng.random() < 0.5:  # a false positive in an empty cell
                dboxes.append([cx + 5, cy + 5, cx + 30, cy + 30])
                dscores.append(rng.random())
                dlabels.append(int(rng.integers(1, n_classes + 1)))
        gts[i] = gt(np.array(gboxes).reshape(-1, 4), glabels)
        dets[i] = det(np.array(dboxes).reshape(-1, 4), dscores, dlabels)
    return gts, dets


def _pycocotools_ap(gts, dets, n_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in gts]
    anns, k = [], 1
    for i, g in gts.items():
        for b, l in zip(g["boxes"].tolist(), g["labels"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": k, "image_id": i, "category_id": l, "bbox": [b[0], b[1], w, h], "area": w * h,
                         "iscrowd": 0})
            k += 1
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": str(c)} for c in range(1, n_classes + 1)]}
    results = [{"image_id": i, "category_id": int(l), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
               for i, d in dets.items() for b, s, l in zip(d["boxes"].tolist(), d["scores"], d["labels"])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100 * ev.stats[0], 100 * ev.stats[1], 100 * ev.stats[2]


def test_perfect_detections_agree_exactly_with_pycocotools():
    # All TPs ranked above all FPs: precision 1 up to recall 1 -> 100 under every interpolation.
    rng = np.random.default_rng(0)
    gts, _ = _cells(rng, 6, 3)
    dets = {i: det(g["boxes"], np.linspace(0.9, 0.5, len(g["labels"])), g["labels"]) for i, g in gts.items()}
    dets[0] = det(np.concatenate([dets[0]["boxes"], [[150, 150, 170, 170]]]),
                  np.concatenate([dets[0]["scores"], [0.01]]), np.concatenate([dets[0]["labels"], [1]]))
    ap, ap50, ap75 = _pycocotools_ap(gts, dets, 3)
    r = evaluate_voc(dets, gts, ["a", "b", "c"])
    assert ap == pytest.approx(100.0) and r["AP_area"] == pytest.approx(ap)
    assert r["AP50_area"] == pytest.approx(ap50) and r["AP75_area"] == pytest.approx(ap75)


def test_area_ap_agrees_with_pycocotools_within_interpolation_error():
    # Same matching (disjoint cells, see _cells), no difficult boxes; the only remaining difference is how the
    # precision envelope is integrated: pycocotools averages it at 101 recall points, VOC2010+ takes the exact area
    # under it. For a monotone envelope in [0, 1] the two differ by at most ~1/100, i.e. 1 AP point, so we compare
    # with tolerance 1.0 (and check that the difference is not zero by accident of a degenerate case).
    rng = np.random.default_rng(1)
    gts, dets = _cells(rng, 25, 3)
    ap, ap50, ap75 = _pycocotools_ap(gts, dets, 3)
    r = evaluate_voc(dets, gts, ["a", "b", "c"])
    assert 20 < ap50 < 95  # a non-trivial PR curve
    assert r["AP50_area"] == pytest.approx(ap50, abs=1.0)
    assert r["AP75_area"] == pytest.approx(ap75, abs=1.0)
    assert r["AP_area"] == pytest.approx(ap, abs=1.0)
