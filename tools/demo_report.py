"""``demo_out/REPORT.md``: the demo's results, read back from the files each stage wrote (never from constants)."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from moco_zoo.checkpoint import atomic_write_text

# (column, stage, path inside that stage's summary or comparison row metrics)
COLUMNS = [
    ("kNN top-1", "lincls", ("knn_top1",)),
    ("linear top-1", "lincls", ("top1",)),
    ("VOC object kNN", "voc_object_knn", ("knn_top1",)),
    ("VOC AP50", "voc_det", ("AP50",)),
    ("VOC AP", "voc_det", ("AP",)),
    ("VOC AP75", "voc_det", ("AP75",)),
    ("COCO box AP", "coco_det", ("bbox", "AP")),
    ("COCO mask AP", "coco_det", ("segm", "AP")),
    ("VOC seg mIoU", "voc_seg", ("mIoU",)),
]


def _dig(d: Any, path: Sequence[str]) -> Optional[float]:
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return float(d) if isinstance(d, (int, float)) else None


def results_values(stages: Dict[str, Any]) -> Dict[str, Dict[str, List[float]]]:
    """{"MoCo v2": {column: [value per run]}, "random init": {...}} from the stage summaries (transfer stages run
    several seeds per backbone)."""
    rows: Dict[str, Dict[str, List[float]]] = {"MoCo v2": {}, "random init": {}}
    for column, stage, path in COLUMNS:
        s = stages.get(stage)
        if s is None:
            continue
        if stage == "lincls":
            pairs = [("MoCo v2", s.get("moco")), ("random init", s.get("random"))]
        else:
            pairs = [("random init" if r.get("weights") == "random" else "MoCo v2", r.get("metrics"))
                     for r in s.get("rows", [])]
        for key, metrics in pairs:
            value = _dig(metrics, path)
            if value is not None:
                rows[key].setdefault(column, []).append(value)
    return rows


def results_table(stages: Dict[str, Any]) -> Dict[str, Dict[str, Optional[float]]]:
    """{"MoCo v2": {column: mean over runs}, "random init": {...}}."""
    return {name: {c: statistics.fmean(v) for c, v in cols.items()} for name, cols in results_values(stages).items()}


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _fmt_runs(values: Optional[List[float]]) -> str:
    """``mean`` for one run, ``mean +- std`` (sample std) over several."""
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def _rel(path: str, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def _pngs(directory: Optional[str], per_run: int = 4) -> List[Path]:
    """The first ``per_run`` plots of each run folder of a transfer stage (loss curve first, then predictions), so
    MoCo and random init are both shown."""
    if not directory or not Path(directory).is_dir():
        return []
    out: List[Path] = []
    for run in sorted(d for d in Path(directory).iterdir() if d.is_dir()):
        first_seed = next((d for d in sorted(run.iterdir()) if d.is_dir() and d.name.startswith("seed")), run)
        out += sorted(first_seed.rglob("*.png"), key=lambda p: (p.parent != first_seed, str(p)))[:per_run]
    return out


def write_report(out: Path, book: Dict[str, Any], profile: Any, wall_seconds: float) -> Path:
    stages: Dict[str, Any] = book["stages"]
    rows = results_table(stages)
    values = results_values(stages)
    cols = [c for c, _, _ in COLUMNS if any(rows[r].get(c) is not None for r in rows)]
    lines = [
        "# moco-zoo demo report",
        "",
        f"Profile `{book['profile']}` on {platform.machine()} with {os.cpu_count()} CPU cores; "
        f"wall time of this invocation {wall_seconds / 60:.1f} min (stage times below, including earlier "
        "invocations that this one resumed). Every number below was read from the files the stages wrote.",
        "",
        "## Results: MoCo v2 backbone vs the same architecture randomly initialised (equal budgets)",
        "",
        "| backbone | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt_runs(values[name].get(c)) for c in cols) + " |")
    wins = [c for c in cols if rows["MoCo v2"].get(c) is not None and rows["random init"].get(c) is not None
            and rows["MoCo v2"][c] > rows["random init"][c]]
    compared = [c for c in cols if rows["MoCo v2"].get(c) is not None and rows["random init"].get(c) is not None]
    seeds = sorted({len(v) for name in values for c, v in values[name].items() if c.startswith(("VOC AP", "COCO", "VOC seg"))})
    if seeds and max(seeds) > 1:
        lines += ["", f"Transfer columns: mean ± std over {max(seeds)} fine-tuning seeds (each seed changes the head "
                      "init, the data order, the augmentation and the random backbone); the others are single runs."]
    lines += ["", f"MoCo beats random init on {len(wins)} of {len(compared)} metrics (means)"
                  + (f" (not on: {', '.join(c for c in compared if c not in wins)})." if len(wins) < len(compared)
                     else "."), ""]
    skipped = [what for on, what in (
        (getattr(profile, "run_coco", True), "COCO detection + instance segmentation (`--coco`, `make demo COCO=1`)"),
        (getattr(profile, "run_seg", True), "VOC semantic segmentation (`--seg`, `make demo SEG=1`)")) if not on]
    if skipped:
        lines += ["Not run in this profile (at a ~15-minute CPU budget they stay at noise level for both backbones): "
                  + "; ".join(skipped) + ".", ""]
    lin = stages.get("lincls", {})
    if (lin.get("random") or {}).get("knn_top1_data_bn") is not None:
        lines += ["kNN with BN statistics re-estimated on the train images (a random init's eval-mode BN has mean 0 "
                  "/ var 1, i.e. it does not normalise; a trained encoder's BN does): MoCo v2 "
                  f"{_fmt((lin.get('moco') or {}).get('knn_top1_data_bn'))}, random init "
                  f"{_fmt(lin['random']['knn_top1_data_bn'])}.", ""]
    if stages.get("voc_object_knn"):
        lines += ["VOC object kNN: the frozen backbone's kNN top-1 on the VOC test set's ground-truth objects (crops "
                  "of the boxes, memory = the trainval objects; `transfer/voc_object_knn.py`). It measures whether "
                  "the representation transfers to the detection set's objects; VOC AP also depends on how fast the "
                  "new detection heads learn in the fine-tuning budget.", ""]
    det_rows = (stages.get("voc_det") or {}).get("rows") or []
    r = det_rows[0] if det_rows else {}
    if r.get("model"):
        lines += [f"VOC detection: {r.get('arch')} {r['model']}, every layer "
                  f"fine-tuned for {r.get('iters')} iterations (`transfer/voc_det.py --preset cpu`; the exact command "
                  "is in `logs/voc_det.log`), tested on the VOC2007 test images; AP50 is the VOC07 11-point metric.",
                  ""]
    pre = stages.get("pretrain", {})
    if pre:
        lines += [f"Pretraining: {profile.arch} at {profile.image_size} px, {profile.pretrain_epochs} epochs of batch "
                  f"{profile.batch_size}, queue K={profile.moco_k}, m={profile.moco_m}, base lr {profile.lr}, "
                  f"InfoNCE loss {_fmt(pre.get('loss_first'), 3)} -> {_fmt(pre.get('loss_last'), 3)}, final kNN top-1 "
                  f"{_fmt(pre.get('knn_top1'))} (monitor during training).", ""]

    lines += ["## Plots", ""]
    for p in pre.get("plots", []):
        if Path(p).exists():
            lines.append(f"![{Path(p).stem}]({_rel(p, out)})")
    for stage in ("voc_det", "coco_det", "voc_seg"):
        s = stages.get(stage)
        if not s:
            continue
        if s.get("curves") and Path(s["curves"]).exists():
            lines.append(f"![{stage} learning curves, MoCo vs random init, mean ± std over seeds]"
                         f"({_rel(s['curves'], out)})")
        for png in _pngs(s.get("out_dir")):
            lines.append(f"![{stage} {png.parent.name} {png.stem}]({_rel(str(png), out)})")
    lines.append("")

    lines += ["## Stages", "", "| stage | seconds | summary |", "|---|---|---|"]
    for name, s in stages.items():
        lines.append(f"| {name} | {s.get('seconds', 0):.0f} | {s.get('summary', '')} |")
    lines += ["", "## Artifacts", ""]
    if pre:
        lines.append(f"- pretraining checkpoint: `{pre.get('checkpoint')}` (metrics `{pre.get('out_dir')}/metrics.jsonl`)")
    cp = stages.get("convert_publish", {})
    for fmt, path in cp.get("files", {}).items():
        lines.append(f"- {fmt} weights: `{path}`")
    if cp:
        lines.append(f"- Hub folder (model card, config.json, weights): `{cp.get('hub_folder')}`")
    for stage in ("voc_det", "coco_det", "voc_seg"):
        if stages.get(stage):
            lines.append(f"- {stage}: `{stages[stage].get('table')}` and per-run folders in `{stages[stage].get('out_dir')}`")
    lines.append(f"- logs of every command: `{out / 'logs'}`")

    lines += ["", "## Commands this run executed", ""]
    for name, s in stages.items():
        for cmd in s.get("commands", []):
            lines.append(f"- {name}: `{cmd}`")
    lines += ["", "## The same stages on real data and GPUs", "", REAL_DATA_COMMANDS]
    path = out / "REPORT.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


REAL_DATA_COMMANDS = """```bash
# MoCo v2, ResNet-50, ImageNet-1k on 8 GPUs of one node (global batch 256, lr 0.03 x 256/256), 200 epochs:
torchrun --nproc_per_node=8 pretrain/main_moco.py /data/imagenet --arch resnet50 --moco-version v2 \\
    --epochs 200 --batch-size 256 --lr 0.03 --output-dir runs/moco_v2_r50 --resume auto
# the same across 2 nodes (run on each node; global batch 512 -> lr scaled to 0.06 automatically):
torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
    pretrain/main_moco.py /data/imagenet --arch resnet50 --moco-version v2 --batch-size 512
# linear classification protocol (frozen backbone, lr 30, 100 epochs):
python pretrain/main_lincls.py /data/imagenet --pretrained runs/moco_v2_r50/checkpoints/<last>.pth --arch resnet50
# weights for timm / torchvision / detectron2, and a Hub release with a model card:
moco-zoo convert CKPT --to timm --out model.safetensors
moco-zoo convert CKPT --to detectron2 --out moco_r50.pkl
moco-zoo publish CKPT --config hub_configs/moco_v2_800ep.yaml --repo-id ORG/NAME
# frozen-feature kNN on the VOC07 test objects (minutes on one GPU or CPU):
python transfer/voc_object_knn.py --data-root /data/VOCdevkit --weights CKPT random --crop-size 224
# VOC07+12 detection, R50-C4, the paper's schedule on 8 GPUs (24k iterations, batch 16):
torchrun --nproc_per_node=8 transfer/voc_det.py --data-root /data/VOCdevkit --weights CKPT random \\
    torchvision-supervised --preset paper
# fewer GPUs: batch 8, 48k iterations, lr 0.01
torchrun --nproc_per_node=4 transfer/voc_det.py --data-root /data/VOCdevkit --weights CKPT --preset paper-8img
# COCO Mask R-CNN (R50-FPN, 2x) and VOC semantic segmentation:
torchrun --nproc_per_node=8 transfer/coco_det.py --data-root /data/coco --weights CKPT --preset paper-2x --detector fpn
torchrun --nproc_per_node=8 transfer/voc_seg.py --data-root /data/VOCdevkit --weights CKPT --preset paper
```"""
