"""moco_zoo.runlock and the stale-temporary cleanup: one job per output directory, nothing left behind by kills."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from moco_zoo.checkpoint import atomic_torch_save, remove_stale_temporaries
from moco_zoo.runlock import RunLock, RunLockedError

HOLD = "import sys, time; from moco_zoo.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_live_holder_blocks_a_second_job_and_a_killed_one_does_not(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"{tmp_path}: another job is writing .*pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()  # and the lock excludes within one process too (a second open file)
    RunLock(tmp_path).acquire().release()


def test_only_our_temporaries_are_removed(tmp_path):
    fd, ours = tempfile.mkstemp(prefix=".checkpoint_000000008.pth.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    keep = [tmp_path / "checkpoint_000000008.pth", tmp_path / "notes.tmp", tmp_path / ".hidden.tmp"]
    for p in keep:
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / os.path.basename(ours)]
    assert all(p.exists() for p in keep) and not os.path.exists(ours)
    assert remove_stale_temporaries(tmp_path / "missing") == []


@pytest.mark.slow
def test_writes_killed_mid_way_leave_nothing_after_the_next_start(tmp_path):
    """Drill: SIGKILL a process while it writes large checkpoints, N times; the cleanup leaves 0 temporaries."""
    writer = ("import sys, torch; from moco_zoo.checkpoint import atomic_torch_save\n"
              "x = torch.zeros(40_000_000)\n"
              "while True: atomic_torch_save({'x': x}, sys.argv[1] + '/checkpoint_000000001.pth')")
    left = 0
    for i in range(5):
        (tmp_path / "checkpoint_000000001.pth").unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path)])
        deadline = time.time() + 120
        while not (tmp_path / "checkpoint_000000001.pth").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05 + 0.11 * i)  # somewhere inside the next write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left += len(list(tmp_path.glob(".*.tmp")))
        remove_stale_temporaries(tmp_path)
        assert not list(tmp_path.glob(".*.tmp"))
    assert left >= 1  # the drill did kill writes mid-way
    atomic_torch_save({"ok": 1}, tmp_path / "checkpoint_000000002.pth")


def test_the_job_entry_points_refuse_a_locked_output_directory(tmp_path, synthetic_voc, capsys):
    from moco_zoo.pretrain.config import make_config
    from moco_zoo.pretrain.engine import train
    from moco_zoo.transfer.engine.cli import main

    with RunLock(tmp_path):
        rc = main("voc_det", ["--data-root", str(synthetic_voc), "--weights", "random", "--arch", "resnet18",
                              "--output-dir", str(tmp_path), "--preset", "cpu", "--iters", "1"])
        assert rc == 2 and "another job is writing this output directory" in capsys.readouterr().err
        with pytest.raises(RunLockedError):
            train(make_config("cpu-small", data=str(synthetic_voc), output_dir=str(tmp_path)))
