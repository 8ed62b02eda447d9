"""torchrun on this machine: 2-process gloo DDP against one process, a rank killed mid-run, resume on another world
size, and distributed prediction (complete, in input order, identical to one process)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_folder

pytestmark = pytest.mark.slow

#: no augmentation, no EMA, no BatchNorm (GroupNorm: per-image statistics), so a global batch gives the same
#: gradient whether one process sees it or two processes see half each; SGD, whose update moves with the gradient
#: (AdamW's first steps are about lr x sign(g): a near-zero gradient's rounding can flip a whole lr step)
SAME = ["--model", "test_efficientnet_gn", "--weights", "none", "--input-size", "32", "--data.num_workers", "0",
        "--no-progress", "--train.ema", "false", "--optim.name", "sgd", "--lr", "0.01", "--sched.warmup_epochs", "0",
        "--aug.scale", "[1,1]", "--aug.ratio", "[1,1]", "--aug.hflip", "0", "--train.label_smoothing", "0",
        "--trust.report", "false", "--trust.ood", "false"]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(n: int, *argv, wait: bool = True, **kw):
    """``torchrun --standalone --nproc-per-node n -m imgclf argv`` (a free port per job)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "imgclf",
           *map(str, argv)]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, **kw)


def single(*argv):
    return subprocess.run([sys.executable, "-m", "imgclf", *map(str, argv)], env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    return make_folder(root / "train", n_per_class=16), make_folder(root / "val", n_per_class=6, seed=3)


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_two_ranks_match_one_process(data, tmp_path):
    """Same global batch (1 x 16 vs 2 x 8), same images per update: the final weights of DDP and of FSDP2 agree with
    one process's to float rounding, the validation metrics (sharded without padding, gathered) are identical, and
    rank 0 alone logs."""
    train, val = data
    common = ["train", "--data", train, "--val-data", val, "--epochs", "2", "--output", tmp_path, *SAME]
    one = single(*common, "--batch-size", "16", "--name", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, *common, "--batch-size", "8", "--name", "two")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stderr.count("epoch 2/2") == 1  # rank 0's log only
    a, b = _last_weights(tmp_path / "one"), _last_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 2e-4, worst
    fsdp = torchrun(2, *common, "--batch-size", "8", "--name", "fsdp", "--train.fsdp", "true")
    assert fsdp.returncode == 0, fsdp.stdout[-3000:] + fsdp.stderr[-3000:]
    assert "FSDP2:" in fsdp.stderr
    c = _last_weights(tmp_path / "fsdp")
    assert max(float((a[k].float() - c[k].float()).abs().max()) for k in a) < 2e-4  # sharded state, same training
    assert (tmp_path / "fsdp" / "imgclf.json").is_file()
    hist = [np.genfromtxt(tmp_path / r / "metrics.csv", delimiter=",", names=True) for r in ("one", "two", "fsdp")]
    assert hist[2]["val_top1"].tolist() == hist[0]["val_top1"].tolist()
    assert hist[0]["val_top1"].tolist() == hist[1]["val_top1"].tolist()
    assert np.allclose(hist[0]["train_loss"], hist[1]["train_loss"], atol=1e-4)  # all ranks' images: the same mean
    assert hist[0]["train_loss"][1] < hist[0]["train_loss"][0] - 0.01  # it learned: the agreement is not vacuous


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    t0 = time.time()
    while not path.is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < seconds, f"{path} never appeared"
        time.sleep(0.2)


def test_killed_rank_stops_the_job_and_resume_as_one_process(data, tmp_path):
    """SIGKILL rank 1 after the first checkpoint: every rank stops, torchrun names the failed rank, no artifact is
    left half-written; ``--resume`` continues as one process (another world size) from the checkpoint."""
    import psutil

    train, val = data
    common = ["--data", train, "--val-data", val, "--output", tmp_path, "--name", "r", *SAME]
    job = torchrun(2, "train", *common, "--epochs", "6", "--batch-size", "8", wait=False)
    run = tmp_path / "r"
    _wait_for(run / "checkpoints" / "last.pt", job)
    workers = psutil.Process(job.pid).children(recursive=True)
    ranks = {int(p.environ().get("RANK", -1)): p for p in workers if "RANK" in p.environ()}
    ranks[1].send_signal(signal.SIGKILL)
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "rank" in out and ("SIGKILL" in out or "Signal 9" in out or "exitcode  : -9" in out), out[-3000:]
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in workers)
    assert not (run / "imgclf.json").exists()  # the artifact is written once, at the end
    done = len((run / "metrics.csv").read_text().splitlines()) - 1
    assert 1 <= done < 6
    res = single("train", "--resume", "--output", tmp_path, "--name", "r", "--batch-size", "16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "saved by 2 processes, now 1" in res.stderr
    assert len((run / "metrics.csv").read_text().splitlines()) - 1 == 6
    assert (run / "imgclf.json").is_file()


def test_distributed_predict_is_complete_and_ordered(tiny_run, tmp_path):
    """3 ranks over 48 inputs (shares of 16 and no padding): the merged CSV lists every input once, in input order,
    with the same answers as one process; ranks other than 0 write nothing."""
    inputs = make_folder(tmp_path / "in", n_per_class=16, seed=5)
    one, many = tmp_path / "one.csv", tmp_path / "many.csv"
    r1 = single("predict", tiny_run, inputs, "--format", "csv", "-o", one, "--runtime", "torch", "--no-progress")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r3 = torchrun(3, "predict", tiny_run, inputs, "--format", "csv", "-o", many, "--runtime", "torch", "--no-progress",
                  "--batch-size", "5")  # fmt: skip
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    a, b = (list(csv.DictReader(f.open())) for f in (one, many))
    assert len(b) == 48 and len({r["path"] for r in b}) == 48
    assert [r["path"] for r in a] == [r["path"] for r in b]  # input order
    assert [r["label_1"] for r in a] == [r["label_1"] for r in b]
    probs = lambda rows: np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])  # noqa: E731
    assert np.allclose(probs(a), probs(b), atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_commands_that_do_not_run_distributed_refuse(tiny_run):
    r = torchrun(2, "serve", tiny_run)
    assert r.returncode != 0
    assert "does not run under torchrun" in r.stderr + r.stdout


def test_distributed_knn_index_matches_one_process(tiny_run, tmp_path):
    """A k-NN index embedded by 2 ranks holds the embeddings and labels of one process's, in the same order."""
    from safetensors.torch import load_file

    support = make_folder(tmp_path / "support", n_per_class=9, seed=7)
    args = ["--model", "test_efficientnet", "--weights", tiny_run / "model.safetensors", "--input-size", "32",
            "--output", tmp_path, "--no-progress", "--workers", "0"]  # fmt: skip
    r1 = single("knn", "build", support, "--name", "one", *args)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = torchrun(2, "knn", "build", support, "--name", "two", *args)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    knn = [k for k in a if k.startswith("knn.")]
    assert knn and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in knn)


def test_pretrain_runs_distributed_with_negatives_from_every_rank(data, tmp_path):
    """SimCLR under torchrun (2 gloo ranks x 8 images): NT-Xent gathers both ranks' embeddings (its loss then
    ranks 2 x 16 - 1 = 31 candidates per anchor; ln 31 = 3.43 is the loss of an uninformative embedding), rank 0
    alone logs and writes one backbone run."""
    train, _ = data
    r = torchrun(2, "pretrain", train, "--model", "test_resnet", "--epochs", "2", "--batch-size", "8", "--input-size",
                 "24", "--data.num_workers", "0", "--no-progress", "--output", tmp_path, "--name", "ssl",
                 "--train.amp", "none")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.count("epoch 2/2") == 1
    meta = json.loads((tmp_path / "ssl" / "imgclf.json").read_text())
    assert meta["kind"] == "backbone" and [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2]
    assert meta["config"]["train"]["epochs"] == 2
    first = meta["metrics"]["history"][0]["train_loss"]
    assert 2.5 < first < 4.0, first  # ~ln 31 at the start: 31 candidates, so the negatives came from both ranks
