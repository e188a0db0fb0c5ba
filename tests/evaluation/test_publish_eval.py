"""``moco-zoo publish --eval-results``: the numbers of an eval results.json land in the model card's model-index
(parsed back with huggingface_hub) and in its metrics table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard

from moco_zoo import publish
from moco_zoo.evaluation.results import make_row, write_results

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path):
    data = yaml.safe_load((ROOT / "hub_configs" / "moco_v2_800ep.yaml").read_text())
    data.update(model="moco_r50", tag="test_r18", architecture="resnet18", model_args={}, default=False)
    data["hub"] = {"repo_id": "moco-zoo-test/moco_r50.test_r18", "published": False}
    out = tmp_path / "cfg.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_publish_puts_eval_results_into_the_model_index(tmp_path):
    rows = [make_row("knn", "top1_k20", [61.0, 63.0, 62.0], [1.0]), make_row("linear", "top1", [70.5, 71.5], [2.0]),
            make_row("fewshot", "top1_1shot", [30.0, 34.0, 32.0, 36.0], [1.0])]
    paths = write_results(tmp_path / "eval", rows, {"backbone": "ckpt.pth", "dataset": "synthetic-shapes",
                                                    "seeds": [0, 1, 2]})
    ckpt = tmp_path / "model.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), ckpt)
    from moco_zoo.cli import main

    assert main(["publish", str(ckpt), "--config", str(_config(tmp_path)), "--repo-id", "org/r18", "--dry-run",
                 "--local-dir", str(tmp_path / "hub"), "--eval-results", str(paths["json"])]) == 0
    text = (tmp_path / "hub" / "README.md").read_text()
    card = ModelCard(text)
    evals = {e.metric_name: e for e in card.data.eval_results}
    # the published ImageNet number stays, the three eval rows are added with their means and spreads
    assert evals["knn top1_k20"].metric_value == pytest.approx(62.0)
    assert evals["knn top1_k20"].metric_args["std"] == pytest.approx(1.0)
    assert evals["linear top1"].metric_value == pytest.approx(71.0)
    assert evals["fewshot top1_1shot"].metric_args["n"] == 4
    assert all(evals[k].dataset_name == "synthetic-shapes" for k in ("knn top1_k20", "linear top1"))
    assert any(e.dataset_name == "ImageNet-1k" for e in card.data.eval_results)
    assert "| knn top1_k20 (± 1.00, n=3) | synthetic-shapes | 62 | this project (moco-zoo eval) |" in text


def test_publish_rejects_a_file_that_is_not_eval_results(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"top1": 3}))
    with pytest.raises(ValueError, match="results.json: not a results.json of `moco-zoo eval`"):
        publish.load_eval_results([bad])
