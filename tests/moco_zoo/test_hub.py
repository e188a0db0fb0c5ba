"""Hub folders, model cards, publish / download / import-official, end to end against the local Hub test server.

The end-to-end test runs the real huggingface_hub client against tools.hub_server.LocalHubServer on 127.0.0.1:
publish with the CLI, then hf_hub_download, plain timm `hf-hub:` (in a subprocess that never imports moco_zoo) and the
zoo name `moco_r50.v2_800ep` load the same tensors; after the server is shut down the same loads succeed from the cache
with offline mode on. Nothing here touches the real network.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

timm = pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")

from huggingface_hub import ModelCard, hf_hub_download  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from moco_zoo import hub, publish, zoo  # noqa: E402
from moco_zoo.checkpoint import CheckpointError  # noqa: E402
from tools.hub_server import LocalHubServer, hub_client_pointed_at  # noqa: E402
from moco_zoo.zoo_cli import add_commands  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
V2_800 = ROOT / "hub_configs" / "moco_v2_800ep.yaml"


# ---------------------------------------------------------------------------------------------------------- helpers


def _run_cli(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="moco-zoo")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def _official_v2(arch: str, path: Path, seed: int = 0) -> dict:
    """An official facebookresearch/moco v2 file (``module.encoder_q.*`` with the MLP head, queue); returns the
    expected canonical backbone."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0)
    backbone, dim = model.state_dict(), model.num_features
    sd = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(64, dim), "module.encoder_q.fc.0.bias": torch.zeros(64),
               "module.encoder_q.fc.2.weight": torch.randn(16, 64), "module.encoder_q.fc.2.bias": torch.zeros(16),
               "module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 800, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return backbone


def _official_v3_vit(arch: str, path: Path, seed: int = 0, **model_args) -> dict:
    """An official moco-v3 ViT file (``module.base_encoder.*`` whose ``head`` is the projector MLP)."""
    torch.manual_seed(seed)
    backbone = timm.create_model(arch, num_classes=0, **model_args).state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in backbone.items()})
    dim = backbone["cls_token"].shape[-1]
    for enc in ("base_encoder", "momentum_encoder"):
        sd.update({f"module.{enc}.head.0.weight": torch.randn(32, dim), f"module.{enc}.head.1.weight": torch.ones(32),
                   f"module.{enc}.head.1.bias": torch.zeros(32), f"module.{enc}.head.3.weight": torch.randn(8, 32)})
    sd.update({"module.predictor.0.weight": torch.randn(32, 8), "module.predictor.3.weight": torch.randn(8, 32)})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {}}, path)
    return backbone


def _small_config(tmp_path: Path, architecture: str = "resnet18", *, model: str = "moco_r50", tag: str = "test_r18",
                  model_args=None, md5_prefix=None, base: Path = V2_800) -> Path:
    """A hub_configs entry like ``base`` but for a small architecture (keeps the tests fast)."""
    data = yaml.safe_load(base.read_text())
    data.update(model=model, tag=tag, architecture=architecture, model_args=model_args or {}, default=False)
    data["hub"] = {"repo_id": f"moco-zoo-test/{model}.{tag}", "published": False}
    data["source"] = dict(data["source"], md5_prefix=md5_prefix)
    out = tmp_path / f"{model}_{tag}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, "model card has no YAML front matter"
    return yaml.safe_load(m.group(1))


def _features(model, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(1, 3, 128, 128)  # small input: these are equality checks, not benchmarks
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------------ folder and card


def test_hub_folder_resnet(tmp_path):
    ckpt = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    expected = _official_v2("resnet18", ckpt)
    cfg = _small_config(tmp_path)
    metrics = tmp_path / "lincls.json"
    metrics.write_text(json.dumps({"source": "synthetic lincls run", "dataset": "synthetic-shapes",
                                   "metrics": {"top1": 61.25, "top5": 97.5, "note": "text is ignored"}}))
    folder = publish.prepare_hub_folder(ckpt, cfg, "org/moco-r18", tmp_path / "out",
                                    measured_metrics=publish.load_measured_metrics([metrics]))
    out = folder.path
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "detectron2.pkl", "model.safetensors"]

    # config.json: plain timm arch, headless, full pretrained_cfg of its own (no inherited timm tag / foreign source)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 0 and config["num_features"] == 512
    pcfg = config["pretrained_cfg"]
    for key in ("tag", "hf_hub_id", "url", "file", "source", "test_input_size", "test_crop_pct", "label_names"):
        assert key not in pcfg, key
    assert pcfg["interpolation"] == "bilinear" and pcfg["crop_pct"] == 0.875 and pcfg["input_size"] == [3, 224, 224]
    assert pcfg["mean"] == [0.485, 0.456, 0.406] and pcfg["std"] == [0.229, 0.224, 0.225]
    assert pcfg["license"] == "cc-by-nc-4.0" and pcfg["num_classes"] == 0 and pcfg["paper_ids"] == "arXiv:2003.04297"
    assert pcfg["classifier"] == "fc" and pcfg["first_conv"] == "conv1" and pcfg["custom_load"] is False

    # weights: strict-load into timm and torchvision, same features as the encoder inside the MoCo checkpoint
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in expected)
    ref = timm.create_model("resnet18", num_classes=0)
    ref.load_state_dict(expected)
    tm = timm.create_model("resnet18", num_classes=0)
    tm.load_state_dict(sd, strict=True)
    import torchvision

    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(sd, strict=True)
    ref_feats = _features(ref)
    torch.testing.assert_close(_features(tm), ref_feats)
    torch.testing.assert_close(_features(tv), ref_feats)
    # plain timm reads the folder's config.json + weights (local-dir source) without any moco_zoo help
    local = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert local.num_classes == 0 and local.pretrained_cfg["interpolation"] == "bilinear"
    torch.testing.assert_close(_features(local), ref_feats)

    # detectron2 file: the MoCo converter's layout
    with open(out / "detectron2.pkl", "rb") as f:
        d2 = pickle.load(f)
    assert d2["__author__"] == "MOCO" and d2["matching_heuristics"] is True
    assert "stem.conv1.weight" in d2["model"] and "res2.0.conv1.norm.weight" in d2["model"]

    # model card: valid front matter for yaml and for huggingface_hub, checksums, metrics, usage, citations
    text = (out / "README.md").read_text()
    front = _front_matter(text)
    assert front["library_name"] == "timm" and front["license"] == "cc-by-nc-4.0"
    assert {"image-feature-extraction", "moco", "self-supervised", "timm"} <= set(front["tags"])
    assert front["datasets"] and front["pipeline_tag"] == "image-feature-extraction"
    card = ModelCard(text)
    assert card.data.library_name == "timm" and card.data.license == "cc-by-nc-4.0"
    assert card.data.eval_results and card.data.eval_results[0].metric_value == 71.1
    assert card.data.to_dict()["tags"] == front["tags"]
    for name in ("model.safetensors", "detectron2.pkl", "config.json"):
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert digest in text and folder.files[name] == digest
    assert "| ImageNet-1k linear probe top-1 (%) | imagenet-1k | 71.1 | published |" in text
    assert "| top1 | synthetic-shapes | 61.25 | this project (synthetic lincls run) |" in text
    assert "note" not in [r.name for r in publish.load_measured_metrics([metrics])]
    assert 'timm.create_model("hf-hub:org/moco-r18", pretrained=True)' in text
    assert "torchvision.models.resnet18()" in text and 'hf_hub_download("org/moco-r18", "detectron2.pkl")' in text
    assert "@inproceedings{he2020moco" in text and "@article{chen2020mocov2" in text


def test_hub_folder_vit_classifier_and_errors(tmp_path):
    # ViT (MoCo v3 layout): model_args carried into config.json, no detectron2 file, plain timm builds it
    ckpt = tmp_path / "vit-t-300ep.pth.tar"
    expected = _official_v3_vit("vit_tiny_patch16_224", ckpt, num_heads=6)
    cfg = _small_config(tmp_path, "vit_tiny_patch16_224", model="moco_vit_small", tag="test_vit_t",
                        model_args={"num_heads": 6}, base=ROOT / "hub_configs" / "moco_v3_vit_small_300ep.yaml")
    folder = publish.prepare_hub_folder(ckpt, cfg, "org/moco-vit-t", tmp_path / "vit")
    config = json.loads((folder.path / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["num_heads"] == 6
    assert config["pretrained_cfg"]["fixed_input_size"] is True and config["global_pool"] == "token"
    assert not (folder.path / "detectron2.pkl").exists()
    model = timm.create_model(f"local-dir:{folder.path}", pretrained=True)
    assert model.blocks[0].attn.num_heads == 6
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    text = (folder.path / "README.md").read_text()
    assert "torchvision's ViT uses different parameter names" in text and "detectron2.pkl" not in text
    assert "@inproceedings{chen2021mocov3" in text and "@inproceedings{he2020moco" in text

    # a linear-probe checkpoint (backbone + trained fc) becomes a classifier repo with its class names
    torch.manual_seed(0)
    clf = timm.create_model("resnet18", num_classes=4)
    names = ["circle", "square", "triangle", "star"]
    lp = tmp_path / "lincls.pth"
    torch.save({"kind": "linear-probe", "format_version": 1, "arch": "resnet18", "num_classes": 4,
                "class_names": names, "state_dict": clf.state_dict(), "source": "test", "metrics": {}}, lp)
    folder = publish.prepare_hub_folder(lp, _small_config(tmp_path), "org/moco-r18-lincls", tmp_path / "clf")
    config = json.loads((folder.path / "config.json").read_text())
    assert config["num_classes"] == 4 and config["label_names"] == names
    assert folder.entry.is_classifier
    front = _front_matter((folder.path / "README.md").read_text())
    assert front["pipeline_tag"] == "image-classification"
    loaded = timm.create_model(f"local-dir:{folder.path}", pretrained=True)
    assert list(loaded.pretrained_cfg["label_names"]) == names  # timm reads the root label_names of save_for_hf
    torch.testing.assert_close(_features(loaded), _features(clf))

    # errors name the file and the problem
    with pytest.raises(CheckpointError, match="resnet50"):
        publish.prepare_hub_folder(tmp_path / "vit-t-300ep.pth.tar", V2_800, "org/x", tmp_path / "bad")
    with pytest.raises(ValueError, match="ORG/NAME"):
        publish.prepare_hub_folder(lp, _small_config(tmp_path), "no-slash", tmp_path / "bad2")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        publish.prepare_hub_folder(lp, tmp_path / "missing.yaml", "org/x", tmp_path / "bad3")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.resolve_entry("moco_r50.no_such_tag")


def test_dry_run_offline_upload_and_repo_ids(tmp_path, monkeypatch):
    ckpt = tmp_path / "ck.pth.tar"
    _official_v2("resnet18", ckpt)
    cfg = _small_config(tmp_path)
    assert _run_cli(["publish", ckpt, "--config", cfg, "--repo-id", "org/r18", "--dry-run",
                     "--local-dir", tmp_path / "dry"]) == 0
    assert (tmp_path / "dry" / "model.safetensors").is_file()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="offline mode"):
        publish.upload_hub_folder(tmp_path / "dry", "org/r18", endpoint="http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="org/never"):
        hub.download("org/never")
    assert hub.resolve_repo_id("hf-hub:a/b") == "a/b" and hub.resolve_repo_id("a/b") == "a/b"
    assert hub.resolve_repo_id("moco_r50.v2_800ep") == zoo.find_entry("moco_r50.v2_800ep").hub.repo_id
    assert hub.resolve_repo_id("moco_r50.v3_300ep_lincls_in1k").endswith(".v3_300ep_lincls_in1k")
    with pytest.raises(ValueError):
        hub.resolve_repo_id("a/b/c")


# --------------------------------------------------------------------------------------------------- import-official


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_import_official_local_file_and_loopback_url(tmp_path):
    ckpt = tmp_path / "srv" / "moco_r18_pretrain.pth.tar"
    ckpt.parent.mkdir()
    expected = _official_v2("resnet18", ckpt)
    md5 = hashlib.md5(ckpt.read_bytes()).hexdigest()
    cfg = _small_config(tmp_path, md5_prefix=md5[:8])

    # local copy, checksum from hub_configs
    assert _run_cli(["import-official", cfg, "--file", ckpt, "--out", tmp_path / "a"]) == 0
    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(torch.equal(sd[k], expected[k]) for k in expected)
    assert md5[:8] in (tmp_path / "a" / "README.md").read_text()
    with pytest.raises(CheckpointError, match="md5"):
        publish.import_official(cfg, file=ckpt, expected_md5="deadbeef", out_dir=tmp_path / "b")

    # the same file served over loopback HTTP (the path a real user takes, with the authors' URL)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(ckpt.parent)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{ckpt.name}"
        folder = publish.import_official(cfg, url=url, out_dir=tmp_path / "c", download_dir=tmp_path / "dl")
        assert folder.files["model.safetensors"] == hashlib.sha256(folder.weights.read_bytes()).hexdigest()
        sd = load_file(str(folder.weights))
        assert all(torch.equal(sd[k], expected[k]) for k in expected)
        downloaded = list((tmp_path / "dl").rglob("*.pth.tar"))
        assert len(downloaded) == 1 and hashlib.md5(downloaded[0].read_bytes()).hexdigest() == md5
        # a download that does not match the published checksum is refused and not kept
        with pytest.raises(CheckpointError, match="md5"):
            publish.import_official(cfg, url=url, expected_md5="00000000", out_dir=tmp_path / "d",
                                download_dir=tmp_path / "dl2")
        assert not list((tmp_path / "dl2").rglob("*.pth.tar*"))
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------------------------------ end to end


_PLAIN_TIMM = r"""
# Plain timm + huggingface_hub, no moco_zoo: started early (imports overlap the parent's work), then driven by stdin
# lines "<model_id> <out_path> <offline 0|1>"; answers "ok" per load.
import os, sys, torch, timm
from huggingface_hub import constants
print("ready", flush=True)
for line in sys.stdin:
    model_id, out, offline = line.split()
    constants.HF_HUB_OFFLINE = offline == "1"  # read at import by huggingface_hub: flip the constant itself
    model = timm.create_model(model_id, pretrained=True)
    assert "moco_zoo" not in sys.modules, "plain timm must not need moco_zoo"
    torch.manual_seed(1)
    with torch.no_grad():
        feats = model.eval()(torch.randn(1, 3, 128, 128))
    torch.save({"features": feats, "num_classes": model.num_classes, "pretrained_cfg": dict(model.pretrained_cfg)},
               out)
    print("ok", flush=True)
"""


class _PlainTimm:
    """A subprocess that never imports moco_zoo, loading ``hf-hub:`` models on request."""

    def __init__(self, tmp_path: Path, env_extra: dict):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", **env_extra)
        script = tmp_path / "plain_timm.py"
        script.write_text(_PLAIN_TIMM)
        self.tmp_path = tmp_path
        self.proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=str(tmp_path), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def load(self, model_id: str, offline: bool) -> dict:
        out = self.tmp_path / f"plain_{int(offline)}.pt"
        self.proc.stdin.write(f"{model_id} {out} {int(offline)}\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if line.strip() == "ok":
                return torch.load(out, weights_only=False)
            if not line:  # died
                self.proc.wait(timeout=60)
                raise AssertionError(f"plain timm subprocess failed:\n{self.proc.stderr.read()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_publish_download_and_load_end_to_end(tmp_path, capsys):
    repo = "moco-zoo-test/moco_r50.v2_800ep"
    cache = tmp_path / "hf-cache"
    server = LocalHubServer()
    endpoint = server.start()
    plain = _PlainTimm(tmp_path, {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache)})
    try:
        _end_to_end(tmp_path, capsys, server, endpoint, plain, repo, cache)
    finally:
        plain.close()
        server.stop()


def _end_to_end(tmp_path, capsys, server, endpoint, plain, repo, cache):
    ckpt = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    expected = _official_v2("resnet50", ckpt)
    ref = timm.create_model("resnet50", num_classes=0)
    ref.load_state_dict(expected)
    ref_feats = _features(ref)
    metrics = tmp_path / "knn.json"
    metrics.write_text(json.dumps({"name": "kNN on synthetic shapes", "metrics": {"knn_top1": 55.0}}))
    entry = zoo.find_entry("moco_r50.v2_800ep")
    published_cfg = __import__("moco_zoo.models", fromlist=["x"]).pretrained_cfg_for_entry(
        replace(entry, hub=zoo.HubInfo(repo_id=repo, published=True)))
    assert published_cfg["hf_hub_id"] == repo and published_cfg["url"] is None

    with hub_client_pointed_at(endpoint, offline=False, cache_dir=cache):
        assert _run_cli(["publish", ckpt, "--config", V2_800, "--repo-id", repo, "--endpoint", endpoint,
                         "--metrics", metrics]) == 0
        assert f"published moco_r50.v2_800ep to {repo}" in capsys.readouterr().out
        files = server.list_files(repo)
        assert {"README.md", "config.json", "model.safetensors", "detectron2.pkl"} <= set(files)
        assert files["model.safetensors"]["lfs"] and files["detectron2.pkl"]["lfs"]
        card = server.read_file(repo, "README.md").decode()
        assert files["model.safetensors"]["sha256"] in card and files["detectron2.pkl"]["sha256"] in card
        assert "| knn_top1 |  | 55 | this project (kNN on synthetic shapes) |" in card

        # 1. huggingface_hub download: exactly the converted tensors
        weights = hf_hub_download(repo, "model.safetensors")
        sd = load_file(weights)
        assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in expected)
        # 2. plain timm (subprocess, no moco_zoo import) through hf-hub:
        online = plain.load(f"hf-hub:{repo}", offline=False)
        assert online["num_classes"] == 0 and online["pretrained_cfg"]["hf_hub_id"] == repo
        assert online["pretrained_cfg"]["interpolation"] == "bilinear" and "tag" not in online["pretrained_cfg"]
        torch.testing.assert_close(online["features"], ref_feats)
        # 3. the zoo name, once its entry is marked published (hf_hub_id takes over from the authors' url)
        zoo_model = timm.create_model("moco_r50.v2_800ep", pretrained=True, pretrained_cfg=published_cfg)
        torch.testing.assert_close(_features(zoo_model), ref_feats)
        # 4. the project's backbone resolver reads the same repo (config.json -> architecture)
        import moco_zoo

        backbone = moco_zoo.load_backbone(f"hf-hub:{repo}")
        torch.testing.assert_close(_features(backbone), ref_feats)
        # 5. moco-zoo download: the snapshot in the HF cache
        assert _run_cli(["download", repo]) == 0
        snapshot = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert snapshot.is_relative_to(cache) and (snapshot / "detectron2.pkl").is_file()
    n_requests = len(server.request_log)
    server.stop()
    assert not server.running

    # server gone, offline mode on: everything is served from the cache
    with hub_client_pointed_at(None, offline=True, cache_dir=cache):
        assert hf_hub_download(repo, "model.safetensors") == weights
        zoo_model = timm.create_model("moco_r50.v2_800ep", pretrained=True, pretrained_cfg=published_cfg)
        torch.testing.assert_close(_features(zoo_model), ref_feats)
        assert _run_cli(["download", repo]) == 0
        assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == snapshot
    offline = plain.load(f"hf-hub:{repo}", offline=True)
    torch.testing.assert_close(offline["features"], ref_feats)
    assert len(server.request_log) == n_requests


def test_published_folder_loads_in_transformers_timm_wrapper(tmp_path):
    """transformers' TimmWrapperModel reads the folder written by timm's save_for_hf (offline, from the local path)
    and computes the same pooled features as timm itself."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers (test extra)")
    ckpt = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    _official_v2("resnet18", ckpt)
    folder = publish.prepare_hub_folder(ckpt, _small_config(tmp_path), "org/moco-r18", tmp_path / "out")
    wrapped = transformers.TimmWrapperModel.from_pretrained(str(folder.path)).eval()
    plain = timm.create_model(f"local-dir:{folder.path}", pretrained=True).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(pixel_values=x).pooler_output, plain(x))
