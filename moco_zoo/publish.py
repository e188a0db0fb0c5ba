"""Publishing the zoo on the Hugging Face Hub: Hub folders, model cards, uploads, importing official releases.

A *Hub folder* is what one Hub repository holds::

    config.json          timm's save_for_hf config: plain timm `architecture` (+ `model_args`), num_classes,
                         num_features and a `pretrained_cfg` of its own (MoCo data config, license, paper; no source of
                         another repo), so plain timm loads it with timm.create_model('hf-hub:ORG/NAME', pretrained=True);
                         plus the sha256 of every weight file (`moco_zoo_checksums`), checked on every download
    model.safetensors    timm weights (strict-loadable into the architecture; + classifier for linear-probe releases)
    detectron2.pkl       ResNet backbones only: the pickle detectron2's DetectionCheckpointer accepts
    README.md            model card (huggingface_hub ModelCard): front matter from ModelCardData with a model-index
                         of EvalResults (published numbers from hub_configs + this project's measured runs), metrics
                         table, usage for timm / torchvision / detectron2, sha256 of every weight file, citation

Everything about a release (architecture, license, paper, recipe, published metrics, official URL and checksum) is
read from its ``hub_configs/*.yaml`` entry; nothing is repeated here.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from huggingface_hub import EvalResult, HfApi, ModelCardData, constants

from . import convert, zoo
from .checkpoint import CheckpointError, atomic_write_text, read_json_object
from .hub import (CARD_FILE, CHECKSUMS_KEY, CONFIG_FILE, DETECTRON2_FILE, HUB_FILES, WEIGHTS_FILE, _env_true,
                  download_url, sha256_file, verify_md5)
from .evaluation.results import read_results
from .models import imagenet_label_names, pretrained_cfg_for_entry
from .zoo import CLASSIFIER, HubInfo, ZooEntry

__all__ = ["HubFolder", "MetricRow", "build_card_data", "build_pretrained_cfg", "import_official", "load_eval_results",
           "load_measured_metrics", "prepare_hub_folder", "publish", "render_model_card", "upload_hub_folder"]

PathLike = Union[str, "os.PathLike[str]"]

_MOCO_URL = "https://github.com/facebookresearch/moco"
# pretrained_cfg fields that say where weights come from: meaningless (or wrong) inside a Hub repo of its own.
_SOURCE_FIELDS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag", "architecture",
                  "label_offset", "label_names", "test_input_size", "test_crop_pct", "test_pool_size")
# facts of the architecture itself, kept from timm's cfg
_STRUCTURAL_FIELDS = ("first_conv", "classifier", "pool_size", "fixed_input_size")
_HF_DATASET_IDS = {"imagenet-1k": "ILSVRC/imagenet-1k", "imagenet": "ILSVRC/imagenet-1k"}
# Readable names of the metric keys used in hub_configs (anything else is shown as its key).
_METRIC_NAMES = {
    "imagenet_linear_top1": ("ImageNet-1k linear probe top-1 (%)", "imagenet-1k"),
    "imagenet_top1": ("ImageNet-1k top-1 (%)", "imagenet-1k"),
    "voc0712_r50c4_ap50": ("VOC07+12 Faster R-CNN R50-C4 AP50", "voc2007+2012"),
    "voc0712_r50c4_ap": ("VOC07+12 Faster R-CNN R50-C4 AP", "voc2007+2012"),
    "voc0712_r50c4_ap75": ("VOC07+12 Faster R-CNN R50-C4 AP75", "voc2007+2012"),
    "coco_r50fpn_2x_box_ap": ("COCO Mask R-CNN R50-FPN 2x box AP", "coco-2017"),
    "coco_r50fpn_2x_mask_ap": ("COCO Mask R-CNN R50-FPN 2x mask AP", "coco-2017"),
}
_IMAGENET = ("ILSVRC/imagenet-1k", "ImageNet-1k", "validation")
_VOC = ("voc", "PASCAL VOC 2007 test", "test")
_COCO = ("detection-datasets/coco", "COCO 2017 val", "validation")
# published metric key -> (task, dataset type, dataset name, split, metric type)
_PUBLISHED_TASKS = {
    "imagenet_linear_top1": ("image-classification", *_IMAGENET, "accuracy"),
    "imagenet_top1": ("image-classification", *_IMAGENET, "accuracy"),
    "voc0712_r50c4_ap50": ("object-detection", *_VOC, "AP50"),
    "voc0712_r50c4_ap": ("object-detection", *_VOC, "AP"),
    "voc0712_r50c4_ap75": ("object-detection", *_VOC, "AP75"),
    "coco_r50fpn_2x_box_ap": ("object-detection", *_COCO, "AP"),
    "coco_r50fpn_2x_mask_ap": ("image-segmentation", *_COCO, "mask AP"),
}


def _v1_citation() -> Optional[str]:
    """The MoCo v1 BibTeX, read from the v1 entry of hub_configs (every later version builds on it)."""
    try:
        for e in zoo.entries():
            if e.moco_version == "v1" and e.paper.citation:
                return e.paper.citation.strip()
    except zoo.ZooConfigError:
        return None
    return None


# ----------------------------------------------------------------------------------------------------- metrics rows


@dataclass
class MetricRow:
    """One row of the model card's metrics table."""

    name: str  # metric key (e.g. imagenet_linear_top1)
    value: float
    source: str  # "published" or a description of this project's run
    dataset: Optional[str] = None
    label: Optional[str] = None  # readable name

    def display_name(self) -> str:
        return self.label or _METRIC_NAMES.get(self.name, (self.name, None))[0]

    def dataset_name(self) -> str:
        return self.dataset or _METRIC_NAMES.get(self.name, (None, ""))[1] or ""


def _numeric_leaves(obj: Any, prefix: str = "") -> Iterable[Tuple[str, float]]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        if math.isfinite(float(obj)):
            yield prefix, float(obj)
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k))


def load_measured_metrics(paths: Sequence[PathLike]) -> List[MetricRow]:
    """Metrics JSON files written by this project's runs -> table rows.

    Accepted shapes: ``{"metrics": {...}, "dataset"?, "source"?|"name"?|"protocol"?}`` or a flat ``{name: number}``
    mapping; nested numbers are flattened with dotted names. Non-numeric values are ignored.
    """
    rows: List[MetricRow] = []
    for p in paths:
        p = Path(p)
        data = read_json_object(p, "metrics file")
        metrics = data.get("metrics") if isinstance(data.get("metrics"), Mapping) else data
        label = data.get("source") or data.get("name") or data.get("protocol") or data.get("task")
        source = f"this project ({label})" if isinstance(label, str) and label else f"this project ({p.name})"
        dataset = data.get("dataset") if isinstance(data.get("dataset"), str) else None
        found = list(_numeric_leaves(metrics))
        if not found:
            raise ValueError(f"metrics file {p}: no numeric metric values found")
        rows.extend(MetricRow(name=k, value=v, source=source, dataset=dataset) for k, v in found)
    return rows


def load_eval_results(paths: Sequence[PathLike]) -> List[EvalResult]:
    """``results.json`` files of ``moco-zoo eval`` -> huggingface_hub ``EvalResult`` s (one per protocol metric:
    the mean over seeds as the value; std, n and seeds in ``metric_args``) for the card's ``model-index``."""
    out: List[EvalResult] = []
    for p in paths:
        data = read_results(Path(p))
        dataset = str(data.get("dataset") or Path(p).parent.name)
        backbone = str(data.get("backbone") or "")
        for r in data["results"]:
            out.append(EvalResult(
                task_type="image-classification", task_name=f"{r['protocol']} evaluation (moco-zoo eval)",
                dataset_type=dataset, dataset_name=dataset, dataset_split="val", metric_type="accuracy",
                metric_name=f"{r['protocol']} {r['metric']}", metric_value=round(float(r["mean"]), 4),
                metric_args={"std": round(float(r.get("std", 0.0)), 4), "n": int(r.get("n", 1)),
                             "seeds": list(data.get("seeds", [])), "backbone": backbone}))
    return out


def _eval_result_rows(evals: Sequence[EvalResult]) -> List[MetricRow]:
    """The metrics-table rows of ``EvalResult`` s from :func:`load_eval_results`."""
    rows = []
    for e in evals:
        args = e.metric_args or {}
        label = f"{e.metric_name} (± {args.get('std', 0):.2f}, n={args.get('n', 1)})"
        rows.append(MetricRow(name=e.metric_name or e.metric_type, value=float(e.metric_value),
                              source="this project (moco-zoo eval)", dataset=e.dataset_name, label=label))
    return rows


def _coerce_rows(measured: Optional[Iterable[Union[MetricRow, Mapping[str, Any]]]]) -> List[MetricRow]:
    out: List[MetricRow] = []
    for m in measured or []:
        if isinstance(m, MetricRow):
            out.append(m)
        elif isinstance(m, Mapping) and "name" in m and "value" in m:
            out.append(MetricRow(name=str(m["name"]), value=float(m["value"]),
                                 source=str(m.get("source") or "this project"), dataset=m.get("dataset"),
                                 label=m.get("label")))
        else:
            raise ValueError(f"measured metric {m!r}: expected a MetricRow or a mapping with 'name' and 'value'")
    return out


# ---------------------------------------------------------------------------------------------------- config.json


def build_pretrained_cfg(entry: ZooEntry, model: torch.nn.Module) -> Dict[str, Any]:
    """The timm ``pretrained_cfg`` of this release: only its own facts, nothing inherited from timm's tags.

    The zoo's own cfg (:func:`moco_zoo.models.pretrained_cfg_for_entry`: MoCo data config, license, paper) over the
    architecture's structural facts (first conv, classifier, pool size), without any *source* field (``url``,
    ``hf_hub_id``, ``file``, ``tag``...): in a Hub repo the weights are the repo's own ``model.safetensors``.
    """
    structural = {k: model.pretrained_cfg.get(k) for k in _STRUCTURAL_FIELDS}
    cfg = dict(structural, **{k: v for k, v in pretrained_cfg_for_entry(entry).items()
                               if v is not None and k not in _SOURCE_FIELDS})
    cfg.update(architecture=entry.architecture,
               notes=[f"moco_version={entry.moco_version}", "converted to timm by moco-zoo"])
    return cfg


def save_hub_weights(model: torch.nn.Module, entry: ZooEntry, out: Path,
                     label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``model.safetensors`` + ``config.json`` through timm's :func:`timm.models.save_for_hf`, so plain timm loads the
    folder (``hf-hub:ORG/NAME``, ``local-dir:PATH``); returns the config."""
    model.pretrained_cfg = build_pretrained_cfg(entry, model)
    model_config: Dict[str, Any] = {"label_names": list(label_names)} if label_names else {}
    timm.models.save_for_hf(model, str(out), model_config=model_config, model_args=dict(entry.model_args),
                            safe_serialization=True)
    config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    # num_classes lives at the root; a second copy in model_args breaks loaders that pass both (transformers'
    # TimmWrapperModel builds with num_classes=0 plus **model_args)
    config.get("model_args", {}).pop("num_classes", None)
    return config


# ----------------------------------------------------------------------------------------------------- model card


@dataclass
class FileRecord:
    name: str
    size: int
    sha256: str


def _fmt_value(v: float) -> str:
    return f"{v:.6g}"


def _eval_result(entry: ZooEntry, row: MetricRow) -> Optional[EvalResult]:
    """A model-index result for ``row`` when its task is known (published ImageNet / VOC / COCO numbers, and this
    project's classification and transfer measurements)."""
    name = row.name.lower()
    if row.name in _PUBLISHED_TASKS:
        task, dataset_type, dataset_name, split, metric_type = _PUBLISHED_TASKS[row.name]
    else:
        metric_type = "mIoU" if "miou" in name else ("accuracy" if any(s in name for s in ("top1", "top5", "acc"))
                                                       else "AP" if "ap" in name.split(".")[-1] else None)
        if metric_type is None:
            return None
        task = {"mIoU": "image-segmentation", "accuracy": "image-classification"}.get(metric_type, "object-detection")
        dataset_name = row.dataset_name() or "custom"
        dataset_type, split = dataset_name, None
    return EvalResult(task_type=task, dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                      metric_type=metric_type, metric_name=row.display_name(), metric_value=row.value,
                      **({"source_name": "published", "source_url": entry.source.origin_url or _MOCO_URL}
                         if row.source == "published" else {}))


def build_card_data(entry: ZooEntry, rows: Sequence[MetricRow], num_classes: int,
                    eval_results: Sequence[EvalResult] = ()) -> ModelCardData:
    """The card's YAML front matter as huggingface_hub's :class:`ModelCardData` (tags, license, model-index)."""
    tags = ["image-feature-extraction", "timm", "moco", "self-supervised", "contrastive-learning",
            f"moco-{entry.moco_version}" if entry.moco_version else "moco",
            "vision-transformer" if entry.architecture.startswith("vit") else "resnet"]
    if num_classes:
        tags.insert(1, "image-classification")
    results = [r for r in (_eval_result(entry, row) for row in rows) if r is not None] + list(eval_results)
    return ModelCardData(
        library_name="timm", license=entry.license,
        license_link="https://creativecommons.org/licenses/by-nc/4.0/" if entry.license.startswith("cc-by-nc") else None,
        pipeline_tag="image-classification" if num_classes else "image-feature-extraction",
        tags=list(dict.fromkeys(tags)), datasets=[_HF_DATASET_IDS.get(entry.dataset, entry.dataset)],
        model_name=entry.name if results else None, eval_results=results or None)


def _usage_sections(entry: ZooEntry, repo_id: str, num_classes: int, has_detectron2: bool) -> str:
    parts = [
        "## Usage\n",
        "### timm (no moco-zoo needed)\n",
        "```python\nimport timm\nimport torch\n\n"
        f"model = timm.create_model(\"hf-hub:{repo_id}\", pretrained=True).eval()\n"
        "data_cfg = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**data_cfg)  # resize 256, center crop 224, ImageNet mean/std\n"
        "with torch.no_grad():\n"
        f"    out = model(transform(image).unsqueeze(0))  # {'logits' if num_classes else 'pooled features'}\n```\n",
        "With moco-zoo installed the same weights are registered as a timm model name:\n",
        f"```python\nimport moco_zoo, timm\nmodel = timm.create_model(\"{entry.name}\", pretrained=True)"
        f"{'  # headless; num_classes=N adds a fresh head' if not num_classes else ''}\n```\n",
    ]
    if entry.architecture.startswith("resnet"):
        parts += [
            "### torchvision\n",
            "timm and torchvision ResNets share parameter names, so the safetensors file loads directly:\n",
            "```python\nimport torch, torchvision\nfrom huggingface_hub import hf_hub_download\n"
            "from safetensors.torch import load_file\n\n"
            f"state_dict = load_file(hf_hub_download(\"{repo_id}\", \"{WEIGHTS_FILE}\"))\n"
            f"model = torchvision.models.{entry.architecture}()\n"
            + ("model.load_state_dict(state_dict)  # includes the trained fc\n" if num_classes else
               "model.fc = torch.nn.Identity()  # MoCo backbone: no classifier\nmodel.load_state_dict(state_dict)\n")
            + "```\n",
        ]
    else:
        parts += [
            "### torchvision\n",
            "torchvision's ViT uses different parameter names; use timm (above) for this model.\n",
        ]
    if has_detectron2:
        parts += [
            "### detectron2\n",
            f"`{DETECTRON2_FILE}` holds the backbone under detectron2 names (`stem.*`, `res2`..`res5`, `convK.norm`, "
            "`shortcut`), as written by the MoCo detection converter. Use it with the MoCo detection configs "
            "(R50-C4, SyncBN, `FORMAT: RGB`, torchvision-style `STRIDE_IN_1X1: False`):\n",
            "```python\nfrom huggingface_hub import hf_hub_download\n\n"
            f"weights = hf_hub_download(\"{repo_id}\", \"{DETECTRON2_FILE}\")\n"
            "# then: cfg.MODEL.WEIGHTS = weights\n"
            "#       cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]; cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]\n"
            "#       cfg.INPUT.FORMAT = \"RGB\"; cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False\n```\n",
            "or from the command line: `python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml "
            "MODEL.WEIGHTS /path/to/detectron2.pkl`\n",
        ]
    parts += [
        "### moco-zoo\n",
        f"```bash\nmoco-zoo download {entry.name}      # through the Hugging Face cache (HF_HOME, HF_HUB_OFFLINE)\n```\n",
        f"```python\nimport moco_zoo\nbackbone = moco_zoo.load_backbone(\"hf-hub:{repo_id}\")  # pooled features\n```\n",
    ]
    return "\n".join(parts)


def render_model_card(entry: ZooEntry, repo_id: str, files: Sequence[FileRecord],
                      measured: Sequence[MetricRow] = (), num_classes: Optional[int] = None,
                      source_note: Optional[str] = None, eval_results: Sequence[EvalResult] = ()) -> str:
    """README.md for the repository: YAML front matter + description, metrics, usage, files, citation.
    ``eval_results``: huggingface_hub ``EvalResult`` s (:func:`load_eval_results`) for the model-index."""
    num_classes = entry.num_classes if num_classes is None else num_classes
    published = [MetricRow(name=k, value=float(v), source="published") for k, v in entry.metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
    card_data = build_card_data(entry, published + list(measured), num_classes, eval_results)
    rows = published + list(measured) + _eval_result_rows(eval_results)
    lines: List[str] = ["---", card_data.to_yaml().rstrip(), "---", ""]
    lines += [f"# {entry.name}", "", entry.description + ".", ""]
    src = entry.source
    paper = entry.paper
    lines += ["## Model details", ""]
    details = [
        ("Zoo name", f"`{entry.name}` (moco-zoo)"),
        ("Architecture", f"timm `{entry.architecture}`"
         + (f" with `{', '.join(f'{k}={v}' for k, v in entry.model_args.items())}`" if entry.model_args else "")),
        ("Output", f"{num_classes}-class classifier" if num_classes else "pooled features (no classifier head)"),
        ("Pretraining", f"MoCo {entry.moco_version}, self-supervised on {entry.dataset}" if entry.moco_version
         else f"self-supervised on {entry.dataset}"),
        ("Paper", f"[{paper.title}]({paper.url})" if paper.arxiv else paper.title),
        ("Original release", f"[{src.filename or src.url}]({src.url})"
         + (f" (md5 prefix `{src.md5_prefix}`)" if src.md5_prefix else "") if src.url else None),
        ("Original code", src.origin_url),
        ("Converted from", source_note),
        ("License", entry.license),
        ("Preprocessing", "resize 256 (bilinear), center crop 224 (crop_pct 0.875), ImageNet mean/std"),
    ]
    lines += [f"- **{k}:** {v}" for k, v in details if v]
    if entry.recipe:
        lines += ["", "### Pretraining recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in entry.recipe.items()]
    lines += ["", "## Metrics", ""]
    if rows:
        lines += ["| metric | dataset | value | source |", "|---|---|---|---|"]
        lines += [f"| {r.display_name()} | {r.dataset_name()} | {_fmt_value(r.value)} | {r.source} |" for r in rows]
        lines += ["", f"Published numbers: {entry.metrics_source}. Rows marked *this project* were measured by "
                      "moco-zoo's own runs and are not comparable with the published ImageNet-scale numbers unless "
                      "stated."]
    else:
        lines += ["No metrics recorded."]
    lines += ["", _usage_sections(entry, repo_id, num_classes, any(f.name == DETECTRON2_FILE for f in files))]
    lines += ["## Files and checksums", "", "| file | size (bytes) | sha256 |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.size} | `{f.sha256}` |" for f in files]
    lines += ["", "Verify after download: `sha256sum model.safetensors` must match the table.", ""]
    citations = []
    if entry.moco_version in ("v2", "v3"):
        v1 = _v1_citation()
        if v1:
            citations.append(v1)
    if paper.citation and paper.citation.strip() not in citations:
        citations.append(paper.citation.strip())
    if citations:
        lines += ["## Citation", "", "```bibtex", "\n\n".join(citations), "```", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- Hub folder


@dataclass
class HubFolder:
    """A prepared Hub folder and what went into it."""

    path: Path
    repo_id: str
    entry: ZooEntry
    files: Dict[str, str] = field(default_factory=dict)  # file name -> sha256 (weights, config)
    config: Dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE


def _select_entry(entry: ZooEntry, num_classes: int, source: str) -> ZooEntry:
    """The entry describing the checkpoint: the release's classifier tag when it carries a trained classifier."""
    if entry.is_classifier or not num_classes:
        if entry.is_classifier and num_classes != entry.num_classes:
            raise CheckpointError(f"{source}: has {num_classes} classes but {entry.name} ({entry.config_path}) "
                                  f"is a {entry.num_classes}-class classifier")
        return entry
    for c in entry.classifiers:
        if c.num_classes == num_classes:
            return c
    tag = f"{entry.tag}_lincls_{num_classes}cls"
    return replace(entry, tag=tag, kind=CLASSIFIER, num_classes=num_classes, metrics={}, parent_tag=entry.tag,
                   description=f"{entry.description}; linear classifier ({num_classes} classes, frozen backbone)",
                   hub=HubInfo(repo_id=f"{entry.hub.repo_id.rsplit('.', 1)[0]}.{tag}"), classifiers=())


def prepare_hub_folder(
    checkpoint: Union[PathLike, Mapping[str, Any]],
    config: Union[PathLike, str, ZooEntry],
    repo_id: Optional[str] = None,
    out_dir: Optional[PathLike] = None,
    *,
    measured_metrics: Optional[Iterable[Union[MetricRow, Mapping[str, Any]]]] = None,
    eval_results: Sequence[EvalResult] = (),
    allow_pickle: bool = False,
    with_head: bool = True,
    overwrite: bool = True,
) -> HubFolder:
    """Convert ``checkpoint`` (any format :func:`moco_zoo.convert.to_canonical` reads, or an in-memory checkpoint /
    state dict) and write the Hub folder for ``config`` (a hub_configs file, zoo name or :class:`ZooEntry`).

    The weights are checked by strict-loading them into the timm architecture named in the config before anything is
    written. ``repo_id`` defaults to the entry's ``hub.repo_id``; ``out_dir`` to a new temporary directory.
    """
    entry = zoo.resolve_entry(config)
    name = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<in-memory checkpoint>"
    converted = convert.to_canonical(checkpoint, entry.architecture, allow_pickle=allow_pickle,
                                     check=True)
    num_classes = converted.num_classes if with_head else 0
    entry = _select_entry(entry, num_classes, name)
    repo_id = repo_id or entry.hub.repo_id
    if not repo_id or repo_id.count("/") != 1:
        raise ValueError(f"{entry.config_path or entry.name}: need a Hub repo id ORG/NAME (got {repo_id!r}); pass --repo-id")

    model = timm.create_model(entry.architecture, pretrained=False, num_classes=num_classes, **dict(entry.model_args))
    state_dict = converted.full_state_dict(with_head=bool(num_classes))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{name}: weights do not strict-load into timm {entry.architecture!r} "
            f"(model_args={entry.model_args}, num_classes={num_classes}) from {entry.config_path or entry.name}: {e}"
        ) from e

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="moco-zoo-hub-"))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"Hub folder {out} is not empty (pass overwrite=True to replace its files)")
        for stale in HUB_FILES:
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    label_names = None
    if num_classes:
        label_names = converted.class_names or (list(imagenet_label_names())
                                                if num_classes == 1000 and entry.dataset.startswith("imagenet") else None)
        if label_names is not None and len(label_names) != num_classes:
            label_names = None
    hub_config = save_hub_weights(model, entry, out, label_names)
    del model
    records = [FileRecord(WEIGHTS_FILE, (out / WEIGHTS_FILE).stat().st_size, sha256_file(out / WEIGHTS_FILE))]
    if converted.family == "resnet":
        convert.save_detectron2(converted, out / DETECTRON2_FILE)
        records.append(FileRecord(DETECTRON2_FILE, (out / DETECTRON2_FILE).stat().st_size,
                                  sha256_file(out / DETECTRON2_FILE)))
    # the weights' checksums travel with the config, so every download can be verified (hub.verify_hub_files)
    hub_config[CHECKSUMS_KEY] = {r.name: {"sha256": r.sha256, "size": r.size} for r in records}
    atomic_write_text(out / CONFIG_FILE, json.dumps(hub_config, indent=2) + "\n")
    records.append(FileRecord(CONFIG_FILE, (out / CONFIG_FILE).stat().st_size, sha256_file(out / CONFIG_FILE)))

    rows = _coerce_rows(measured_metrics)
    fmt = converted.source_format
    card = render_model_card(entry, repo_id, records, rows, num_classes=num_classes,
                             source_note=f"{fmt} checkpoint `{Path(name).name}`" if fmt else None,
                             eval_results=eval_results)
    atomic_write_text(out / CARD_FILE, card)
    return HubFolder(path=out, repo_id=repo_id, entry=entry, files={r.name: r.sha256 for r in records},
                     config=hub_config,
                     num_classes=num_classes)


def upload_hub_folder(folder: Union[HubFolder, PathLike], repo_id: Optional[str] = None, *,
                      endpoint: Optional[str] = None, token: Union[str, bool, None] = None,
                      private: Optional[bool] = None, revision: Optional[str] = None,
                      commit_message: Optional[str] = None) -> str:
    """``create_repo(exist_ok=True)`` + ``upload_folder``; returns the commit URL.

    ``endpoint`` defaults to ``HF_ENDPOINT`` (huggingface.co); refuses to run in offline mode.
    """
    path = folder.path if isinstance(folder, HubFolder) else Path(folder)
    repo_id = repo_id or (folder.repo_id if isinstance(folder, HubFolder) else None)
    if not repo_id:
        raise ValueError(f"upload of {path}: no repo id given")
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a Hub folder (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
                                f"run `moco-zoo publish --dry-run --local-dir {path}` first")
    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE"):
        raise ConnectionError(f"cannot upload {path} to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); "
                           f"unset it or use --dry-run")
    api = HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(path), revision=revision,
        commit_message=commit_message or f"Upload {repo_id} (moco-zoo)",
        allow_patterns=list(HUB_FILES),
    )
    return str(getattr(info, "commit_url", info))


def publish(
    checkpoint: Union[PathLike, Mapping[str, Any]],
    config: Union[PathLike, str, ZooEntry],
    repo_id: Optional[str] = None,
    *,
    local_dir: Optional[PathLike] = None,
    dry_run: bool = False,
    endpoint: Optional[str] = None,
    token: Union[str, bool, None] = None,
    private: Optional[bool] = None,
    metrics_files: Sequence[PathLike] = (),
    measured_metrics: Optional[Iterable[Union[MetricRow, Mapping[str, Any]]]] = None,
    eval_results_files: Sequence[PathLike] = (),
    allow_pickle: bool = False,
) -> Tuple[HubFolder, Optional[str]]:
    """Prepare the Hub folder (in ``local_dir`` or a temporary directory) and upload it unless ``dry_run``.

    Returns ``(folder, commit_url or None)``. When no ``local_dir`` is given and the upload succeeds, the temporary
    folder is removed afterwards (``folder.path`` then no longer exists).
    """
    rows = _coerce_rows(measured_metrics) + load_measured_metrics(metrics_files)
    folder = prepare_hub_folder(checkpoint, config, repo_id, local_dir, measured_metrics=rows,
                                eval_results=load_eval_results(eval_results_files), allow_pickle=allow_pickle)
    if dry_run:
        return folder, None
    try:
        url = upload_hub_folder(folder, endpoint=endpoint, token=token, private=private)
    finally:
        if local_dir is None and not dry_run:
            shutil.rmtree(folder.path, ignore_errors=True)
    return folder, url


def import_official(
    name: Union[str, PathLike, ZooEntry],
    *,
    file: Optional[PathLike] = None,
    url: Optional[str] = None,
    expected_md5: Optional[str] = None,
    out_dir: Optional[PathLike] = None,
    download_dir: Optional[PathLike] = None,
    repo_id: Optional[str] = None,
    measured_metrics: Optional[Iterable[Union[MetricRow, Mapping[str, Any]]]] = None,
    allow_pickle: bool = False,
) -> HubFolder:
    """Official release of zoo entry ``name`` -> verified file -> converted weights -> Hub folder in ``out_dir``.

    The file is ``file`` if given (a local copy), else downloaded from ``url`` (default: the URL in hub_configs) into
    ``download_dir`` (default ``$MOCO_ZOO_DATA/official`` or ``~/.cache/moco_zoo/official``). Its md5 must start with
    ``expected_md5`` (default: the prefix published by the authors, recorded in hub_configs; entries without a
    published checksum are not verified).
    """
    entry = zoo.resolve_entry(name)
    src = entry.source
    md5 = expected_md5 if expected_md5 is not None else src.md5_prefix
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"official checkpoint {path} for {entry.name} does not exist")
        verify_md5(path, md5)
    else:
        link = url or src.url
        if not link:
            raise ValueError(f"{entry.config_path or entry.name}: no official source URL recorded; pass --file")
        base = Path(download_dir) if download_dir is not None else Path(
            os.environ.get("MOCO_ZOO_DATA") or Path.home() / ".cache" / "moco_zoo") / "official"
        filename = (src.filename if not url else None) or link.rstrip("/").rsplit("/", 1)[-1]
        path = download_url(link, base / entry.name / filename, md5_prefix=md5)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "hub_folders" / entry.name
    return prepare_hub_folder(path, entry, repo_id, out, measured_metrics=measured_metrics,
                              allow_pickle=allow_pickle)
