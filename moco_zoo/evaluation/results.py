"""Aggregating per-seed results into rows (mean +- sample std over seeds and tries) and writing ``results.json``,
``results.csv`` and ``results.md``."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

from moco_zoo.checkpoint import atomic_write_text, read_json_object

RESULTS_FORMAT = 1


@dataclass
class ResultRow:
    protocol: str
    metric: str
    mean: float
    std: float  # sample standard deviation (ddof 1); 0 for a single value
    n: int
    values: List[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the protocol per seed (mean over seeds)


def mean_std(values: Sequence[float]) -> tuple:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def make_row(protocol: str, metric: str, values: Sequence[float], seconds: Sequence[float] = ()) -> ResultRow:
    m, s = mean_std([float(v) for v in values])
    t = sum(seconds) / len(seconds) if seconds else 0.0
    return ResultRow(protocol, metric, m, s, len(values), [float(v) for v in values], t)


def markdown_table(rows: Sequence[ResultRow]) -> str:
    lines = ["| protocol | metric | mean ± std | n | time per seed (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.protocol} | {r.metric} | {r.mean:.2f} ± {r.std:.2f} | {r.n} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: Sequence[ResultRow], meta: Dict[str, Any]) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"format": RESULTS_FORMAT, **meta, "results": [asdict(r) for r in rows]}
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    atomic_write_text(paths["json"], json.dumps(data, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["backbone", "dataset", "protocol", "metric", "mean", "std", "n", "seconds_per_seed", "values"])
    for r in rows:
        writer.writerow([meta.get("backbone", ""), meta.get("dataset", ""), r.protocol, r.metric, f"{r.mean:.4f}",
                         f"{r.std:.4f}", r.n, f"{r.seconds:.2f}", " ".join(f"{v:.4f}" for v in r.values)])
    atomic_write_text(paths["csv"], buf.getvalue())
    head = (f"# Evaluation of `{meta.get('backbone', '')}` on {meta.get('dataset', '')}\n\n"
            f"Seeds: {', '.join(str(s) for s in meta.get('seeds', []))}; mean ± sample std over seeds "
            f"(few-shot: over seeds x tries); top-1 accuracy (%).\n\n")
    atomic_write_text(paths["md"], head + markdown_table(rows))
    return paths


def read_results(path: Path) -> Dict[str, Any]:
    """A ``results.json`` of ``moco-zoo eval`` (checked: one clear error for anything else)."""
    path = Path(path)
    data = read_json_object(path, "results file")
    if not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a results.json of `moco-zoo eval` (no 'results' list)")
    for i, r in enumerate(data["results"]):
        if not isinstance(r, dict) or not {"protocol", "metric", "mean"} <= set(r):
            raise ValueError(f"{path}: results[{i}] lacks protocol/metric/mean")
    return data
