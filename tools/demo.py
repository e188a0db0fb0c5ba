"""``make demo``: the whole moco-zoo pipeline on the embedded synthetic data, ending in ``demo_out/REPORT.md``.

Stages (each one is the project's normal command line, run as a subprocess and logged to ``<out>/logs/``):

1. ``moco-zoo make-data``: synthetic ImageFolder, VOC and COCO sets;
2. ``pretrain/main_moco.py``: MoCo v2 on the synthetic ImageFolder with the kNN monitor;
3. ``pretrain/main_lincls.py``: the linear-probe protocol, MoCo backbone vs the same encoder randomly initialised;
4. ``moco-zoo convert`` (timm, torchvision, detectron2) and ``moco-zoo publish`` to a local Hub test server, then
   ``timm.create_model('hf-hub:...', pretrained=True)`` in a fresh process through the Hugging Face cache (online,
   then offline), checking the features equal those of the checkpoint's query encoder;
5. ``transfer/voc_object_knn.py`` (frozen-feature kNN on the VOC objects), then ``transfer/voc_det.py``,
   ``transfer/coco_det.py``, ``transfer/voc_seg.py``: MoCo vs random init at equal budget;
6. ``REPORT.md``: every number read back from the stages' own output files, plots, artifact paths, and the commands
   to rerun each stage on real data and on GPUs.

Rerunning the same command skips finished stages (``<out>/stages.json``); interrupted stages resume through their own
``--resume`` support. ``--fast`` is a few-minute smoke version of the same path.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from moco_zoo.checkpoint import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_REPO_ID = "moco-zoo-demo/moco_r18.synthetic_demo"


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo run (the full one targets ~15 min on 2 CPU cores)."""

    arch: str = "resnet18"
    imagefolder_images: int = 4000  # 3000 train / 1000 val
    image_size: int = 64
    voc_images: int = 320
    coco_images: int = 200
    det_image_size: int = 128
    pretrain_epochs: int = 30
    batch_size: int = 128
    # Two batches of keys. In a run of a few hundred steps the encoder changes fast and a long queue holds keys of a
    # much older encoder: kNN after 8 epochs 19.6 / 21.8 / 24.1 / 24.8 at K = 2048 / 512 / 256 / 128 (same seed).
    moco_k: int = 256
    moco_m: float = 0.99  # 0.999 barely moves the key encoder in a run of a few hundred steps
    lr: float = 0.06  # base lr for batch 256 (absolute 0.03 at batch 128); 0.24 learned nothing class-related here
    knn_every: int = 5
    lincls_epochs: int = 6
    lincls_lr: float = 1.0
    # VOC detection: R18-FPN, not the paper's C4. At 128-160 px the C4 trunk's single stride-16 map is 8-10 cells
    # wide and most objects cover 1-5 of them; FPN adds stride-4/8 levels. At 150 iterations over detection seeds
    # 0/1/2, MoCo led random init on AP50, AP and AP75 for every seed with FPN (means 3.8/1.5/1.0 vs 2.9/1.1/0.4) but
    # not with C4 (README, demo section).
    det_detector: str = "fpn"
    # lr and gradient clipping of VOC and COCO detection: FPN's lateral convs have no norm layer and both diverged at
    # the cpu preset's lr 0.02 (see Demo.run_all)
    det_lr: float = 0.01
    det_clip_grad_norm: float = 5.0
    det_iters: int = 120
    coco_iters: int = 80
    seg_iters: int = 100
    max_test_images: int = 120
    transfer_seeds: Tuple[int, ...] = (0, 1, 2)  # each seed: head init, data order, augmentation, random backbone
    # transfer runs side by side (--jobs), each with its share of the threads: a batch-4 R18-FPN step at 128-160 px
    # does not keep 2 cores busy, two one-thread runs do (README, demo section)
    transfer_jobs: int = 2
    eval_period: int = 40  # test points of the learning curves
    # COCO Mask R-CNN and VOC segmentation do not fit a meaningful budget into ~15 min on 2 cores (80 / 100
    # iterations gave box/mask AP < 1 and background-only masks for both backbones), so the full profile leaves them
    # to --coco / --seg; the fast profile runs them as smoke tests of the same path.
    run_coco: bool = False
    run_seg: bool = False


PROFILES: Dict[str, Profile] = {
    "full": Profile(),
    "fast": Profile(imagefolder_images=400, voc_images=48, coco_images=40, pretrain_epochs=2, moco_k=256,
                    batch_size=64, knn_every=1, run_coco=True, run_seg=True,
                    lincls_epochs=2, det_iters=20, coco_iters=10, seg_iters=10, max_test_images=12,
                    transfer_seeds=(0, 1), eval_period=10),
}


# ----------------------------------------------------------------------------------------------------- running


def _fast_cpu_flags() -> List[str]:
    """Autocast where it pays (``--precision auto``: bf16 on CPUs with native bf16, ~1.8x the fp32 step there, see
    bench/RESULTS.md; bf16/fp16 on CUDA; fp32 elsewhere) and channels_last whenever autocast is on. The same rule
    as ``tools/compare_mechanisms.py``."""
    from moco_zoo.device import autocast_dtype, default_device

    amp = autocast_dtype(default_device(), "auto")
    return ["--precision", "auto", "--set", f"channels_last={str(amp is not None).lower()}"]


def _python(*args: str) -> List[str]:
    return [sys.executable, *args]


def run_command(cmd: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None) -> None:
    """Run ``cmd`` from the repo root, streaming its output to the terminal and to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
            f.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"command failed with exit code {code} (log: {log}): {shlex.join(cmd)}")


def _comparison_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """``AP50/AP/AP75 MoCo a/b/c vs random d/e/f`` (or box/mask AP, mIoU) from a transfer comparison.json; with
    several seeds per weights, the means."""
    rows = _mean_over_seeds(rows)
    def fmt(m: Dict[str, Any]) -> str:
        if "AP50" in m:
            return "/".join(f"{m[k]:.1f}" for k in ("AP50", "AP", "AP75"))
        if "bbox" in m:
            return "/".join(f"{m[k]['AP']:.1f}" for k in ("bbox", "segm") if k in m)
        return f"{m['mIoU']:.1f}" if "mIoU" in m else "?"

    first = rows[0]["metrics"] if rows else {}
    what = ("AP50/AP/AP75" if "AP50" in first else "box/mask AP" if "bbox" in first
            else "mIoU" if "mIoU" in first else "metrics")
    parts = [f"{'random' if r['weights'] == 'random' else 'MoCo'} {fmt(r['metrics'])}" for r in rows]
    return f"{what} " + " vs ".join(parts)


def _mean_over_seeds(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per weights whose metrics are the means over that weights' runs (nested dicts averaged leafwise)."""
    import statistics

    def mean(values: List[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            return {k: mean([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return statistics.fmean(values)
        return values[0]

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["weights"], []).append(r)
    return [{"weights": w, "metrics": mean([r["metrics"] for r in g])} for w, g in groups.items()]


class StageBook:
    """Finished stages and their summaries in ``<out>/stages.json``, so a rerun continues where it stopped."""

    def __init__(self, path: Path, profile_name: str) -> None:
        self.path = path
        self.data: Dict[str, Any] = {"profile": profile_name, "stages": {}}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("profile") == profile_name:
                self.data = old

    def done(self, name: str) -> Optional[Dict[str, Any]]:
        return self.data["stages"].get(name)

    def finish(self, name: str, summary: Dict[str, Any]) -> None:
        self.data["stages"][name] = summary
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------ stages


class Demo:
    def __init__(self, out: Path, profile: Profile, profile_name: str) -> None:
        self.out = out.resolve()
        self.p = profile
        self.profile_name = profile_name
        self.logs = self.out / "logs"
        self.book = StageBook(self.out / "stages.json", profile_name)
        self.data = self.out / "data"
        self.commands: Dict[str, List[str]] = {}

    # paths every stage agrees on
    @property
    def imagefolder(self) -> Path:
        return self.data / "imagefolder"

    @property
    def voc_devkit(self) -> Path:
        return self.data / "voc" / "VOCdevkit"

    @property
    def coco_root(self) -> Path:
        return self.data / "coco"

    def run(self, stage: str, cmd: Sequence[str], env: Optional[Dict[str, str]] = None) -> None:
        self.commands.setdefault(stage, []).append(shlex.join(cmd))
        run_command(cmd, self.logs / f"{stage}.log", env)

    def stage(self, name: str, fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        done = self.book.done(name)
        if done is not None:
            print(f"[demo] {name}: already done ({done.get('summary', '')}), skipping", flush=True)
            return done
        print(f"\n[demo] ===== {name} =====", flush=True)
        t0 = time.time()
        result = fn()
        result["seconds"] = round(time.time() - t0, 1)
        result["commands"] = self.commands.get(name, [])
        self.book.finish(name, result)
        print(f"[demo] {name}: {result.get('summary', 'done')} ({result['seconds']:.0f} s)", flush=True)
        return result

    # 1. data
    def make_data(self) -> Dict[str, Any]:
        p = self.p
        mk = ["-m", "moco_zoo", "make-data"]
        jobs = [
            ("imagefolder", self.imagefolder, p.imagefolder_images, p.image_size, []),
            ("voc", self.data / "voc", p.voc_images, p.det_image_size, ["--voc2012"]),
            ("coco", self.coco_root, p.coco_images, p.det_image_size, []),
        ]
        for kind, out, n, size, extra in jobs:
            self.run("data", _python(*mk, kind, "--out", str(out), "--num-images", str(n), "--image-size", str(size),
                                     "--seed", "0", "--overwrite", *extra))
        return {"summary": f"imagefolder {self.imagefolder}, VOC {self.voc_devkit}, COCO {self.coco_root}",
                "imagefolder": str(self.imagefolder), "voc": str(self.voc_devkit), "coco": str(self.coco_root)}

    # 2. pretraining
    def pretrain(self) -> Dict[str, Any]:
        p = self.p
        out = self.out / "pretrain"
        self.run("pretrain", _python(
            "pretrain/main_moco.py", str(self.imagefolder), "--preset", "cpu-small", "--arch", p.arch,
            "--image-size", str(p.image_size), "--epochs", str(p.pretrain_epochs), "--batch-size", str(p.batch_size),
            "--lr", str(p.lr), "--moco-k", str(p.moco_k), "--moco-m", str(p.moco_m),
            # colour ops batched in the training process, loading in it too: on 2 cores this beats PIL workers
            # that compete with the step (~187 vs ~117 img/s here; bench/RESULTS.md)
            "--workers", "0",
            "--output-dir", str(out), "--resume", "auto", "--seed", "0",
            *_fast_cpu_flags(), f"knn_every={p.knn_every}"))
        from moco_zoo.pretrain.engine import list_checkpoints

        ckpts = list_checkpoints(out / "checkpoints")
        if not ckpts:
            raise RuntimeError(f"pretraining wrote no checkpoint under {out / 'checkpoints'}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        knn = [r for r in records if "knn_top1" in r]
        first_loss = next((r["loss"] for r in records if "loss" in r), None)
        last_loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
        knn_top1 = knn[-1]["knn_top1"] if knn else None
        summary = (f"kNN top-1 {knn_top1:.1f}, " if knn_top1 is not None else "") + (
            f"InfoNCE loss {first_loss:.3f} -> {last_loss:.3f}" if first_loss is not None else "no loss logged")
        return {"summary": summary, "checkpoint": str(ckpts[0][1]),
                "knn_top1": knn_top1, "loss_first": first_loss, "loss_last": last_loss,
                "plots": [str(out / "loss.png"), str(out / "knn.png")], "out_dir": str(out)}

    # 3. linear probe, MoCo vs random
    def lincls(self, checkpoint: str) -> Dict[str, Any]:
        p = self.p
        results = {}
        for name, spec in (("moco", checkpoint), ("random", "random")):
            out = self.out / "lincls" / name
            self.run("lincls", _python(
                "pretrain/main_lincls.py", str(self.imagefolder), "--pretrained", spec, "--arch", p.arch,
                "--image-size", str(p.image_size), "--epochs", str(p.lincls_epochs), "--batch-size", "64",
                "--lr", str(p.lincls_lr), "--workers", "2", "--output-dir", str(out), "--resume", "auto", "--seed", "0",
                *_fast_cpu_flags()))
            results[name] = json.loads((out / "metrics.json").read_text())
        return {"summary": f"linear top-1 MoCo {results['moco']['top1']:.1f} vs random {results['random']['top1']:.1f}",
                "moco": _pick(results["moco"], "top1", "knn_top1", "knn_top1_data_bn"),
                "random": _pick(results["random"], "top1", "knn_top1", "knn_top1_data_bn")}

    # 4. convert, publish to a local Hub, load back through timm
    def convert_publish(self, checkpoint: str) -> Dict[str, Any]:
        conv = self.out / "converted"
        files = {"timm": conv / "model.safetensors", "torchvision": conv / "resnet_torchvision.pth",
                 "detectron2": conv / "moco_detectron2.pkl"}
        for to, path in files.items():
            self.run("convert_publish", _python("-m", "moco_zoo", "convert", checkpoint, "--to", to,
                                                "--out", str(path)))
        config = self._write_demo_hub_config(Path(checkpoint))
        hf_home = self.out / "hf_home"
        hub_dir = self.out / "hub" / DEMO_REPO_ID.replace("/", "__")
        from tools.hub_server import LocalHubServer

        check = _python("-m", "tools.demo", "--check-hub-load", DEMO_REPO_ID, "--checkpoint", checkpoint)
        base_env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_DISABLE_XET": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1"}
        with LocalHubServer() as endpoint:
            online = dict(base_env, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0")
            self.run("convert_publish", _python(
                "-m", "moco_zoo", "publish", checkpoint, "--config", str(config), "--repo-id", DEMO_REPO_ID,
                "--local-dir", str(hub_dir), "--endpoint", endpoint,
                "--metrics", str(self.out / "lincls" / "moco" / "metrics.json")), env=online)
            self.run("convert_publish", check, env=online)
        # the server is gone: the same load must now come from the Hugging Face cache alone
        self.run("convert_publish", check, env=dict(base_env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"))
        return {"summary": f"converted to {len(files)} formats, published {DEMO_REPO_ID} and loaded it back "
                           "through timm (online and offline): features match",
                "files": {k: str(v) for k, v in files.items()}, "hub_folder": str(hub_dir),
                "hub_config": str(config)}

    def _write_demo_hub_config(self, checkpoint: Path) -> Path:
        """A hub_configs-style entry for the demo model (same schema as the files in hub_configs/)."""
        import yaml

        src = yaml.safe_load((REPO_ROOT / "hub_configs" / "moco_v2_200ep.yaml").read_text())
        src.update({
            "model": "moco_r18", "tag": "synthetic_demo", "default": False, "architecture": self.p.arch,
            "model_args": {}, "moco_version": "v2", "license": "apache-2.0", "dataset": "moco-zoo-synthetic",
            "description": f"MoCo v2 {self.p.arch} pretrained by `make demo` on the moco-zoo synthetic ImageFolder "
                           f"({self.p.image_size} px, {self.p.pretrain_epochs} epochs)",
            "hub": {"repo_id": DEMO_REPO_ID, "published": True},
            # the source of this model is the local checkpoint the demo trained
            "source": {"url": checkpoint.resolve().as_uri(), "filename": checkpoint.name, "format": "moco-pretrain",
                       "origin_url": "https://github.com/moco-zoo/moco-zoo"},
            "metrics": {}, "classifiers": [],
            "metrics_source": "measured by this demo run",
        })
        src["recipe"] = dict(src.get("recipe", {}), epochs=self.p.pretrain_epochs, batch_size=self.p.batch_size,
                             lr=self.p.lr, moco_k=self.p.moco_k, moco_m=self.p.moco_m, image_size=self.p.image_size)
        path = self.out / "hub_config_demo.yaml"
        atomic_write_text(path, yaml.safe_dump(src, sort_keys=False))
        return path

    # 5. transfer
    def transfer(self, script: str, stage: str, data_root: Path, iters: int, checkpoint: str,
                 extra: Sequence[str] = ()) -> Dict[str, Any]:
        out = self.out / stage
        self.run(stage, _python(
            f"transfer/{script}", "--data-root", str(data_root), "--weights", checkpoint, "random",
            "--preset", "cpu", "--arch", self.p.arch, "--iters", str(iters),
            "--seeds", *map(str, self.p.transfer_seeds), "--eval-period", str(self.p.eval_period),
            "--jobs", str(self.p.transfer_jobs),
            "--max-test-images", str(self.p.max_test_images), "--output-dir", str(out), "--resume", *extra))
        rows = json.loads((out / "comparison.json").read_text())
        curves = out / "curves.png"
        return {"summary": _comparison_summary(rows) + f" (table: {out / 'comparison.md'})", "rows": rows,
                "table": str(out / "comparison.md"), "out_dir": str(out),
                "curves": str(curves) if curves.is_file() else None}

    def object_knn(self, checkpoint: str) -> Dict[str, Any]:
        """Frozen-feature kNN on the VOC test objects (crops at the pretraining resolution), MoCo vs random init."""
        out = self.out / "voc_object_knn"
        self.run("voc_object_knn", _python(
            "transfer/voc_object_knn.py", "--data-root", str(self.voc_devkit), "--weights", checkpoint, "random",
            "--arch", self.p.arch, "--crop-size", str(self.p.image_size), "--output-dir", str(out)))
        rows = json.loads((out / "object_knn.json").read_text())
        top1 = {("random" if r["weights"] == "random" else "moco"): r["metrics"]["knn_top1"] for r in rows}
        return {"summary": f"VOC object kNN top-1 MoCo {top1['moco']:.1f} vs random {top1['random']:.1f}",
                "rows": rows, "table": str(out / "object_knn.md"), "out_dir": str(out)}

    def run_all(self) -> Path:
        t0 = time.time()
        self.stage("data", self.make_data)
        pre = self.stage("pretrain", self.pretrain)
        ckpt = pre["checkpoint"]
        self.stage("lincls", lambda: self.lincls(ckpt))
        self.stage("convert_publish", lambda: self.convert_publish(ckpt))
        self.stage("voc_object_knn", lambda: self.object_knn(ckpt))
        # half the cpu preset's lr and gradient-norm clipping for both FPN detectors: Mask R-CNN from the
        # short-pretrained MoCo backbone diverged to NaN at lr 0.02 (fp32) and at 0.01 without clipping (bf16,
        # iteration 51); VOC FPN at lr 0.02 at iteration 37
        solver = ("--lr", str(self.p.det_lr), "--set", f"clip_grad_norm={self.p.det_clip_grad_norm}")
        self.stage("voc_det", lambda: self.transfer(
            "voc_det.py", "voc_det", self.voc_devkit, self.p.det_iters, ckpt,
            extra=("--detector", self.p.det_detector, *solver)))
        if self.p.run_coco:
            self.stage("coco_det", lambda: self.transfer(
                "coco_det.py", "coco_det", self.coco_root, self.p.coco_iters, ckpt, extra=solver))
        if self.p.run_seg:
            self.stage("voc_seg", lambda: self.transfer("voc_seg.py", "voc_seg", self.voc_devkit,
                                                        self.p.seg_iters, ckpt))
        from tools.demo_report import write_report

        report = write_report(self.out, self.book.data, self.p, time.time() - t0)
        print(f"\n[demo] report: {report}", flush=True)
        return report


def _pick(d: Dict[str, Any], *keys: str) -> Dict[str, Any]:
    return {k: d.get(k) for k in keys}


# ------------------------------------------------------------------------------------------ hub load-back check


def check_hub_load(repo_id: str, checkpoint: str) -> int:
    """In a fresh process: plain timm loads ``hf-hub:repo_id`` and its features equal the checkpoint encoder's."""
    import timm
    import torch

    model = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    from moco_zoo.backbones import load_backbone  # imported after timm's load: plain timm did the above

    reference = load_backbone(checkpoint).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), reference(x)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        print(f"hub load-back MISMATCH for {repo_id}: max abs diff {(a - b).abs().max().item():.3g}")
        return 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    print(f"hub load-back ok (HF_HUB_OFFLINE={offline}): timm.create_model('hf-hub:{repo_id}') features "
          f"{tuple(a.shape)} equal the checkpoint's query encoder (max abs diff {(a - b).abs().max().item():.2g})")
    return 0


def select_profile(name: str, coco: Optional[bool] = None, seg: Optional[bool] = None) -> Profile:
    """The named profile with the optional stages switched on/off (``None`` keeps the profile's choice)."""
    profile = PROFILES[name]
    if coco is not None:
        profile = dataclasses.replace(profile, run_coco=coco)
    if seg is not None:
        profile = dataclasses.replace(profile, run_seg=seg)
    return profile


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", "--out", dest="out", default="demo_out",
                    help="output directory (reruns continue where they stopped)")
    ap.add_argument("--fast", action="store_true", help="few-minute smoke version of the same pipeline")
    ap.add_argument("--coco", action=argparse.BooleanOptionalAction, default=None,
                    help="COCO detection + instance segmentation stage (default: on with --fast, off in the full "
                         "profile, where ~3 min of CPU give AP < 1 for both backbones)")
    ap.add_argument("--seg", action=argparse.BooleanOptionalAction, default=None,
                    help="VOC semantic segmentation stage (default: on with --fast, off in the full profile)")
    ap.add_argument("--check-hub-load", metavar="REPO_ID", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check_hub_load:
        return check_hub_load(args.check_hub_load, args.checkpoint)
    name = "fast" if args.fast else "full"
    Demo(Path(args.out), select_profile(name, coco=args.coco, seg=args.seg), name).run_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
