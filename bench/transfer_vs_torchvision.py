#!/usr/bin/env python
"""Detection transfer throughput: our engine (``transfer/voc_det.py`` / ``coco_det.py``) against torchvision's own
detection reference training loop, same model, batch, image sizes and precision.

    python bench/transfer_vs_torchvision.py       # VOC R50-FPN, R18-FPN (bf16), COCO Mask R-CNN, VOC R50 fp32
    python bench/transfer_vs_torchvision.py --cases voc:resnet50:fp32,voc:resnet50:bf16 --rounds 2
    python bench/transfer_vs_torchvision.py --quick              # smoke run

"Theirs" is a harness written for this benchmark that does what ``references/detection/train.py`` +
``engine.py`` of torchvision (0.29) do, read from their source, not copied: torchvision's dataset classes
(``datasets.VOCDetection`` / ``datasets.CocoDetection``) with the reference's target conversion (COCO polygons
decoded to masks per sample, crowd annotations dropped), its ``hflip`` preset (flip the PIL image and boxes,
PIL -> uint8 tensor -> float), ``collate_fn = tuple(zip(*batch))``, a ``BatchSampler(RandomSampler)`` (aspect-ratio
grouping is a no-op on square images), SGD over ``requires_grad`` parameters with a ``LinearLR`` warmup stepped
every iteration, the ``.item()`` of the loss and its finite check, and the model built by torchvision's own
builders (``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn``, ``resnet_fpn_backbone("resnet18")``) with the
cpu preset's sizes. The reference's autocast is CUDA-only (``enabled=scaler is not None``); on CPU bf16 the harness
wraps forward + loss in ``torch.autocast("cpu", bfloat16)``, the two lines a user adds. Its test loop is
``evaluate()``: ``model.eval()`` under ``inference_mode``, batch 1, outputs to CPU, then COCO evaluation with
pycocotools. Two deliberate deviations, both in the reference's favour: COCOeval runs once at the end instead of
once per batch, and the thread count is kept (the reference drops to 1 thread while testing).

Both sides start from the same random init (the two models have identical parameter names and shapes) and test
the same weights (the first trained model of a case), since a detector's test speed depends on how many boxes pass
its score threshold. Each (case, side, round) runs in its own subprocess (its peak RSS is its own,
``ru_maxrss``): ``--warmup`` untimed iterations, ``--iters`` timed ones, then the test of ``--test-images`` images.
Rounds alternate which side goes first. Ratios are ours / theirs of the per-side medians over rounds, from
wall-clock time and from the process's CPU time (with ``--threads 1`` the CPU time is the work done, much less
sensitive to other jobs on a shared machine).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import _common as C

TASKS = {"voc": "voc_det", "coco": "coco_det"}


def _resolve_cfg(spec: Dict[str, Any]):
    from moco_zoo.transfer import config as cfglib

    task = TASKS[spec["dataset"]]
    overrides = {"arch": spec["arch"], "precision": spec["precision"], "threads": spec.get("threads"),
                 "workers": spec["workers"]}
    sets: Dict[str, Any] = {"checkpoint_period": 10 ** 9, "log_period": 10 ** 9, "precise_bn_iters": 0,
                            "iters": spec["warmup"], "max_test_images": spec["test_images"], "num_vis": 0}
    if task == "voc_det":
        sets.update(detector="fpn", train_sets=["2007-trainval", "2012-trainval"])
    for key, value in (spec.get("sets") or {}).items():
        sets[key] = value
    return cfglib.resolve(task, "cpu", None, overrides, sets)


# ---------------------------------------------------------------------------------------------------- ours
def worker_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from moco_zoo.transfer.engine import TransferRun
    from moco_zoo.transfer.engine.trainer import Checkpointer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = _resolve_cfg(spec)
    with tempfile.TemporaryDirectory() as out:
        run = TransferRun(cfg, "random", spec["data_root"], out)
        run.setup()
        run.model.load_state_dict(torch.load(spec["init_path"], weights_only=True))  # the same init on both sides
        # checkpoints are not part of an iteration (the reference saves once per epoch): timing the loop only
        run.trainer.hooks = [h for h in run.trainer.hooks if not isinstance(h, Checkpointer)]
        params = sum(p.numel() for p in run.model.parameters())
        run.trainer.train()  # warm-up iterations
        run.trainer.max_iter = spec["warmup"] + spec["iters"]
        before = run.trainer.train_seconds
        c0 = time.process_time()
        run.trainer.train()  # timed iterations (train_seconds is the loop alone)
        train_cpu = time.process_time() - c0
        seconds = run.trainer.train_seconds - before
        train_rss = C.peak_rss_mb()
        _shared_test_weights(run.model, spec["test_path"])
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = run.evaluate()
        test_s, test_cpu = time.perf_counter() - t0, time.process_time() - c0
        n_test = metrics["num_test_images"]
    return {"train_s": seconds, "test_s": test_s, "train_cpu_s": train_cpu, "test_cpu_s": test_cpu, "n_test": n_test,
            "batch": run.total_batch, "params": params, "train_rss_mb": train_rss}


# ---------------------------------------------------------------------------------------------------- theirs
def _reference_model(cfg, num_classes: int, arch: str):
    """The cpu preset's detector from torchvision's own builders (what the reference's ``--model`` selects)."""
    import torchvision
    from torch import nn
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    kwargs = dict(
        min_size=tuple(int(s) for s in cfg.min_size_train), max_size=int(cfg.max_size),
        rpn_anchor_generator=AnchorGenerator(tuple((int(s),) for s in cfg.anchor_sizes),
                                             (tuple(float(r) for r in cfg.anchor_ratios),) * len(cfg.anchor_sizes)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image, box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img, box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh)
    mask = bool(cfg.mask)
    if arch == "resnet50":
        build = (torchvision.models.detection.maskrcnn_resnet50_fpn if mask
                 else torchvision.models.detection.fasterrcnn_resnet50_fpn)
        return build(weights=None, weights_backbone=None, num_classes=num_classes, trainable_backbone_layers=5,
                     **kwargs)
    backbone = resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d)
    return (MaskRCNN if mask else FasterRCNN)(backbone, num_classes, **kwargs)


class _HFlipToTensor:
    """The reference's ``hflip`` preset: RandomHorizontalFlip(0.5) on the PIL image + boxes (+ masks), PILToTensor,
    ConvertImageDtype(float)."""

    def __init__(self, train: bool):
        self.train = train

    def __call__(self, image, target):
        import torch
        from torchvision.transforms import functional as F

        if self.train and torch.rand(1) < 0.5:
            image = F.hflip(image)
            w = image.width
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        image = F.convert_image_dtype(F.pil_to_tensor(image), torch.float)
        return image, target


class _VOCTargets:
    """torchvision ``VOCDetection`` sample (PIL image, parsed XML dict) -> (image, {boxes, labels}) + transform."""

    def __init__(self, dataset, class_names, transform):
        self.dataset, self.transform = dataset, transform
        self.label = {n: i + 1 for i, n in enumerate(class_names)}

    def __len__(self):
        return len(self.dataset)

    def target_of(self, ann):
        import torch

        objs = ann["annotation"].get("object", [])
        boxes = [[float(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objs]
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([self.label[o["name"]] for o in objs], dtype=torch.int64)}

    def __getitem__(self, i):
        image, ann = self.dataset[i]
        return self.transform(image, self.target_of(ann))


class _CocoTargets:
    """torchvision ``CocoDetection`` sample -> the reference's ConvertCocoPolysToMask target (crowd dropped, xyxy
    boxes clipped, masks decoded from polygons / RLE, empty boxes removed) + transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform
        self.coco = dataset.coco

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        import torch
        from pycocotools import mask as mask_utils

        image, anns = self.dataset[i]
        w, h = image.size
        anns = [a for a in anns if a.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        masks = []
        for a in anns:
            seg = a["segmentation"]
            rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else [seg]
            m = mask_utils.decode(rles)
            m = m[..., None] if m.ndim < 3 else m
            masks.append(torch.as_tensor(m, dtype=torch.uint8).any(dim=2))
        masks_t = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "labels": torch.tensor([a["category_id"] for a in anns],
                                                               dtype=torch.int64)[keep],
                  "masks": masks_t[keep].to(torch.uint8), "image_id": self.dataset.ids[i]}
        return self.transform(image, target)


def _voc_gt_coco(ds):
    """A pycocotools COCO index of a VOC test set (read from the XML only; the reference's
    ``get_coco_api_from_dataset`` loads every image as well)."""
    import xml.etree.ElementTree as ET

    from pycocotools.coco import COCO

    images, anns, k = [], [], 1
    for i in range(len(ds)):
        inner = ds.dataset
        ann = inner.parse_voc_xml(ET.parse(inner.annotations[i]).getroot())
        size = ann["annotation"]["size"]
        images.append({"id": i, "width": int(size["width"]), "height": int(size["height"])})
        t = ds.target_of(ann)
        for b, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            anns.append({"id": k, "image_id": i, "category_id": lab, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
            k += 1
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": v} for v in sorted(ds.label.values())]}
    coco.createIndex()
    return coco


def worker_theirs(spec: Dict[str, Any]) -> Dict[str, Any]:
    import contextlib
    import io
    import math

    import numpy as np
    import torch
    import torchvision
    from pycocotools.cocoeval import COCOeval
    from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, RandomSampler, SequentialSampler, Subset

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = _resolve_cfg(spec)
    torch.manual_seed(0)
    root = Path(spec["data_root"])
    n_test = int(spec["test_images"])
    if spec["dataset"] == "voc":
        from moco_zoo.data.voc import read_class_list

        names = read_class_list(root)
        parts = [_VOCTargets(torchvision.datasets.VOCDetection(str(root.parent), year=s.split("-")[0],
                                                               image_set=s.split("-")[1]), names,
                             _HFlipToTensor(True)) for s in cfg.train_sets]
        train_set = ConcatDataset(parts)
        test_full = _VOCTargets(torchvision.datasets.VOCDetection(str(root.parent), year="2007", image_set="test"),
                                names, _HFlipToTensor(False))
        test_set = Subset(test_full, range(min(n_test, len(test_full))))
        gt = _voc_gt_coco(test_full)
        num_classes = len(names) + 1
        image_ids = list(range(len(test_set)))
    else:
        def coco(split, train):
            ds = torchvision.datasets.CocoDetection(str(root / split), str(root / "annotations" /
                                                                          f"instances_{split}.json"))
            if train:  # the reference's _coco_remove_images_without_annotations (any non-crowd box with area)
                ds.ids = [i for i in ds.ids if any(a.get("iscrowd", 0) == 0 and a["bbox"][2] > 1 and a["bbox"][3] > 1
                                                   for a in ds.coco.imgToAnns.get(i, []))]
            return _CocoTargets(ds, _HFlipToTensor(train))

        train_set = coco(cfg.train_split, True)
        test_full = coco(cfg.test_split, False)
        test_set = Subset(test_full, range(min(n_test, len(test_full))))
        gt = test_full.coco
        num_classes = max(gt.cats) + 1  # the reference predicts raw COCO category ids
        image_ids = [test_full.dataset.ids[i] for i in range(len(test_set))]
    batch = int(cfg.batch_size)
    collate = lambda b: tuple(zip(*b))  # noqa: E731  (the reference's utils.collate_fn)
    loader = DataLoader(train_set, batch_sampler=BatchSampler(RandomSampler(train_set), batch, drop_last=True),
                        num_workers=int(cfg.workers), collate_fn=collate)
    test_loader = DataLoader(test_set, batch_size=1, sampler=SequentialSampler(test_set),
                             num_workers=int(cfg.workers), collate_fn=collate)
    model = _reference_model(cfg, num_classes, spec["arch"])
    model.load_state_dict(torch.load(spec["init_path"], weights_only=True))
    params_n = sum(p.numel() for p in model.parameters())
    device = torch.device("cpu")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = float(cfg.lr) * batch / float(cfg.lr_reference_batch)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay))
    warm = spec["warmup"] + spec["iters"]
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / 1000, total_iters=min(1000, warm))
    amp = {"bf16": torch.bfloat16, "fp32": None}[spec["precision"]]

    def batches():
        while True:
            yield from loader

    stream = batches()
    model.train()
    meters: Dict[str, List[float]] = {}

    def step():
        images, targets = next(stream)
        images = list(image.to(device) for image in images)
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value}")
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        lr_scheduler.step()
        for k, v in loss_dict.items():  # MetricLogger.update
            meters.setdefault(k, []).append(v.item())

    for _ in range(spec["warmup"]):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(spec["iters"]):
        step()
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    train_rss = C.peak_rss_mb()
    _shared_test_weights(model, spec["test_path"])

    t0, c0 = time.perf_counter(), time.process_time()
    model.eval()
    results = []
    with torch.inference_mode():
        for (images, targets), img_id in zip(test_loader, image_ids):
            images = list(img.to(device) for img in images)
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                outputs = model(images)
            outputs = [{k: v.to("cpu") for k, v in t.items()} for t in outputs]
            for out in outputs:  # CocoEvaluator.prepare (boxes xywh, masks RLE)
                boxes = out["boxes"].float()
                boxes[:, 2:] -= boxes[:, :2]
                for j, (b, s, lab) in enumerate(zip(boxes.tolist(), out["scores"].float().tolist(),
                                                    out["labels"].tolist())):
                    r = {"image_id": img_id, "category_id": lab, "bbox": b, "score": s}
                    if "masks" in out:
                        m = (out["masks"][j, 0] > 0.5).numpy().astype(np.uint8)
                        rle = mask_utils_encode(m)
                        r["segmentation"] = rle
                    results.append(r)
    iou_types = ["bbox", "segm"] if cfg.mask else ["bbox"]
    with contextlib.redirect_stdout(io.StringIO()):
        for iou in iou_types:
            if not results:
                break
            drop = "bbox" if iou == "segm" else "segmentation"  # loadRes takes the box branch if a box is there
            dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            ev = COCOeval(gt, dt, iou)
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    test_s, test_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"train_s": train_s, "test_s": test_s, "train_cpu_s": train_cpu, "test_cpu_s": test_cpu,
            "n_test": len(test_set), "batch": batch, "params": params_n, "train_rss_mb": train_rss}


def _shared_test_weights(model, path: str) -> None:
    """Both sides test the same weights (the speed of a detector's test depends on how many boxes pass the score
    threshold): the first trained model of a case is saved, every test loads it."""
    import torch

    if not Path(path).is_file():
        torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, weights_only=True))


def mask_utils_encode(m):
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# ---------------------------------------------------------------------------------------------------- driver
def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    res = (worker_ours if spec["side"] == "ours" else worker_theirs)(spec)
    import torch

    res.update(iters_s=spec["iters"] / res["train_s"], train_img_s=spec["iters"] * res["batch"] / res["train_s"],
               test_img_s=res["n_test"] / res["test_s"], iters_cpu_s=spec["iters"] / res["train_cpu_s"],
               test_img_cpu_s=res["n_test"] / res["test_cpu_s"], peak_rss_mb=C.peak_rss_mb(),
               threads=torch.get_num_threads())
    print("RESULT " + json.dumps(res), flush=True)
    return 0



def _write_init(dataset: str, arch: str, prec: str, data_root: str, path: str) -> None:
    """One random init for both sides (the two models have the same parameter names and shapes; checked by the
    strict load in each worker)."""
    import torch

    cfg = _resolve_cfg(dict(dataset=dataset, arch=arch, precision=prec, workers=0, warmup=1, test_images=1))
    if dataset == "voc":
        from moco_zoo.data.voc import read_class_list

        num_classes = len(read_class_list(data_root)) + 1
    else:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(Path(data_root) / "annotations" / f"instances_{cfg.test_split}.json"))
        num_classes = max(gt.cats) + 1
    torch.manual_seed(0)
    torch.save(_reference_model(cfg, num_classes, arch).state_dict(), path)


def _median(runs: List[Dict[str, Any]], key: str):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(parser, "transfer_vs_torchvision")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="voc:resnet50:bf16,voc:resnet18:bf16,coco:resnet50:bf16,voc:resnet50:fp32",
                        help="comma list of dataset:arch:precision (dataset voc or coco; coco is Mask R-CNN)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both (cpu preset: 0)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6, help="timed training iterations")
    parser.add_argument("--test-images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="synthetic images per VOC year / COCO set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for OUR side only (to measure an engine option)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    if args.quick:
        args.cases, args.warmup, args.iters, args.test_images, args.rounds = "voc:resnet18:bf16", 1, 2, 4, 1
    C.set_threads(args.threads)
    info = C.machine_info()
    C.print_header("Detection transfer: our engine vs torchvision's reference loop", info)
    from moco_zoo.data import ensure_dataset
    from moco_zoo.config import parse_overrides

    roots = {"voc": str(ensure_dataset("voc", root=C.default_data_dir(), num_images=args.images, voc2012=True)),
             "coco": str(ensure_dataset("coco", root=C.default_data_dir(), num_images=args.images))}
    ours_sets = parse_overrides(args.set) if args.set else {}
    rows: List[Dict[str, Any]] = []
    for case in [c for c in args.cases.split(",") if c]:
        dataset, arch, prec = case.split(":")
        runs: Dict[str, List[Dict[str, Any]]] = {"ours": [], "theirs": []}
        tmp = tempfile.mkdtemp(prefix="transfer_vs_tv_")
        init_path, test_path = os.path.join(tmp, "init.pt"), os.path.join(tmp, "test.pt")
        _write_init(dataset, arch, prec, roots[dataset], init_path)
        for rnd in range(args.rounds):
            order = ("ours", "theirs") if rnd % 2 == 0 else ("theirs", "ours")
            for side in order:
                spec = dict(side=side, dataset=dataset, arch=arch, precision=prec, threads=args.threads,
                            workers=args.workers, warmup=args.warmup, iters=args.iters,
                            test_images=args.test_images, data_root=roots[dataset], init_path=init_path,
                            test_path=test_path,
                            sets=ours_sets if side == "ours" else {})
                r = C.run_worker(__file__, spec, args.timeout)
                r["round"] = rnd
                runs[side].append(r)
                print(f"  {case} round {rnd} {side}: " + (r["error"] if "error" in r else
                      f"{r['iters_s']:.3f} it/s, test {r['test_img_s']:.2f} img/s, {r['peak_rss_mb']:.0f} MiB"),
                      file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model = f"{'Mask' if dataset == 'coco' else 'Faster'} R-CNN {arch.replace('resnet', 'R')}-FPN"
        for side in ("ours", "theirs"):
            ok = [r for r in runs[side] if "error" not in r]
            row = {"case": case, "model": f"{dataset.upper()} {model}", "precision": prec, "side": side,
                   "batch": ok[0]["batch"] if ok else None, "params": ok[0]["params"] if ok else None,
                   **{k: _median(ok, k) for k in ("iters_s", "train_img_s", "test_img_s", "iters_cpu_s",
                                                 "test_img_cpu_s", "train_rss_mb", "peak_rss_mb")},
                   "runs": runs[side]}
            rows.append(row)
        o, t = rows[-2], rows[-1]
        for key in ("iters_s", "test_img_s", "iters_cpu_s", "test_img_cpu_s"):
            if o[key] and t[key]:
                o[f"{key}_ratio"] = o[key] / t[key]
        if o["peak_rss_mb"] and t["peak_rss_mb"]:
            o["rss_ratio"] = o["peak_rss_mb"] / t["peak_rss_mb"]
    table = []
    for i in range(0, len(rows), 2):
        o, t = rows[i], rows[i + 1]
        table.append({"model": o["model"], "precision": o["precision"], "batch": o["batch"],
                      "ours_it": o["iters_s"], "theirs_it": t["iters_s"], "it_ratio": o.get("iters_s_ratio"),
                      "ours_test": o["test_img_s"], "theirs_test": t["test_img_s"],
                      "test_ratio": o.get("test_img_s_ratio"), "it_cpu_ratio": o.get("iters_cpu_s_ratio"),
                      "test_cpu_ratio": o.get("test_img_cpu_s_ratio"), "ours_rss": o["peak_rss_mb"],
                      "theirs_rss": t["peak_rss_mb"]})
    print(C.markdown_table(table, ["model", "precision", "batch", "ours_it", "theirs_it", "it_ratio", "ours_test",
                                   "theirs_test", "test_ratio", "it_cpu_ratio", "test_cpu_ratio", "ours_rss",
                                   "theirs_rss"],
                           ["model", "precision", "batch", "ours it/s", "torchvision ref it/s", "ratio",
                            "ours test img/s", "ref test img/s", "ratio", "train ratio (CPU time)",
                            "test ratio (CPU time)", "ours peak RSS MiB", "ref peak RSS MiB"], digits=2))
    for r in rows:
        for run in r["runs"]:
            if "error" in run:
                print(f"\n{r['case']} {r['side']} round {run['round']}: {run['error']}")
    path = C.write_json("transfer_vs_torchvision", {
        "machine": info, "contention": C.contention_note(info) or None, "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k != "_worker"}, "rows": rows, "table": table}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
