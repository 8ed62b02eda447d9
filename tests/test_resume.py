"""Exact resume: SIGKILL mid-epoch, re-run with --resume, same final metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import TINY, make_folder, make_multilabel_csv

EPOCHS = 4


def _cmd(data, out, name, *extra):
    args = ["train", "--data", str(data), "--epochs", str(EPOCHS), "--output", str(out), "--name", name]
    tiny = list(TINY)
    # use one worker process: resume must also reproduce augmentation drawn in workers
    i = tiny.index("--data.num_workers")
    tiny[i + 1] = "1"
    # no HTML report: it is written after the last epoch, from the final numbers this test compares already
    return [sys.executable, "-m", "imgclf", *args, *tiny, "--train.ema", "true", "--trust.report", "false", *extra]


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


class _Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint, in-process (the subprocess test covers the real signal)."""


STRATEGIES = {
    "finetune": ({}, 2),
    "staged-at-phase-boundary": ({"transfer.strategy": "staged", "transfer.head_epochs": 2}, 2),
    "staged-mid-phase": ({"transfer.strategy": "staged", "transfer.head_epochs": 1}, 2),
    "scratch": ({"transfer.strategy": "scratch"}, 1),
    "probe-uncached": ({"transfer.strategy": "probe", "probe.cache": False, "probe.solver": "sgd"}, 2),
    "probe-sgd-cached": ({"transfer.strategy": "probe", "probe.solver": "sgd"}, 2),
    "probe-lbfgs": ({"transfer.strategy": "probe"}, None),
    "mixup-onecycle-repeats-accum": (
        {
            "aug.mixup": 0.4,
            "aug.cutmix": 1.0,
            "aug.mix_off_epochs": 1,
            "sched.name": "onecycle",
            "aug.repeats": 2,
            "optim.accum_steps": 2,
        },
        2,
    ),
    "class-balanced-sampler-logit-adjusted": ({"data.sampler": "progressive", "train.loss": "logit_adjusted"}, 2),
    # the decoded-image cache: the full run builds it, the killed and the resumed runs read it
    "decoded-cache": ({"data.cache": "disk"}, 2),
    # multi-label data (label sets, BCE/ASL): every strategy resumes the same way
    "multilabel-finetune-mixup": ({"aug.mixup": 0.4, "train.loss": "asl"}, 2),
    "multilabel-staged": ({"transfer.strategy": "staged", "transfer.head_epochs": 1}, 2),
    "multilabel-scratch": ({"transfer.strategy": "scratch", "train.pos_weight": "balanced"}, 1),
    "multilabel-probe-sgd-cached": ({"transfer.strategy": "probe", "probe.solver": "sgd"}, 2),
    "multilabel-probe-lbfgs": ({"transfer.strategy": "probe"}, None),
}


@pytest.mark.parametrize("case", list(STRATEGIES))
def test_resume_gives_the_same_run_for_every_strategy(case, tmp_path, monkeypatch):
    import imgclf.train.probe as probe_mod
    import imgclf.train.trainer as trainer_mod
    from imgclf.api import make_config, resume_config, train

    extra, kill_after = STRATEGIES[case]
    multi = case.startswith("multilabel")
    data = make_multilabel_csv(tmp_path / "d", 40, seed=4) if multi else make_folder(tmp_path / "d", 12, 3, seed=4)
    over = {"model.name": "test_efficientnet", "model.weights": "none", "data.input_size": 32,
            "data.batch_size": 8, "data.num_workers": 0, "run.progress": False, "train.epochs": 4,
            "optim.lr": 0.01, "run.output": str(tmp_path / "runs"), "probe.cache_dir": str(tmp_path / "cache"),
            "data.cache_dir": str(tmp_path / "decoded"), "trust.report": False, **extra}  # fmt: skip
    full = train(make_config(data, overrides={**over, "run.name": "full"}))

    real_save, real_ck = trainer_mod._save, probe_mod.save_checkpoint

    def save_then_die(run_dir, loop, state):
        real_save(run_dir, loop, state)
        if state.epoch == kill_after:
            raise _Killed

    def ck_then_die(path, state):
        real_ck(path, state)
        if kill_after is None or state["state"]["epoch"] == kill_after:
            raise _Killed

    monkeypatch.setattr(trainer_mod, "_save", save_then_die)
    monkeypatch.setattr(probe_mod, "save_checkpoint", ck_then_die)
    with pytest.raises(_Killed):
        train(make_config(data, overrides={**over, "run.name": "killed"}))
    monkeypatch.setattr(trainer_mod, "_save", real_save)
    monkeypatch.setattr(probe_mod, "save_checkpoint", real_ck)
    resumed = train(resume_config(tmp_path / "runs", "killed"), resume=True)

    assert [r["epoch"] for r in resumed.history] == [r["epoch"] for r in full.history]
    for a, b in zip(full.history, resumed.history):
        for key in ("train_loss", "val_loss", "val_top1", "val_map"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    headline = "map" if multi else "top1"
    assert resumed.val_metrics[headline] == pytest.approx(full.val_metrics[headline], abs=1e-6)
    assert resumed.val_metrics.get("multi_label", False) == multi


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_workers_do_not_keep_the_run_lock(tmp_path):
    """A DataLoader worker forked while the trainer holds the run lock must not hold it after the trainer
    is gone (a SIGKILLed trainer's workers linger up to 5 s; ``--resume`` then said "being trained")."""
    from imgclf.errors import ImgclfError
    from imgclf.train.logger import hold_run_lock, run_is_live

    lock = hold_run_lock(tmp_path)
    with pytest.raises(ImgclfError, match="being trained by another process"):
        hold_run_lock(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": outlives the trainer's lock
        os.write(w, b"up")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(r, 2) == b"up"  # the child runs (its fork hooks have run)
        lock.close()  # the trainer dies
        assert not run_is_live(tmp_path)
        hold_run_lock(tmp_path).close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
