"""Shared helpers for the benchmarks in bench/: timing, machine description, Markdown tables and JSON results.

Benchmarks are not tests. Each script prints a Markdown table and writes a JSON file (default
``bench/results/<name>.json``) holding the raw numbers plus a description of the machine and its load, so numbers
taken on a busy machine can be recognised as such later.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO_ROOT) not in sys.path:  # so `python bench/x.py` finds moco_zoo/ and pretrain/ without an install
    sys.path.insert(0, str(REPO_ROOT))


def default_data_dir() -> str:
    """Where benchmarks generate their synthetic data: ``$MOCO_ZOO_DATA/bench`` or ``~/.cache/moco_zoo/data/bench``
    (outside the repository, shared with moco_zoo.data's cache root)."""
    env = os.environ.get("MOCO_ZOO_DATA")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "moco_zoo" / "data"
    return str(root / "bench")


def set_threads(threads: Optional[int]) -> int:
    """Set torch intra-op threads (default: all cores this process may use); return the value in effect."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
                    return [fl for fl in flags if fl in keep]
    except OSError:
        pass
    return []


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> Dict[str, Any]:
    """CPU model, core count, flags relevant to bf16, torch build, threads and current load average."""
    import torch

    info: Dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": load_average(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # pragma: no cover - torchvision is a dependency, but keep the bench usable
        pass
    return info


def contention_note(info: Dict[str, Any]) -> str:
    """A one-line warning when the 1-minute load average exceeds the number of usable cores."""
    load = info.get("loadavg_1_5_15")
    cores = info.get("affinity_cpus") or info.get("logical_cpus") or 1
    if load and load[0] > 0.75 * cores:
        return (f"**under contention**: 1-min load average {load[0]} on {cores} cores when the run started; "
                "treat these numbers as indicative only")
    return ""


def sync(device=None) -> None:
    """Wait for queued device work (CUDA) so wall-clock timings are honest; a no-op on CPU."""
    import torch

    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5, min_time: float = 0.0,
            device=None) -> Dict[str, float]:
    """Call ``fn`` ``warmup`` times, then ``repeat`` times (more while ``min_time`` seconds are not reached).

    Returns best / median / mean seconds per call and the number of timed calls. Best-of-N is the least noisy
    estimate of what the hardware can do; the median shows what a run sees under the current load.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * max(repeat, 1) and min_time <= 0:
            break
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "n": len(times),
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100 or digits == 0:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None, digits: int = 1) -> str:
    """Render ``rows`` (dicts) as a GitHub Markdown table with the given column keys."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def write_json(name: str, payload: Dict[str, Any], out: Optional[str] = None) -> Path:
    """Write ``payload`` to ``out`` (or bench/results/<name>.json) atomically; return the path."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def common_args(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default, i.e. all usable cores)")
    parser.add_argument("--out", default=None, help=f"JSON output path (default: bench/results/{name}.json)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: checks the benchmark runs, numbers are meaningless")
    return parser


def print_header(title: str, info: Dict[str, Any]) -> None:
    print(f"## {title}\n")
    print(f"machine: {info['cpu']} ({info.get('affinity_cpus') or info['logical_cpus']} cores, "
          f"flags {' '.join(info['cpu_flags']) or '-'}), torch {info['torch']}, "
          f"{info['torch_threads']} threads, load {info.get('loadavg_1_5_15')}")
    note = contention_note(info)
    if note:
        print(note)
    print()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return rss / (1024 * 1024)
    return rss / 1024


def children_peak_rss_mb() -> float:
    """Peak RSS of the largest waited-for child process (DataLoader workers once joined), in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if sys.platform == "darwin":
        return rss / (1024 * 1024)
    return rss / 1024


class ChildMemorySampler:
    """Samples the memory of this process's descendants (DataLoader workers) in a background thread.

    ``ru_maxrss`` of a forked worker counts the pages it shares copy-on-write with its parent, so a worker forked
    from a bigger parent looks bigger without costing more. Beside the peak RSS this records the peak USS (pages
    private to the worker: what it really adds) and PSS (shared pages split among their users), per psutil's
    ``memory_full_info``. Without psutil (the ``bench`` extra) it records nothing.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak: Dict[str, float] = {}
        self._stop = None
        self._thread = None

    def __enter__(self) -> "ChildMemorySampler":
        import threading

        try:
            import psutil
        except ImportError:
            return self
        me = psutil.Process()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                for child in me.children(recursive=True):
                    try:
                        m = child.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    for key in ("rss", "uss", "pss"):
                        if hasattr(m, key):
                            self.peak[key] = max(self.peak.get(key, 0.0), getattr(m, key) / 2 ** 20)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def result(self) -> Dict[str, float]:
        """``{"workers_sampled_rss_mb", "workers_uss_mb", "workers_pss_mb"}``: the largest worker's peaks (MiB)."""
        return {f"workers_{'sampled_rss' if k == 'rss' else k}_mb": v for k, v in self.peak.items()}


def iter_sizes(spec: str) -> Iterable[int]:
    return [int(s) for s in spec.split(",") if s.strip()]


def run_worker(script: str, spec: Dict[str, Any], timeout: float, tail_lines: int = 12) -> Dict[str, Any]:
    """Run ``script --_worker SPEC_JSON`` in a fresh interpreter (its own peak RSS, nothing shared) and return the
    dict it printed on its ``RESULT {...}`` line, or ``{"error": ...}`` with the tail of its output."""
    cmd = [sys.executable, str(Path(script).resolve()), "--_worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
