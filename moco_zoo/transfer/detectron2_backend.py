"""Optional detectron2 engine (``--engine detectron2``): the MoCo detection configs, run by detectron2 itself.

detectron2 has no PyPI release; users build it from source. Nothing here imports detectron2 at module import time:
:func:`detectron2_config_values` (the config as plain ``KEY -> value`` pairs) works without it, and everything that
needs detectron2 calls :func:`require_detectron2`, which raises a clear error when it is missing.

The config reproduces facebookresearch/moco ``detection/configs`` (Base-RCNN-C4-BN + pascal_voc_R_50_C4_24k_moco /
coco_R_50_C4_{1,2}x_moco): R50-C4 with ``Res5ROIHeadsExtraNorm`` (registered here: BN after res5 in the box head),
SyncBN, ``STRIDE_IN_1X1 False``, ``FREEZE_AT 0``, RGB input with ImageNet mean/std in 0-255 units, precise BN at test,
and the MoCo backbone loaded from the detectron2 ``.pkl`` that ``moco-zoo convert --to detectron2`` writes
(``matching_heuristics`` on). Schedules, sizes and batch come from the same resolved config as the torchvision engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

INSTALL_HINT = ("--engine detectron2 needs detectron2, which has no PyPI release: build it from source "
                "(pip install 'git+https://github.com/facebookresearch/detectron2.git', see its INSTALL.md), "
                "or use the built-in engine (--engine torchvision, the default)")

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
_NORM = {"syncbn": "SyncBN", "bn": "BN", "frozen": "FrozenBN"}


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def require_detectron2() -> None:
    if not detectron2_available():
        raise ImportError(INSTALL_HINT)


def detectron2_config_values(cfg: Dict[str, Any], arch: str, num_classes: int, weights_file: str,
                             train_datasets: Sequence[str], test_datasets: Sequence[str], out_dir: str,
                             world_size: int = 1) -> List[Tuple[str, Any]]:
    """detectron2 config keys and values equivalent to our resolved ``cfg`` (pure Python, no detectron2 needed)."""
    name = arch.split(".")[0]
    if name not in _DEPTH:
        raise ValueError(f"detectron2 engine supports torchvision-style ResNets {sorted(_DEPTH)}, not {arch!r}")
    depth = _DEPTH[name]
    if cfg["detector"] not in ("c4", "fpn"):
        raise ValueError(f"unknown detector {cfg['detector']!r}")
    if cfg["detector"] == "c4" and depth < 50:
        raise ValueError(f"detectron2's C4 res5 head is built from bottleneck blocks: use --detector fpn for {arch}, "
                         f"or the torchvision engine (which builds C4 heads for any ResNet)")
    from .config import effective_batch

    total, _, lr = effective_batch(cfg, world_size)
    c4 = cfg["detector"] == "c4"
    values: List[Tuple[str, Any]] = [
        ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN"),
        ("MODEL.WEIGHTS", weights_file),
        ("MODEL.MASK_ON", bool(cfg["mask"])),
        ("MODEL.PIXEL_MEAN", PIXEL_MEAN),
        ("MODEL.PIXEL_STD", PIXEL_STD),
        ("INPUT.FORMAT", "RGB"),
        ("MODEL.BACKBONE.NAME", "build_resnet_backbone" if c4 else "build_resnet_fpn_backbone"),
        ("MODEL.BACKBONE.FREEZE_AT", 0),
        ("MODEL.RESNETS.DEPTH", depth),
        ("MODEL.RESNETS.NORM", _NORM[cfg["norm"]]),
        ("MODEL.RESNETS.STRIDE_IN_1X1", False),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", 64 if depth in (18, 34) else 256),
        ("MODEL.RESNETS.OUT_FEATURES", ["res4"] if c4 else ["res2", "res3", "res4", "res5"]),
        ("MODEL.ROI_HEADS.NAME", "Res5ROIHeadsExtraNorm" if c4 else "StandardROIHeads"),
        ("MODEL.ROI_HEADS.NUM_CLASSES", int(num_classes)),
        ("MODEL.ROI_HEADS.IN_FEATURES", ["res4"] if c4 else ["p2", "p3", "p4", "p5"]),
        ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", int(cfg["box_batch_size_per_image"])),
        ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", float(cfg["box_score_thresh"])),
        ("MODEL.ROI_HEADS.NMS_THRESH_TEST", float(cfg["box_nms_thresh"])),
        ("TEST.DETECTIONS_PER_IMAGE", int(cfg["box_detections_per_img"])),
        ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", int(cfg["roi_resolution"]) if c4 else 7),
        ("MODEL.RPN.IN_FEATURES", ["res4"] if c4 else ["p2", "p3", "p4", "p5", "p6"]),
        ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", int(cfg["rpn_pre_nms_top_n_train"])),
        ("MODEL.RPN.PRE_NMS_TOPK_TEST", int(cfg["rpn_pre_nms_top_n_test"])),
        ("MODEL.RPN.POST_NMS_TOPK_TRAIN", int(cfg["rpn_post_nms_top_n_train"])),
        ("MODEL.RPN.POST_NMS_TOPK_TEST", int(cfg["rpn_post_nms_top_n_test"])),
        ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", int(cfg["rpn_batch_size_per_image"])),
        ("MODEL.ANCHOR_GENERATOR.SIZES", [list(cfg["anchor_sizes"])] if c4 else [[s] for s in cfg["anchor_sizes"]]),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [list(cfg["anchor_ratios"])]),
        ("INPUT.MIN_SIZE_TRAIN", tuple(int(s) for s in cfg["min_size_train"])),
        ("INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice"),
        ("INPUT.MIN_SIZE_TEST", int(cfg["min_size_test"])),
        ("INPUT.MAX_SIZE_TRAIN", int(cfg["max_size"])),
        ("INPUT.MAX_SIZE_TEST", int(cfg["max_size"])),
        ("DATASETS.TRAIN", tuple(train_datasets)),
        ("DATASETS.TEST", tuple(test_datasets)),
        ("SOLVER.IMS_PER_BATCH", int(total)),
        ("SOLVER.BASE_LR", float(lr)),
        ("SOLVER.MOMENTUM", float(cfg["momentum"])),
        ("SOLVER.WEIGHT_DECAY", float(cfg["weight_decay"])),
        ("SOLVER.WEIGHT_DECAY_NORM", float(cfg["weight_decay_norm"])),
        ("SOLVER.STEPS", tuple(int(s) for s in cfg["steps"])),
        ("SOLVER.GAMMA", float(cfg["gamma"])),
        ("SOLVER.MAX_ITER", int(cfg["iters"])),
        ("SOLVER.WARMUP_ITERS", int(cfg["warmup_iters"])),
        ("SOLVER.WARMUP_FACTOR", float(cfg["warmup_factor"])),
        ("SOLVER.CHECKPOINT_PERIOD", int(cfg["checkpoint_period"])),
        ("TEST.PRECISE_BN.ENABLED", int(cfg["precise_bn_iters"]) > 0 and cfg["norm"] != "frozen"),
        ("TEST.PRECISE_BN.NUM_ITER", max(int(cfg["precise_bn_iters"]), 1)),
        ("DATALOADER.NUM_WORKERS", int(cfg["workers"])),
        ("SEED", int(cfg["seed"])),
        ("OUTPUT_DIR", str(out_dir)),
    ]
    if not c4:
        values += [("MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]),
                   ("MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"), ("MODEL.ROI_BOX_HEAD.NUM_FC", 2),
                   ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"), ("MODEL.ROI_MASK_HEAD.NUM_CONV", 4),
                   ("MODEL.FPN.NORM", "")]
    return values


def register_extra_norm_heads() -> None:
    """Register ``Res5ROIHeadsExtraNorm`` (Res5ROIHeads + a norm layer after res5) with detectron2, once."""
    require_detectron2()
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads with an extra BN after res5, as in the MoCo detection configs."""

        @classmethod
        def _build_res5_block(cls, cfg):
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def detectron2_weights(spec: str, arch: Optional[str], out_dir: Path, allow_pickle: bool = False) -> Tuple[str, str]:
    """``(MODEL.WEIGHTS, arch)`` for a weights spec: a ``.pkl`` from ``moco-zoo convert --to detectron2`` is used as is
    (``arch`` required); ``random`` trains from scratch; anything else is converted with moco_zoo's converter."""
    if spec == "random":
        return "", arch or "resnet50"
    if spec.endswith(".pkl"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec}: detectron2 weights file not found")
        if not arch:
            raise ValueError(f"{spec}: pass --arch for detectron2 .pkl weights (e.g. --arch resnet50)")
        return spec, arch
    from moco_zoo.backbones import load_backbone_state_dict
    from moco_zoo.checkpoint import atomic_pickle_dump
    from moco_zoo.convert import detectron2_key

    sd, found = load_backbone_state_dict(spec, arch, allow_pickle=allow_pickle)
    out = out_dir / "backbone_detectron2.pkl"
    model = {detectron2_key(k): v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    atomic_pickle_dump({"model": model, "__author__": "MOCO", "matching_heuristics": True}, out)
    return str(out), found


def _register_datasets(cfg: Dict[str, Any], data_root: str, class_names: Sequence[str]) -> Tuple[List[str], List[str]]:
    from detectron2.data import DatasetCatalog
    root = Path(data_root)
    if cfg["task"] == "voc_det":
        from detectron2.data.datasets.pascal_voc import register_pascal_voc

        if (root / "VOCdevkit").is_dir():
            root = root / "VOCdevkit"
        names = []
        for item in list(cfg["train_sets"]) + list(cfg["test_sets"]):
            year, split = item.replace(":", "-").replace("_", "-").split("-", 1)
            name = f"moco_zoo_voc_{year}_{split}"
            if name not in DatasetCatalog.list():
                register_pascal_voc(name, str(root / f"VOC{year}"), split, int(year), list(class_names))
            names.append(name)
        return names[:-1], names[-1:]
    from detectron2.data.datasets import register_coco_instances

    names = []
    for split in (cfg["train_split"], cfg["test_split"]):
        name = f"moco_zoo_coco_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(root / "annotations" / f"instances_{split}.json"), str(root / split))
        names.append(name)
    return names[:1], names[1:]


def run_detectron2(cfg: Dict[str, Any], weights: str, data_root: str, out_dir, *, resume: bool = False,
                   eval_only: bool = False) -> Dict[str, Any]:
    """Train and test with detectron2's DefaultTrainer; returns the same result dict as the torchvision engine."""
    require_detectron2()
    import os

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer, default_setup
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    import detectron2.utils.comm as comm

    from moco_zoo.data.voc import read_class_list

    from .engine import report

    from moco_zoo import device as devlib

    devlib.init_distributed_from_env(None if cfg["device"] in ("auto", None) else cfg["device"])  # torchrun
    if devlib.is_distributed() and hasattr(comm, "create_local_process_group"):
        try:
            comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", devlib.world_size())))
        except Exception:  # already created by an earlier run in this process
            pass
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    register_extra_norm_heads()
    if cfg["task"] == "voc_det":
        root = Path(data_root)
        class_names = read_class_list(root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root)
    else:
        from moco_zoo.data.coco import validate_coco_json

        data = validate_coco_json(Path(data_root) / "annotations" / f"instances_{cfg['train_split']}.json")
        class_names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    train_names, test_names = _register_datasets(cfg, data_root, class_names)
    weights_file, arch = detectron2_weights(weights, cfg.get("arch"), out_dir, bool(cfg.get("allow_pickle")))
    d2 = get_cfg()
    d2_dir = out_dir / "detectron2"  # detectron2's own logs, metrics.json lines and checkpoints
    for key, value in detectron2_config_values(cfg, arch, len(class_names), weights_file, train_names, test_names,
                                               str(d2_dir), comm.get_world_size()):
        node = d2
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    if cfg["device"] not in ("auto", None):
        d2.MODEL.DEVICE = cfg["device"]
    else:
        import torch

        d2.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    d2.freeze()
    default_setup(d2, None)

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, c, dataset_name, output_folder=None):
            if cfg["task"] == "voc_det":
                return PascalVOCDetectionEvaluator(dataset_name)
            return COCOEvaluator(dataset_name, output_dir=str(out_dir / "inference"))

    if eval_only:
        from detectron2.checkpoint import DetectionCheckpointer

        model = Trainer.build_model(d2)
        DetectionCheckpointer(model, save_dir=str(d2_dir)).resume_or_load(d2.MODEL.WEIGHTS, resume=True)
        results = Trainer.test(d2, model)
    else:
        trainer = Trainer(d2)
        trainer.resume_or_load(resume=resume)
        results = trainer.train()
    metrics = _normalise_metrics(cfg["task"], results or {})
    result = {"task": cfg["task"], "weights": weights, "arch": arch, "detector": cfg["detector"], "norm": cfg["norm"],
              "iters": int(cfg["iters"]), "preset": cfg.get("preset"), "engine": "detectron2", "metrics": metrics,
              "out_dir": str(out_dir)}
    if comm.is_main_process():
        report.write_json(out_dir / "metrics.json", result)
        report.atomic_write_text(out_dir / "config.yaml", d2.dump())
        report.atomic_write_text(out_dir / "results.md", report.markdown_table(cfg["task"], [result]))
        report.plot_losses(detectron2_history(d2_dir / "metrics.json"), out_dir / "loss_curve.png",
                           title=f"{cfg['task']} {weights} (detectron2)")
    return result


def _normalise_metrics(task: str, results: Dict[str, Any]) -> Dict[str, Any]:
    """detectron2 evaluator output -> the torchvision engine's metric names."""
    flat: Dict[str, Any] = {}
    for v in results.values():  # {dataset: {"bbox": {...}, "segm": {...}}} or {"bbox": ...}
        if isinstance(v, dict) and ("bbox" in v or "segm" in v):
            flat.update(v)
    if not flat:
        flat = dict(results)
    if task == "voc_det":
        b = flat.get("bbox", {})
        return {"AP50": b.get("AP50"), "AP": b.get("AP"), "AP75": b.get("AP75")}
    out = {}
    for kind in ("bbox", "segm"):
        if kind in flat:
            out[kind] = {k: float(v) for k, v in flat[kind].items() if k in
                         ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    return out


def detectron2_history(path: Path) -> List[Dict[str, float]]:
    """Loss history from detectron2's JSON-lines ``metrics.json`` in our history format (``iter``, ``loss*``, ``lr``)."""
    history: List[Dict[str, float]] = []
    if not Path(path).is_file():
        return history
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "total_loss" not in rec:
            continue
        entry = {"iter": int(rec.get("iteration", len(history))) + 1, "loss": float(rec["total_loss"])}
        entry.update({k: float(v) for k, v in rec.items() if k.startswith("loss_")})
        if "lr" in rec:
            entry["lr"] = float(rec["lr"])
        history.append(entry)
    return history
