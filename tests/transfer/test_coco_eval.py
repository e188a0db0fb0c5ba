"""CocoEvaluator: box + mask AP through pycocotools on hand-made ground truth; empty inputs; DDP gather."""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch

from moco_zoo.transfer.evaluation.coco import COCO_STAT_NAMES, CocoEvaluator, encode_masks
from moco_zoo.transfer.evaluation.voc import VOCEvaluator

H, W = 40, 60


def make_gt():
    from pycocotools.coco import COCO

    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 5, 20, 10], "area": 200.0, "iscrowd": 0,
         "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [40, 0, 20, 40], "area": 800.0, "iscrowd": 0,
         "segmentation": [[40, 0, 60, 0, 60, 40, 40, 40]]},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 30, 30], "area": 900.0, "iscrowd": 0,
         "segmentation": [[0, 0, 30, 0, 30, 30, 0, 30]]},
    ]
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.jpg"} for i in (1, 2)],
                    "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def box_mask(boxes, prob=0.9):
    m = torch.zeros(len(boxes), 1, H, W)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        m[i, 0, int(y0):int(y1), int(x0):int(x1)] = prob
    return m


def perfect_predictions():
    b1 = [[10, 5, 30, 15], [40, 0, 60, 40]]
    b2 = [[0, 0, 30, 30]]
    return {
        1: {"boxes": torch.tensor(b1, dtype=torch.float32), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 2]), "masks": box_mask(b1)},
        2: {"boxes": torch.tensor(b2, dtype=torch.float32), "scores": torch.tensor([0.7]),
            "labels": torch.tensor([1]), "masks": box_mask(b2)},
    }


def test_perfect_predictions_score_100_for_boxes_and_masks():
    ev = CocoEvaluator(make_gt(), cat_ids={1: 5, 2: 9})
    preds = perfect_predictions()
    ev.update({1: preds[1]})
    ev.update({2: preds[2]})  # batch by batch
    r = ev.evaluate()
    assert set(r) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        assert tuple(r[t]) == COCO_STAT_NAMES
        assert r[t]["AP"] == pytest.approx(100.0) and r[t]["AP50"] == pytest.approx(100.0)
        assert r[t]["AR100"] == pytest.approx(100.0)
        assert r[t]["APl"] == -1.0  # all objects are "small" (< 32^2 px): no large ones, -1 kept
    assert "Average Precision" in ev.summaries["bbox"]


def test_default_label_map_and_bool_masks():
    ev = CocoEvaluator(make_gt(), iou_types=("segm",))  # default map: sorted category ids -> 1..C
    assert ev.cat_ids == {1: 5, 2: 9}
    preds = perfect_predictions()
    for p in preds.values():
        p["masks"] = p["masks"][:, 0] > 0.5  # N x H x W bool
    ev.update(preds)
    assert ev.evaluate()["segm"]["AP"] == pytest.approx(100.0)


def test_half_of_the_objects_and_subset_evaluation():
    preds = perfect_predictions()
    ev = CocoEvaluator(make_gt(), iou_types=("bbox",), cat_ids={1: 5, 2: 9})
    ev.update({2: preds[2]})  # only image 2 is evaluated: a single perfect detection
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
    ev = CocoEvaluator(make_gt(), iou_types=("bbox",), cat_ids={1: 5, 2: 9})
    ev.update({1: {k: v[:1] for k, v in preds[1].items()}, 2: preds[2]})  # class b never detected
    r = ev.evaluate()["bbox"]
    assert r["AP"] == pytest.approx(50.0)  # class a: 100, class b: 0


def test_zero_detections_do_not_crash():
    ev = CocoEvaluator(make_gt(), cat_ids={1: 5, 2: 9})
    r = ev.evaluate()  # nothing at all
    assert all(v == -1.0 for t in r.values() for v in t.values())
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 1, H, W)}
    ev.update({1: empty, 2: empty})
    r = ev.evaluate()
    for t in ("bbox", "segm"):
        assert r[t]["AP"] == 0.0 and r[t]["AR100"] == 0.0 and r[t]["APl"] == -1.0


def test_bad_predictions_are_reported():
    ev = CocoEvaluator(make_gt(), cat_ids={1: 5, 2: 9})
    with pytest.raises(KeyError, match="image id 3"):
        ev.update({3: perfect_predictions()[1]})
    p = perfect_predictions()[1]
    p["labels"] = torch.tensor([1, 7])
    with pytest.raises(ValueError, match=r"labels \[7\] have no COCO category id"):
        ev.update({1: p})
    p = perfect_predictions()[1]
    p["masks"] = torch.zeros(2, 1, 10, 10)
    with pytest.raises(ValueError, match="mask size"):
        ev.update({1: p})
    with pytest.raises(ValueError, match="absent from the ground truth"):
        CocoEvaluator(make_gt(), cat_ids={1: 5, 2: 4})


def test_encode_masks_threshold():
    m = torch.tensor([[[[0.2, 0.6], [0.51, 0.5]]]])
    from pycocotools import mask as mask_utils

    rle = encode_masks(m)[0]
    rle["counts"] = rle["counts"].encode("ascii")
    np.testing.assert_array_equal(mask_utils.decode(rle), [[0, 1], [1, 0]])


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        preds = perfect_predictions()
        ev = CocoEvaluator(make_gt(), cat_ids={1: 5, 2: 9})
        ev.update({1 + rank: preds[1 + rank]})  # each rank sees one image
        r = ev.evaluate()
        gts = {1: {"boxes": [[10, 5, 30, 15], [40, 0, 60, 40]], "labels": [1, 2], "difficult": [False, False]},
               2: {"boxes": [[0, 0, 30, 30]], "labels": [1], "difficult": [False]}}
        vev = VOCEvaluator(gts, ["a", "b"])
        p = preds[1 + rank]
        vev.update([1 + rank], [p])
        v = vev.evaluate()
        torch.save({"coco": r, "voc": {k: v[k] for k in ("AP50", "AP", "num_images")}}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_evaluators_gather_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert out["coco"]["bbox"]["AP"] == pytest.approx(100.0)
        assert out["coco"]["segm"]["AR100"] == pytest.approx(100.0)
        assert out["voc"]["num_images"] == 2 and out["voc"]["AP50"] == pytest.approx(100.0)
