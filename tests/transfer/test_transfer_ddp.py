"""voc_det under torchrun with 2 CPU processes (gloo): DDP + cross-rank SyncBN, ranks end with identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import torch
    from moco_zoo.transfer.engine.run import TransferRun as DetectionRun
    from moco_zoo.transfer.modeling import DistributedBatchNorm2d

    _orig = DetectionRun.write_outputs

    def _write_outputs(self, metrics):
        result = _orig(self, metrics)
        n_sync = sum(isinstance(m, DistributedBatchNorm2d) for m in self.model.modules())
        torch.save({"state": self.model.state_dict(), "n_sync": n_sync, "world": self.world, "metrics": metrics,
                    "per_rank": self.per_rank},
                   Path(self.out_dir) / f"rank{os.environ['RANK']}.pt")
        return result

    DetectionRun.write_outputs = _write_outputs
    from moco_zoo.transfer.engine.cli import main
    sys.exit(main("voc_det", sys.argv[1:]))
''')


@pytest.mark.ddp
def test_two_process_torchrun_voc_det(synthetic_voc, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           "--data-root", str(synthetic_voc), "--weights", "random", "--output-dir", str(out), "--preset", "cpu", "--detector", "c4",
           "--arch", "resnet18", "--iters", "3", "--batch-size", "2", "--max-test-images", "4", "--threads", "1",
           "--set", "box_batch_size_per_image=16", "rpn_post_nms_top_n_test=30", "box_detections_per_img=10",
           "log_period=1", "min_size_train=[96,112]", "min_size_test=112", "num_vis=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(out / "random" / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "random" / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["per_rank"] == 1
    assert r0["n_sync"] > 0 and r0["n_sync"] == r1["n_sync"]  # syncbn converted to the cross-rank BN on CPU
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert r0["metrics"]["AP50"] == r1["metrics"]["AP50"]  # evaluation gathered over both ranks
    metrics = json.loads((out / "random" / "metrics.json").read_text())
    assert metrics["iters"] == 3 and metrics["metrics"]["num_test_images"] == 4
    cfg = yaml.safe_load((out / "random" / "config.yaml").read_text())
    assert cfg["run"]["world_size"] == 2 and cfg["run"]["batch_per_rank"] == 1
