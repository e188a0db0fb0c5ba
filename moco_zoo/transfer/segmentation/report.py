"""Segmentation run outputs: metrics JSON, Markdown tables, loss curve PNG, sample predictions (palette colours)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from moco_zoo.transfer.engine import report as _detection_report
from moco_zoo.checkpoint import atomic_write_bytes, atomic_write_text
from moco_zoo.data.voc import voc_palette

__all__ = ["write_json", "atomic_write_text", "run_markdown", "comparison_markdown", "plot_losses", "save_sample",
           "colorize"]


write_json = _detection_report.write_json


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def run_markdown(result: Dict[str, Any], class_names: Sequence[str]) -> str:
    m = result["metrics"]
    lines = [f"# voc_seg: {result['weights']} ({result['arch']}, {result['iters']} iterations)", "",
             "| mIoU | pixel acc | mean acc |", "|---|---|---|",
             f"| {_fmt(m['mIoU'])} | {_fmt(m['pixel_acc'])} | {_fmt(m['mean_acc'])} |", "",
             "| class | IoU |", "|---|---|"]
    lines += [f"| {n} | {_fmt(m['per_class_IoU'].get(n))} |" for n in class_names]
    return "\n".join(lines) + "\n"


def comparison_markdown(results: List[Dict[str, Any]]) -> str:
    lines = ["| weights | arch | iters | mIoU | pixel acc | mean acc |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        lines.append(f"| {r['weights']} | {r['arch']} | {r['iters']} | {_fmt(m['mIoU'])} | {_fmt(m['pixel_acc'])} | "
                     f"{_fmt(m['mean_acc'])} |")
    return "\n".join(lines) + "\n"


# the detection engine's loss plot handles any "loss*" history keys, including this one
plot_losses = _detection_report.plot_losses



def colorize(mask: torch.Tensor) -> np.ndarray:
    """HxW class indices (255 = ignore) -> HxWx3 uint8 in the VOC palette."""
    return voc_palette()[mask.cpu().numpy().astype(np.int64).clip(0, 255)]


def save_sample(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    """One PNG: the image, the ground truth and the prediction side by side (VOC palette; ignore = cream)."""
    from PIL import Image

    img = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    strip = np.concatenate([img, gap, colorize(mask), gap, colorize(pred)], axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
