"""The detectron2 backend (``--engine detectron2``): the same transfer config run by detectron2's own trainer.

detectron2 has no PyPI release; users build it from source. Nothing here imports detectron2 at module import time:
:func:`detectron2_config_values` works without it, and everything that needs it calls :func:`require_detectron2`.

What is shared with the torchvision engine, so that the two backends are comparable run for run: the resolved config
(every key is either mapped to its detectron2 setting in :data:`KEY_MAP` or refused by :func:`check_supported` with
an error naming it), the data (detectron2 datasets are built from our VOC / COCO readers, with the same subsets),
the weights (the zoo's resolver and ``moco_zoo.convert``'s detectron2 export), the evaluators (ours, behind
detectron2's ``DatasetEvaluator`` interface) and the output files (``report.write_run``).

The model is the MoCo detection config (facebookresearch/moco ``detection/configs``): R-C4 with
``Res5ROIHeadsExtraNorm`` (a norm layer after res5 in the box head, registered here) or R-FPN, ``STRIDE_IN_1X1
False``, ``FREEZE_AT 0``, RGB input with the ImageNet mean/std in 0-255 units.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from moco_zoo import device as devlib
from moco_zoo.checkpoint import atomic_write_text
from moco_zoo.convert import ConvertedCheckpoint, save_detectron2
from moco_zoo.data.voc import load_rgb, to_tensor

from . import report
from .config import ConfigError, effective_batch, to_yaml
from .modeling.backbone import trunk_weights
from .tasks import DetectionTask, model_name

logger = logging.getLogger(__name__)

INSTALL_HINT = ("--engine detectron2 needs detectron2, which has no PyPI release: build it from source "
                "(pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git', see its "
                "INSTALL.md), or use the built-in engine (--engine torchvision, the default)")

PIXEL_MEAN = [round(255 * m, 3) for m in IMAGENET_DEFAULT_MEAN]
PIXEL_STD = [round(255 * s, 3) for s in IMAGENET_DEFAULT_STD]
_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
_NORM = {"syncbn": "SyncBN", "bn": "BN", "frozen": "FrozenBN"}

# Every config key of the detection schema and how detectron2 honours it ("" = bookkeeping, no model setting).
KEY_MAP: Dict[str, str] = {
    "task": "", "preset": "", "engine": "", "seed": "SEED",
    "arch": "MODEL.RESNETS.DEPTH / RES2_OUT_CHANNELS", "norm": "MODEL.RESNETS.NORM",
    "detector": "MODEL.BACKBONE.NAME, ROI_HEADS.NAME", "mask": "MODEL.MASK_ON",
    "roi_resolution": "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION (C4; FPN pools 7x7 in both engines)",
    "fpn_channels": "MODEL.FPN.OUT_CHANNELS (FPN)",
    "anchor_sizes": "MODEL.ANCHOR_GENERATOR.SIZES", "anchor_ratios": "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "rpn_pre_nms_top_n_train": "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "rpn_pre_nms_top_n_test": "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "rpn_post_nms_top_n_train": "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "rpn_post_nms_top_n_test": "MODEL.RPN.POST_NMS_TOPK_TEST",
    "rpn_batch_size_per_image": "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "box_batch_size_per_image": "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "box_detections_per_img": "TEST.DETECTIONS_PER_IMAGE", "box_score_thresh": "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "box_nms_thresh": "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    "min_size_train": "INPUT.MIN_SIZE_TRAIN (choice)", "min_size_test": "INPUT.MIN_SIZE_TEST",
    "max_size": "INPUT.MAX_SIZE_TRAIN / MAX_SIZE_TEST", "flip_prob": "INPUT.RANDOM_FLIP (0 or 0.5)",
    "iters": "SOLVER.MAX_ITER", "batch_size": "SOLVER.IMS_PER_BATCH", "batch_per_rank": "SOLVER.IMS_PER_BATCH",
    "lr": "SOLVER.BASE_LR (linear scaling rule applied)", "lr_reference_batch": "SOLVER.BASE_LR",
    "lr_schedule": "SOLVER.LR_SCHEDULER_NAME (step only)", "steps": "SOLVER.STEPS (steps >= iters dropped)",
    "gamma": "SOLVER.GAMMA", "poly_power": "(poly schedule refused)", "warmup_iters": "SOLVER.WARMUP_ITERS",
    "warmup_factor": "SOLVER.WARMUP_FACTOR", "momentum": "SOLVER.MOMENTUM", "weight_decay": "SOLVER.WEIGHT_DECAY",
    "weight_decay_norm": "SOLVER.WEIGHT_DECAY_NORM", "clip_grad_norm": "global-norm clipping in the optimizer step",
    "precise_bn_iters": "TEST.PRECISE_BN", "device": "MODEL.DEVICE",
    "precision": "SOLVER.AMP.ENABLED (fp16 on CUDA; auto = fp16 on CUDA, fp32 on CPU)",
    "channels_last": "the built model converted to torch.channels_last",
    "threads": "torch.set_num_threads", "workers": "DATALOADER.NUM_WORKERS",
    "checkpoint_period": "SOLVER.CHECKPOINT_PERIOD", "log_period": "the PeriodicWriter period",
    "eval_period": "(refused unless 0)", "test_batch_size": "(refused unless 1)",
    "num_vis": "sample predictions drawn after testing", "vis_score_thresh": "sample predictions",
    "find_unused_parameters": "(refused unless false)", "allow_pickle": "weights conversion",
    "max_train_images": "the registered training dataset", "max_test_images": "the registered test dataset",
    "train_sets": "the registered training dataset", "test_sets": "the registered test dataset",
    "train_use_difficult": "the registered training dataset", "use_07_metric": "the VOC evaluator",
    "train_split": "the registered training dataset", "test_split": "the registered test dataset",
}


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def require_detectron2() -> None:
    if not detectron2_available():
        raise ImportError(INSTALL_HINT)


def check_supported(cfg: Any, device_type: str = "cpu") -> None:
    """Refuse, naming the key, every value detectron2 cannot honour (instead of silently ignoring it)."""
    unknown = sorted(set(cfg.keys()) - set(KEY_MAP))
    if unknown:
        raise ConfigError(f"config keys {unknown} have no detectron2 mapping (engine=detectron2)")
    refusals = [
        ("task", cfg["task"] == "voc_seg", "semantic segmentation runs on the torchvision engine only"),
        ("lr_schedule", cfg["lr_schedule"] != "step", "detectron2 runs the step schedule (WarmupMultiStepLR)"),
        ("eval_period", cfg["eval_period"] > 0, "periodic evaluation is not wired to detectron2's EvalHook here; "
                                                "use 0 or the torchvision engine"),
        ("test_batch_size", cfg["test_batch_size"] != 1, "detectron2 tests one image per batch"),
        ("flip_prob", cfg["flip_prob"] not in (0.0, 0.5), "detectron2 flips with probability 0.5 or not at all"),
        ("find_unused_parameters", bool(cfg["find_unused_parameters"]), "detectron2 builds its own DDP wrapper"),
        ("precision", cfg["precision"] == "bf16" or (cfg["precision"] == "fp16" and device_type != "cuda"),
         "detectron2's AMP trainer is fp16 on CUDA only"),
    ]
    for key, refused, why in refusals:
        if refused:
            raise ConfigError(f"config key {key!r}={cfg[key]!r} is not supported by --engine detectron2: {why}")


def detectron2_config_values(cfg: Any, arch: str, num_classes: int, weights_file: str,
                             train_datasets: Sequence[str], test_datasets: Sequence[str], out_dir: str,
                             world_size: int = 1, device_type: str = "cpu") -> List[Tuple[str, Any]]:
    """detectron2 config keys and values equivalent to our resolved ``cfg`` (pure Python, no detectron2 needed)."""
    name = arch.split(".")[0]
    if name not in _DEPTH:
        raise ConfigError(f"config key 'arch'={arch!r}: the detectron2 engine builds ResNets {sorted(_DEPTH)}")
    depth = _DEPTH[name]
    c4 = cfg["detector"] == "c4"
    if c4 and depth < 50:
        raise ConfigError(f"config key 'detector'='c4' with {arch}: detectron2's C4 res5 head is built from "
                          f"bottleneck blocks; use detector=fpn, or the torchvision engine")
    total, _, lr = effective_batch(cfg, world_size)
    iters = int(cfg["iters"])
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
        ("INPUT.RANDOM_FLIP", "horizontal" if cfg["flip_prob"] > 0 else "none"),
        ("DATASETS.TRAIN", tuple(train_datasets)),
        ("DATASETS.TEST", tuple(test_datasets)),
        ("SOLVER.IMS_PER_BATCH", int(total)),
        ("SOLVER.BASE_LR", float(lr)),
        ("SOLVER.MOMENTUM", float(cfg["momentum"])),
        ("SOLVER.WEIGHT_DECAY", float(cfg["weight_decay"])),
        ("SOLVER.WEIGHT_DECAY_NORM", float(cfg["weight_decay_norm"])),
        ("SOLVER.STEPS", tuple(int(s) for s in cfg["steps"] if int(s) < iters)),
        ("SOLVER.GAMMA", float(cfg["gamma"])),
        ("SOLVER.MAX_ITER", iters),
        ("SOLVER.WARMUP_ITERS", int(cfg["warmup_iters"])),
        ("SOLVER.WARMUP_FACTOR", float(cfg["warmup_factor"])),
        ("SOLVER.CHECKPOINT_PERIOD", int(cfg["checkpoint_period"])),
        ("SOLVER.AMP.ENABLED", device_type == "cuda" and cfg["precision"] in ("auto", "fp16")),
        ("TEST.PRECISE_BN.ENABLED", int(cfg["precise_bn_iters"]) > 0 and cfg["norm"] != "frozen"),
        ("TEST.PRECISE_BN.NUM_ITER", max(int(cfg["precise_bn_iters"]), 1)),
        ("TEST.EVAL_PERIOD", 0),
        ("DATALOADER.NUM_WORKERS", int(cfg["workers"])),
        ("SEED", int(cfg["seed"])),
        ("OUTPUT_DIR", str(out_dir)),
    ]
    if not c4:
        values += [("MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]),
                   ("MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"), ("MODEL.ROI_BOX_HEAD.NUM_FC", 2),
                   ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"), ("MODEL.ROI_MASK_HEAD.NUM_CONV", 4),
                   ("MODEL.FPN.NORM", ""), ("MODEL.FPN.OUT_CHANNELS", int(cfg["fpn_channels"]))]
    return values


def register_extra_norm_heads() -> None:
    """Register ``Res5ROIHeadsExtraNorm`` (Res5ROIHeads + a norm layer after res5) with detectron2, once."""
    require_detectron2()
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads with an extra norm layer after res5, as in the MoCo detection configs."""

        @classmethod
        def _build_res5_block(cls, cfg):
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def detectron2_weights(spec: str, arch: str, out_dir: Path, *, seed: int = 0, allow_pickle: bool = False) -> str:
    """``MODEL.WEIGHTS`` for a weights spec: ``random`` trains from detectron2's own initialisation; anything else goes
    through the zoo's resolver and fit check and ``moco_zoo.convert``'s detectron2 export."""
    if spec == "random":
        return ""
    if spec.endswith(".pkl"):  # a detectron2 weight file: detectron2 unpickles it
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec}: detectron2 weights file not found")
        if not allow_pickle:
            raise ConfigError(f"{spec}: detectron2 .pkl weights are unpickled when loaded; pass --allow-pickle only if "
                              f"you trust the file, or pass the checkpoint it was converted from")
        return spec

    state, arch = trunk_weights(spec, arch, seed=seed, allow_pickle=allow_pickle)
    converted = ConvertedCheckpoint(state_dict=state, arch=arch, source_format="backbone", path=spec)
    return str(save_detectron2(converted, out_dir / "backbone_detectron2.pkl"))


def dataset_dicts(dataset: Any, task: str) -> List[Dict[str, Any]]:
    """detectron2 dataset dicts of one of our datasets (a VOCDetection / CocoInstances, possibly a Subset of one):
    same images, same annotations and the same ``image_id`` as the torchvision engine sees, labels 0-based."""
    from detectron2.structures import BoxMode

    indices = list(getattr(dataset, "indices", range(len(dataset))))
    base = getattr(dataset, "dataset", dataset)
    out = []
    for i in indices:
        if task == "voc_det":
            ann = base.get_annotation(i)
            out.append({"file_name": str(base.image_path(i)), "image_id": i, "height": int(ann["height"]),
                        "width": int(ann["width"]), "annotations": [
                            {"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS,
                             "category_id": int(label) - 1, "iscrowd": 0}
                            for box, label in zip(ann["boxes"], ann["labels"])]})
        else:
            img_id = base.ids[i]
            info = base.coco.imgs[img_id]
            anns = []
            for a in base.coco.imgToAnns.get(img_id, []):
                entry = {"bbox": list(a["bbox"]), "bbox_mode": BoxMode.XYWH_ABS,
                         "category_id": base.label_of[a["category_id"]] - 1, "iscrowd": int(a.get("iscrowd", 0))}
                if "segmentation" in a:
                    entry["segmentation"] = a["segmentation"]
                anns.append(entry)
            out.append({"file_name": str(base.image_path(i)), "image_id": img_id, "height": int(info["height"]),
                        "width": int(info["width"]), "annotations": anns})
    return out


class _EvaluatorAdapter:
    """One of our evaluators behind detectron2's ``DatasetEvaluator`` interface (reset / process / evaluate):
    detectron2 ``Instances`` become our output dicts (1-based labels, boxes in original image coordinates)."""

    def __init__(self, evaluator: Any, keep_samples: int = 0):
        self.evaluator = evaluator
        self.keep_samples = keep_samples
        self.samples: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []

    def reset(self) -> None:
        self.evaluator.reset()
        self.samples = []

    def process(self, inputs, outputs) -> None:
        targets, ours = [], []
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            o = {"boxes": inst.pred_boxes.tensor.float(), "scores": inst.scores.float(),
                 "labels": inst.pred_classes.long() + 1}
            if inst.has("pred_masks"):
                o["masks"] = inst.pred_masks[:, None].float()
            targets.append({"image_id": inp["image_id"]})
            ours.append(o)
            if len(self.samples) < self.keep_samples:
                self.samples.append((inp, o))
        self.evaluator.process(targets, ours)

    def evaluate(self) -> Dict[str, Any]:
        return self.evaluator.evaluate()


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


def run_detectron2(cfg: Any, weights: str, data_root: str, out_dir, *, resume: bool = False,
                   eval_only: bool = False) -> Dict[str, Any]:
    """Train and test with detectron2's DefaultTrainer; returns and writes what the torchvision engine does."""
    require_detectron2()
    import detectron2.utils.comm as comm
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultTrainer, default_setup, hooks
    from detectron2.evaluation import inference_on_dataset

    device = devlib.init_distributed_from_env(None if cfg["device"] == "auto" else cfg["device"])
    check_supported(cfg, device.type)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out_dir = Path(out_dir)
    d2_dir = out_dir / "detectron2"  # detectron2's own logs, metrics.json lines and checkpoints
    out_dir.mkdir(parents=True, exist_ok=True)
    register_extra_norm_heads()
    task = DetectionTask(cfg)
    train_set, test_set, class_names = task.build_datasets(data_root)
    arch = cfg["arch"] or "resnet50"
    weights_file = detectron2_weights(weights, arch, out_dir, seed=int(cfg["seed"]),
                                      allow_pickle=bool(cfg["allow_pickle"]))
    names = []
    for split, ds in (("train", train_set), ("test", test_set)):
        name = f"moco_zoo_{cfg['task']}_{split}_{abs(hash((str(out_dir), split)))}"
        if name not in DatasetCatalog.list():
            dicts = dataset_dicts(ds, cfg["task"])
            DatasetCatalog.register(name, lambda dicts=dicts: dicts)
            MetadataCatalog.get(name).set(thing_classes=list(class_names))
        names.append(name)
    d2 = get_cfg()
    for key, value in detectron2_config_values(cfg, arch, len(class_names), weights_file, names[:1], names[1:],
                                               str(d2_dir), comm.get_world_size(), device.type):
        node = d2
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    d2.MODEL.DEVICE = str(device)
    d2.freeze()
    default_setup(d2, None)
    adapter = _EvaluatorAdapter(task.build_evaluator(test_set, class_names, device), int(cfg["num_vis"]))
    clip = cfg["clip_grad_norm"]

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, c, dataset_name, output_folder=None):
            return adapter

        @classmethod
        def build_model(cls, c):
            model = super().build_model(c)
            return model.to(memory_format=torch.channels_last) if cfg["channels_last"] else model

        @classmethod
        def build_optimizer(cls, c, model):
            optimizer = super().build_optimizer(c, model)
            if clip:  # the global gradient norm, as the torchvision engine (detectron2's own clips per parameter)
                base = type(optimizer)

                class GlobalNormClipped(base):
                    def step(self, closure=None):
                        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]],
                                                       float(clip))
                        return super().step(closure)

                optimizer.__class__ = GlobalNormClipped
            return optimizer

        def build_hooks(self):
            out = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
            for h in out:
                if isinstance(h, hooks.PeriodicWriter):
                    h._period = int(cfg["log_period"])
            return out

    t0 = time.perf_counter()
    if eval_only:
        model = Trainer.build_model(d2)
        DetectionCheckpointer(model, save_dir=str(d2_dir)).resume_or_load(d2.MODEL.WEIGHTS, resume=True)
        train_seconds, iteration = 0.0, int(cfg["iters"])
    else:
        trainer = Trainer(d2)
        trainer.resume_or_load(resume=resume)
        if resume and trainer.start_iter:
            logger.info("resumed from %s at iteration %d", d2_dir, trainer.start_iter)
        trainer.train()
        model, train_seconds, iteration = trainer.model, time.perf_counter() - t0, int(cfg["iters"])
    t1 = time.perf_counter()
    metrics = dict(inference_on_dataset(model, Trainer.build_test_loader(d2, names[1]), adapter))
    metrics["num_test_images"] = len(test_set)
    history = detectron2_history(d2_dir / "metrics.json")
    result = {
        "task": cfg["task"], "engine": "detectron2", "weights": weights, "arch": arch, "model": model_name(cfg),
        "norm": cfg["norm"], "iters": iteration, "preset": cfg["preset"], "seed": cfg["seed"], "metrics": metrics,
        "eval_history": [], "train_seconds": round(train_seconds, 1),
        "test_seconds": round(time.perf_counter() - t1, 1), "out_dir": str(out_dir),
        "checkpoint": str(d2_dir / "model_final.pth"), "final_loss": history[-1]["loss"] if history else None,
    }
    if comm.is_main_process():
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        atomic_write_text(out_dir / "detectron2_config.yaml", d2.dump())
        report.write_run(out_dir, result, metrics, history, class_names,
                         f"{arch} {model_name(cfg)} on detectron2, norm {cfg['norm']}, preset {cfg['preset']}, "
                         f"{iteration} iterations, global batch {d2.SOLVER.IMS_PER_BATCH}, lr {d2.SOLVER.BASE_LR:g}, "
                         f"{comm.get_world_size()} process(es), {len(test_set)} test images.")
        for i, (inp, output) in enumerate(adapter.samples):
            task.visualize(to_tensor(load_rgb(Path(inp["file_name"]))), None, output, class_names,
                           out_dir / "predictions" / f"sample_{i:02d}.png")
    return result
