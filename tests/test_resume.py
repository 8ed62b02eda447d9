"""Exact resume: SIGKILL mid-epoch, re-run with --resume, same final metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .conftest import TINY, make_folder

EPOCHS = 4


def _cmd(data, out, name, *extra):
    args = ["train", "--data", str(data), "--epochs", str(EPOCHS), "--output", str(out), "--name", name]
    tiny = list(TINY)
    # use one worker process: resume must also reproduce augmentation drawn in workers
    i = tiny.index("--data.num_workers")
    tiny[i + 1] = "1"
    return [sys.executable, "-m", "imgclf", *args, *tiny, "--train.ema", "true", *extra]


def _final(out, name):
    doc = json.loads((out / name / "imgclf.json").read_text())
    return doc["metrics"]["val"], [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=40, classes=3, seed=3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cmd(data, tmp_path, "full"), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(data, tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    time.sleep(0.3)  # now inside epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "imgclf.json").exists()

    r = subprocess.run(_cmd(data, tmp_path, "killed", "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stderr

    full_val, full_rows = _final(tmp_path, "full")
    res_val, res_rows = _final(tmp_path, "killed")
    assert [r["epoch"] for r in res_rows] == list(range(1, EPOCHS + 1))
    assert abs(full_val["top1"] - res_val["top1"]) <= 0.005
    for a, b in zip(full_rows, res_rows):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a, b)
