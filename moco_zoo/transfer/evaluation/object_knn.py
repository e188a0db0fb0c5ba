"""Frozen-feature kNN on the ground-truth objects of a detection set: does a representation transfer to its objects?

Fine-tuned detection AP mixes two things: how good the backbone's features are for the set's objects, and how fast
detection heads learn on top of them in a given schedule. This probe isolates the first: every non-difficult
ground-truth box is cropped and resized to a square, the frozen backbone embeds it (global average pool of the last
stage, L2-normalised), and each test object is classified by weighted kNN over the train objects (the monitor of
Wu et al., CVPR 2018, as used by :mod:`moco_zoo.pretrain.knn`). Before embedding, BatchNorm statistics are re-estimated on the
train crops for every backbone ("precise BN"), so a random init normalises like a trained network does.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from moco_zoo.checkpoint import CheckpointError, atomic_write_text
from moco_zoo.data.voc import VOCDetection
from moco_zoo.pretrain.knn import extract_features, knn_accuracy, recalibrate_bn
from moco_zoo.transfer.modeling.backbone import build_resnet


def object_crops(dataset: VOCDetection, crop_size: int = 64) -> Iterator[Tuple[torch.Tensor, int]]:
    """Yields ``(3xSxS normalised crop, label in 0..C-1)`` for every non-difficult ground-truth object, image by image
    (nothing is held in memory: VOC07+12 trainval has ~40k objects).

    Boxes are 0-based xyxy floats (pixel ``x`` covers ``[x, x + 1)``); the crop covers the box's whole pixels and is
    resized with antialiasing (bilinear), as PIL's ``resize`` would.
    """
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    for i in range(len(dataset)):
        image, target = dataset[i]  # 3xHxW in [0, 1]
        for box, label, difficult in zip(target["boxes"], target["labels"], target["difficult"]):
            if difficult:
                continue
            x0, y0 = int(box[0].floor()), int(box[1].floor())
            x1 = max(int(box[2].ceil()), x0 + 1)
            y1 = max(int(box[3].ceil()), y0 + 1)
            crop = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [crop_size, crop_size], antialias=True)
            yield (crop - mean) / std, int(label) - 1  # VOCDetection labels are 1..C (0: detectors' background)


def crop_batches(dataset: VOCDetection, crop_size: int, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(Bx3xSxS crops, B labels)`` batches of :func:`object_crops` (the last one may be smaller)."""
    crops: List[torch.Tensor] = []
    labels: List[int] = []
    for crop, label in object_crops(dataset, crop_size):
        crops.append(crop)
        labels.append(label)
        if len(crops) == batch_size:
            yield torch.stack(crops), torch.tensor(labels)
            crops, labels = [], []
    if crops:
        yield torch.stack(crops), torch.tensor(labels)


def object_knn(resnet: nn.Module, train: VOCDetection, test: VOCDetection, crop_size: int = 64, k: int = 20,
               t: float = 0.07, batch_size: int = 128, bn_batches: int = 200,
               device: Optional[torch.device] = None) -> Dict[str, float]:
    """kNN top-1/top-5 (%) of ``test``'s objects against ``train``'s, BN statistics from ``bn_batches`` batches of
    train crops (detectron2's PreciseBN default count)."""
    device = device or torch.device("cpu")
    # torchvision ResNet children: stem, layer1-4, avgpool, fc -> everything up to the pooled features
    trunk = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten()).to(device)
    bn_data = (x for x, _ in itertools.islice(crop_batches(train, crop_size, batch_size), bn_batches))
    trunk = recalibrate_bn(trunk, bn_data, device)

    def labelled(ds: VOCDetection):  # the (images, targets, index) batches extract_features reads
        return ((x, y, None) for x, y in crop_batches(ds, crop_size, batch_size))

    train_f, train_y = extract_features(trunk, labelled(train), device)
    test_f, test_y = extract_features(trunk, labelled(test), device)
    result = knn_accuracy(train_f, train_y, test_f, test_y, len(train.class_names), k, t)
    result.update(train_objects=len(train_y), test_objects=len(test_y))
    return result


def voc_object_sets(data_root: str, train_sets: Sequence[str], test_set: str) -> Tuple[VOCDetection, VOCDetection]:
    """Train and test sets of a VOCdevkit (``YEAR-split`` names); an error naming the directory if a set has no
    non-difficult object (a missing file is named by :class:`VOCDetection`)."""
    train = VOCDetection(data_root, list(train_sets))
    test = VOCDetection(data_root, test_set, class_names=train.class_names)
    for ds in (train, test):
        if not any((~ds.get_annotation(i)["difficult"]).any() for i in range(len(ds))):
            raise ValueError(f"{data_root}: no non-difficult objects in image sets {ds.image_sets}")
    return train, test


def main(argv: Optional[List[str]] = None) -> int:
    """``transfer/voc_object_knn.py``: one row per ``--weights`` in ``--out/object_knn.{json,md}``."""

    p = argparse.ArgumentParser(prog="voc_object_knn.py", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="VOCdevkit directory (containing VOC2007/, VOC2012/)")
    p.add_argument("--weights", nargs="+", required=True, metavar="SPEC",
                   help="backbone weights, as for voc_det.py: zoo name, hf-hub:ORG/REPO, checkpoint file, random")
    p.add_argument("--arch", help="ResNet architecture (default: the one the weights report, else resnet50)")
    p.add_argument("--train-sets", nargs="+", default=["2007-trainval", "2012-trainval"],
                   help="kNN memory (default: %(default)s)")
    p.add_argument("--test-set", default="2007-test", help="queries (default: %(default)s)")
    p.add_argument("--crop-size", type=int, default=64, help="square crop side in pixels (default: %(default)s)")
    p.add_argument("-k", type=int, default=20, help="neighbours (default: %(default)s)")
    p.add_argument("-t", type=float, default=0.07, help="softmax temperature of the votes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random init")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--output-dir", "--out", dest="out", default="runs/voc_object_knn",
                   help="output directory (default: %(default)s; --out is a deprecated alias)")
    p.add_argument("--allow-pickle", action="store_true", help="allow fully unpickling trusted weights files")
    args = p.parse_args(argv)
    try:
        if args.crop_size < 8:
            raise ValueError(f"--crop-size must be >= 8, got {args.crop_size}")
        train, test = voc_object_sets(args.data_root, args.train_sets, args.test_set)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        rows = []
        for spec in args.weights:
            resnet, info = build_resnet(spec, args.arch, "bn", seed=args.seed, allow_pickle=args.allow_pickle)
            metrics = object_knn(resnet, train, test, args.crop_size, args.k, args.t, device=device)
            rows.append({"weights": spec, "arch": info.arch, "metrics": metrics})
            print(f"voc_object_knn: {spec}: top-1 {metrics['knn_top1']:.1f} top-5 {metrics['knn_top5']:.1f} "
                  f"({metrics['test_objects']} test objects, {metrics['train_objects']} train)", flush=True)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"voc_object_knn: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "object_knn.json", json.dumps(rows, indent=2))
    lines = [f"# VOC object kNN ({args.test_set} objects vs {' + '.join(args.train_sets)}, {args.crop_size} px "
             f"crops, k={args.k}, t={args.t})", "", "| weights | arch | kNN top-1 | kNN top-5 |", "|---|---|---|---|"]
    lines += [f"| {r['weights']} | {r['arch']} | {r['metrics']['knn_top1']:.1f} | {r['metrics']['knn_top5']:.1f} |"
              for r in rows]
    atomic_write_text(out / "object_knn.md", "\n".join(lines) + "\n")
    return 0
