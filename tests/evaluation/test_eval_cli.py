"""``moco-zoo eval`` end to end on a tiny ImageFolder: every protocol, two seeds, the three result files agree with
the per-seed results (mean and sample std recomputed with numpy), a rerun resumes without recomputing, the
low-shot run fine-tunes the whole network, and bad input is one line with exit code 2."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from moco_zoo.cli import main

TINY = ["--set", "image_size=32", "linear_epochs=2", "lowshot_epochs=[1]", "lowshot_percents=[50]",
        "moco_linear_epochs=1", "fewshot_tries=2", "fewshot_shots=[1,2]", "linear_lrs=[0.1,1.0]", "linear_wds=[0]",
        "batch_size=40", "chunk_size=32", "precision=fp32"]


def _run(data, out, *extra):
    return main(["eval", "random", "-a", "resnet18", "--data", str(data), "--preset", "cpu-small", "--seeds", "0",
                 "1", "--output-dir", str(out), "--no-progress", "--protocols",
                 "knn,linear,fewshot,lowshot,linear-moco", *TINY, *extra])


def test_eval_all_protocols_two_seeds_results_and_resume(eval_imagefolder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _run(eval_imagefolder, out) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {(r["protocol"], r["metric"]): r for r in data["results"]}
    assert set(p for p, _ in rows) == {"knn", "linear", "fewshot", "lowshot", "linear-moco"}
    assert ("knn", "top1_k200") in rows and ("fewshot", "top1_2shot") in rows and ("lowshot", "top1_50pct") in rows
    # every row is the mean / sample std of the stored per-seed values
    for (protocol, metric), r in rows.items():
        values = []
        for seed in (0, 1):
            v = json.loads((out / "per_seed" / protocol / f"seed{seed}.json").read_text())["metrics"][metric]
            values += v if isinstance(v, list) else [v]
        assert r["values"] == pytest.approx(values)
        assert r["mean"] == pytest.approx(np.mean(values)) and r["std"] == pytest.approx(np.std(values, ddof=1))
        assert 0.0 <= r["mean"] <= 100.0
    assert rows[("fewshot", "top1_1shot")]["n"] == 4  # 2 seeds x 2 tries
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["mean"]) == pytest.approx(data["results"][0]["mean"],
                                                                                      abs=1e-4)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "± " in md
    assert "| knn | top1_k10 |" in capsys.readouterr().out

    # low-shot: the split file is balanced and the whole network was fine-tuned (backbone weights changed)
    lines = (out / "lowshot_subsets" / "50percent_seed0.txt").read_text().split()
    assert len(lines) == 30
    (ck_path,) = (out / "work" / "lowshot").glob("*_seed0/50pct.pth")
    ck = torch.load(ck_path, weights_only=True)
    import moco_zoo

    start = moco_zoo.load_backbone("random", "resnet18", seed=0).state_dict()
    assert not torch.allclose(ck["model"]["conv1.weight"], start["conv1.weight"])
    assert ck["model"]["fc.weight"].shape == (10, 512)

    # rerun: nothing is recomputed (per-seed files untouched), same table
    stamps = {p: p.stat().st_mtime_ns for p in (out / "per_seed").rglob("*.json")}
    assert _run(eval_imagefolder, out) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "per_seed").rglob("*.json")} == stamps
    assert json.loads((out / "results.json").read_text())["results"] == data["results"]
    # another few-shot setting: only few-shot runs again
    assert _run(eval_imagefolder, out, "fewshot_c=0.5") == 0
    changed = {p for p in (out / "per_seed").rglob("*.json") if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {out / "per_seed" / "fewshot" / f"seed{s}.json" for s in (0, 1)}


def test_eval_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["eval", "random", "-a", "resnet18", "--data", str(tmp_path / "nope"), "--output-dir",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moco-zoo eval: error:" in err[0] and "nope" in err[0]
    assert main(["eval", "random", "--set", "knn_q=3"]) == 2
    assert "unknown config key 'knn_q'" in capsys.readouterr().err
