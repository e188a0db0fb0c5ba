"""Run outputs: metrics JSON, Markdown tables, loss curve PNG, sample predictions with boxes and masks drawn."""
from __future__ import annotations

import io
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from moco_zoo.checkpoint import atomic_write_bytes, atomic_write_text
from moco_zoo.data.voc import voc_palette
from moco_zoo.plots import new_figure, save_png

# The columns shown per task: (label, path into the metrics dict).
COLUMNS = {
    "voc_det": [("AP50", ("AP50",)), ("AP", ("AP",)), ("AP75", ("AP75",)), ("AP50 (area)", ("AP50_area",))],
    "coco_det": [("box AP", ("bbox", "AP")), ("box AP50", ("bbox", "AP50")), ("box AP75", ("bbox", "AP75")),
                 ("mask AP", ("segm", "AP")), ("mask AP50", ("segm", "AP50")), ("mask AP75", ("segm", "AP75"))],
    "voc_seg": [("mIoU", ("mIoU",)), ("pixel acc", ("pixel_acc",)), ("mean acc", ("mean_acc",))],
}


def _get(metrics: Dict[str, Any], path) -> Optional[float]:
    cur: Any = metrics
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return float(cur) if isinstance(cur, (int, float)) else None


def metric_row(task: str, metrics: Dict[str, Any]) -> Dict[str, Optional[float]]:
    return {label: _get(metrics, path) for label, path in COLUMNS[task]}


def markdown_table(task: str, rows: Sequence[Dict[str, Any]]) -> str:
    """``rows``: dicts with ``weights`` and ``metrics``; columns without any value are omitted."""
    cols = [label for label, path in COLUMNS[task] if any(_get(r["metrics"], path) is not None for r in rows)]
    lines = ["| weights | arch | model | iters | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        vals = metric_row(task, r["metrics"])
        cells = ["-" if vals[c] is None else f"{vals[c]:.1f}" for c in cols]
        lines.append(f"| {r['weights']} | {r.get('arch', '')} | {r.get('model', '')} | {r.get('iters', '')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def plot_losses(history: List[Dict[str, float]], path: Path, title: str = "") -> Optional[Path]:
    """Total and per-term training losses against the iteration (log scale), lr on a second axis."""
    if not history:
        return None
    its = [h["iter"] for h in history]
    fig, ax = new_figure()
    keys = [k for k in history[0] if k.startswith("loss")]
    for k in keys:
        ax.plot(its, [h.get(k, float("nan")) for h in history], label=k, lw=2.0 if k == "loss" else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if "lr" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(its, [h["lr"] for h in history], color="grey", ls="--", lw=0.8)
        ax2.set_ylabel("lr", color="grey")
    ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def draw_prediction(image: torch.Tensor, output: Dict[str, torch.Tensor], class_names: Sequence[str],
                    score_thresh: float = 0.5, max_boxes: int = 20, min_boxes: int = 3) -> torch.Tensor:
    """uint8 CHW image with the predicted boxes (class and score) and masks above ``score_thresh`` drawn; the
    ``min_boxes`` best detections are drawn even below the threshold (early in training scores are low)."""

    img = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
    scores = output["scores"].cpu()
    order = torch.argsort(scores, descending=True)
    n = max(int((scores >= score_thresh).sum()), min(min_boxes, len(scores)))
    keep = order[:min(n, max_boxes)]
    if len(keep) == 0:
        return img
    palette = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
               "#bcf60c", "#fabebe", "#008080", "#e6beff"]
    labels = output["labels"].cpu()[keep]
    colors = [palette[int(l) % len(palette)] for l in labels]
    if "masks" in output:
        masks = output["masks"].cpu()[keep]
        masks = (masks[:, 0] if masks.dim() == 4 else masks) > 0.5
        img = draw_segmentation_masks(img, masks, alpha=0.45, colors=colors)
    names = [f"{class_names[int(l) - 1] if 0 < int(l) <= len(class_names) else int(l)} {float(s):.2f}"
             for l, s in zip(labels, scores[keep])]
    return draw_bounding_boxes(img, output["boxes"].cpu()[keep], labels=names, colors=colors, width=2)


def save_image(chw_uint8: torch.Tensor, path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(chw_uint8.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_segmentation_sample(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    """One PNG: the image, the ground truth and the prediction side by side (VOC palette; 255 = ignore)."""

    palette = voc_palette()
    img = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    colour = [palette[m.cpu().numpy().astype(np.int64).clip(0, 255)] for m in (mask, pred)]
    strip = np.concatenate([img, gap, colour[0], gap, colour[1]], axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def plot_eval_history(eval_history: List[Dict[str, Any]], task: str, path: Path, title: str = "") -> Optional[Path]:
    """The task's table metrics against the iteration, from the periodic evaluations."""
    if not eval_history:
        return None
    its = [e["iter"] for e in eval_history]
    fig, ax = new_figure()
    for label, key in COLUMNS[task]:
        values = [_get(e["metrics"], key) for e in eval_history]
        if any(v is not None for v in values):
            ax.plot(its, [float("nan") if v is None else v for v in values], marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def _by_weights(results: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["weights"], []).append(r)
    return groups


def seed_summary(task: str, results: Sequence[Dict[str, Any]]) -> Optional[str]:
    """Markdown table of mean +- std (sample std over seeds) per weights; None unless some weights ran >1 seed."""

    groups = _by_weights(results)
    if not any(len(g) > 1 for g in groups.values()):
        return None
    cols = [label for label, path in COLUMNS[task] if any(_get(r["metrics"], path) is not None for r in results)]
    lines = ["| weights | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for weights, runs in groups.items():
        cells = []
        for label in cols:
            values = [v for v in (metric_row(task, r["metrics"])[label] for r in runs) if v is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} +- {std:.1f}" if values else "-")
        lines.append(f"| {weights} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_seed_curves(task: str, results: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    """The task's first metric against the iteration (periodic evaluations + the final one), one line per weights
    with a mean +- std band over seeds."""

    label, key = COLUMNS[task][0]
    curves = {}
    for weights, runs in _by_weights(results).items():
        per_seed = []
        for r in runs:
            points = {e["iter"]: _get(e["metrics"], key) for e in r.get("eval_history", [])}
            points[r["iters"]] = _get(r["metrics"], key)
            per_seed.append(points)
        its = sorted(set.intersection(*(set(p) for p in per_seed)))
        values = np.array([[p[i] if p[i] is not None else np.nan for i in its] for p in per_seed], dtype=float)
        curves[weights] = (its, values)
    if not curves or all(len(its) < 2 for its, _ in curves.values()):
        return None
    fig, ax = new_figure()
    for weights, (its, values) in curves.items():
        mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0, ddof=1 if len(values) > 1 else 0)
        name = weights if len(weights) < 40 else "..." + weights[-37:]
        ax.plot(its, mean, marker="o", label=f"{name} ({len(values)} seeds)")
        ax.fill_between(its, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{task}: {label} (mean +- std over seeds)", fontsize=9)
    return save_png(fig, path)


def write_run(out: Path, result: Dict[str, Any], metrics: Dict[str, Any], history: List[Dict[str, float]],
              class_names: Sequence[str], description: str) -> None:
    """The files of one run, the same for every backend: ``metrics.json`` (``result`` + class names + confusion),
    ``history.json``, ``results.md``, ``loss_curve.png`` and ``eval_curve.png``."""
    task = result["task"]
    # segmentation metrics (and the confusion matrix) count the background as class 0
    names = ["background", *class_names] if task == "voc_seg" else list(class_names)
    write_json(out / "metrics.json", {**result, "class_names": names,
                                      **({"confusion": metrics["confusion"]} if "confusion" in metrics else {})})
    write_json(out / "history.json", history)
    md = [f"# {task}: {result['weights']}", "", description, "", markdown_table(task, [result])]
    per_class = metrics.get("per_class") or metrics.get("per_class_IoU")
    if isinstance(per_class, dict):
        label = "IoU" if task == "voc_seg" else "AP50"
        md += ["", f"| class | {label} |", "|---|---|"]
        for name, v in per_class.items():
            val = v.get("AP50") if isinstance(v, dict) else v
            md.append(f"| {name} | {'-' if val is None else f'{float(val):.1f}'} |")
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    title = f"{task} {result['weights']} ({result.get('engine', 'torchvision')})"
    plot_losses(history, out / "loss_curve.png", title=title)
    plot_eval_history(result.get("eval_history") or [], task, out / "eval_curve.png", title=title)
