"""The production loop around ``imgclf serve``: captured traffic (cap, sampling, the layout train reads), the
``--on-drift`` hook (debounced; a failing command does not touch serving) and hot-swapped versions from a model
repository under concurrent requests (none lost)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import make_image
from .serving import Served, png


def _png(seed: int, side: int = 32) -> bytes:
    rng = np.random.default_rng(seed)  # noise: PNG cannot shrink it, so sizes are predictable
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _item(data: bytes, reason: str = "sampled", t: float = 1.8e9):
    from imgclf.deploy.capture import Captured

    return Captured(data, None, "cat", 0.9, False, 1.5, "m", "1", reason, "req-1", t)


def _rows(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.unit
def test_capture_keeps_unknown_and_low_confidence_and_samples_the_rate():
    from imgclf.deploy.capture import Capture

    cap = Capture.__new__(Capture)  # choose() only: no folder, no writer thread
    import random

    cap.rate, cap.below, cap._rng = 0.2, 0.5, random.Random(0)
    n = 20_000
    probs = np.full((n, 4), 0.02, np.float32)
    probs[:, 0] = 0.94
    probs[:100, :] = 0.25  # low confidence: always kept
    unknown = np.zeros(n, bool)
    unknown[100:300] = True  # unknown: always kept
    chosen = dict(cap.choose(probs, unknown))
    assert all(chosen.get(i) == "low_confidence" for i in range(100))
    assert all(chosen.get(i) == "unknown" for i in range(100, 300))
    sampled = sum(1 for r in chosen.values() if r == "sampled")
    rest = n - 300
    assert abs(sampled - 0.2 * rest) < 4 * np.sqrt(rest * 0.2 * 0.8), sampled  # binomial, 4 sigma
    cap.rate, cap.below = 0.0, 0.0
    assert [r for _, r in cap.choose(probs, unknown)] == ["unknown"] * 200  # rate 0: only what must be kept


@pytest.mark.unit
def test_capture_folder_stays_under_its_cap_keeps_typed_labels_and_reads_as_training_data(tmp_path):
    from imgclf.data.sources import open_source
    from imgclf.deploy.capture import Capture
    from imgclf.errors import ImgclfError

    one = len(_png(0))
    cap_mb = 20 * one / 2**20  # room for 20 images
    cap = Capture(tmp_path / "cap", rate=1.0, max_mb=cap_mb)
    for i in range(15):
        assert cap.offer(_item(_png(i), t=1.8e9 + i))
    cap.close()
    rows = _rows(tmp_path / "cap")
    assert len(rows) == 15 and rows[0]["label"] == "" and rows[0]["predicted"] == "cat"
    assert rows[0]["reason"] == "sampled" and rows[0]["source"] == "req-1" and rows[0]["path"].endswith(".png")
    assert (tmp_path / "cap" / rows[0]["path"]).read_bytes() == _png(0)  # the bytes as uploaded
    # a person labels rows 8-14 while the server goes on writing
    labelled = {r["path"]: f"c{i}" for i, r in enumerate(rows) if i >= 8}
    text = (tmp_path / "cap" / "labels.csv").read_text(encoding="utf-8")
    for path, label in labelled.items():
        text = text.replace(f"{path},,", f"{path},{label},", 1)
    (tmp_path / "cap" / "labels.csv").write_text(text, encoding="utf-8")
    cap = Capture(tmp_path / "cap", rate=1.0, max_mb=cap_mb)  # continued after a restart
    for i in range(15, 25):
        assert cap.offer(_item(_png(i), t=1.8e9 + i))
    cap.close()
    rows = _rows(tmp_path / "cap")
    files = sorted(p for p in (tmp_path / "cap" / "images").rglob("*") if p.is_file())
    assert cap.bytes == sum(f.stat().st_size for f in files) <= cap.cap  # the cap holds
    assert len(files) == len(rows) and 15 <= len(rows) <= 20 and cap.rotated == 25 - len(rows)
    assert {(tmp_path / "cap" / r["path"]) for r in rows} == set(files)  # rows and files agree
    seconds = [int(r["time"][-3:-1]) for r in rows]  # t = 1.8e9 + i: i is the time's seconds
    assert seconds == list(range(25 - len(rows), 25))  # the oldest went first
    assert _png(24) == (tmp_path / "cap" / rows[-1]["path"]).read_bytes()
    assert {r["path"]: r["label"] for r in rows if r["label"]} == labelled  # typed labels survived rotation
    # train/audit read the folder once every row has a label; an empty one is an error naming its row
    with pytest.raises(ImgclfError, match=r"row \d+ has an empty 'label'"):
        open_source(str(tmp_path / "cap"))
    with open(tmp_path / "cap" / "labels.csv", newline="", encoding="utf-8") as f:
        full = [dict(r, label=r["label"] or "cat") for r in csv.DictReader(f)]
    with open(tmp_path / "cap" / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(full[0]))
        w.writeheader()
        w.writerows(full)
    src = open_source(str(tmp_path / "cap"))
    assert len(src) == len(rows) and set(src.class_names) == {"cat", *labelled.values()}
    with pytest.raises(ImgclfError, match="--capture-rate"):
        Capture(tmp_path / "x", rate=1.5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "labels.csv").write_text("file,class\n")
    with pytest.raises(ImgclfError, match="not a capture file"):
        Capture(tmp_path / "other")


@pytest.mark.unit
def test_on_drift_fires_once_per_episode_and_survives_a_failing_or_hanging_command(tmp_path):
    from imgclf.deploy.hooks import DriftHook

    results = []
    out = tmp_path / "got.json"
    hook = DriftHook(f"cat > {out}; echo bad >&2; exit 3", cooldown=0.3, timeout=5,
                     on_result=lambda k, r: results.append((k, r)))  # fmt: skip
    doc = {"event": "drift", "model": "m", "version": "1", "run": "/r", "capture_dir": None, "report": {"n": 5}}
    fired = [hook.update("m:1", s, lambda: doc) for s in ("warming up", "ok", "drift", "drift", "ok", "drift")]
    assert fired == [False, False, True, False, False, False]  # back within the cooldown: the same episode
    for t in hook.threads:
        t.join(10)
    assert results == [("m:1", "failed")] and json.loads(out.read_text()) == doc  # the report on stdin
    assert hook.update("m:2", "drift", lambda: doc)  # another version: an episode of its own
    hook.update("m:1", "ok", lambda: doc)
    time.sleep(0.35)
    assert hook.update("m:1", "drift", lambda: doc)  # after the cooldown: a new episode
    slow = DriftHook("sleep 30", timeout=0.3, on_result=lambda k, r: results.append((k, r)))
    t0 = time.monotonic()
    assert slow.update("x:1", "drift", lambda: doc) and time.monotonic() - t0 < 0.2  # never waits
    slow.threads[0].join(10)
    assert results[-1] == ("x:1", "timeout")


def _metric(text: str, metric: str, **labels: str) -> float:
    """The value of one Prometheus series (labels in any order), 0 when absent."""
    for m in re.finditer(rf"^{metric}\{{(.*)\}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m[1])) == labels:
            return float(m[2])
    return 0.0


@pytest.fixture(scope="module")
def repo(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_run, root / "tiny" / "1")
    return root


def test_hot_swap_under_load_loses_no_request_and_a_failing_on_drift_hook_changes_nothing(repo, tmp_path):
    rng = np.random.default_rng(3)
    images = [png(make_image(c % 3, rng)) for c in range(12)]
    cap = tmp_path / "capture"
    s = Served(["--repository", repo, "--poll-s", "0.2", "--capture-dir", cap, "--capture-rate", "1.0",
                "--on-drift", "echo failing on purpose >&2; exit 7", "--drift-window", "20",
                "--drift-min-samples", "10", "--drift-threshold", "psi_class=0", "psi_confidence=0",
                "--max-delay-ms", "2"], tmp_path)  # fmt: skip
    codes: list[int] = []
    stop = threading.Event()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            st, _, _ = s.request("POST", "/predict", images[i % 12], {"Content-Type": "image/png",
                                                                      "X-Request-Id": f"r{i}"})  # fmt: skip
            codes.append(st)
            i += 4

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        st, doc = s.json("GET", "/v2/models/tiny")
        assert st == 200 and doc["versions"] == ["1"]
        for t in threads:
            t.start()
        while len(codes) < 60:
            time.sleep(0.05)
        # drift (thresholds 0) comes with the first check past 10 images; the hook runs, fails, serving goes on
        deadline, text = time.time() + 30, ""
        while _metric(text, "imgclf_on_drift_runs_total", model="tiny:1", result="failed") < 1:
            assert time.time() < deadline, s.log()
            time.sleep(0.2)
            text = s.request("GET", "/metrics")[2].decode()
        assert _metric(text, "imgclf_drifted", model="tiny:1") == 1.0 and set(codes) == {200}
        # version 2 arrives the way retrain promotes one: written in a hidden folder, then renamed
        shutil.copytree(repo / "tiny" / "1", repo / "tiny" / ".incoming")
        (repo / "tiny" / ".incoming").rename(repo / "tiny" / "2")
        deadline = time.time() + 60
        while s.json("GET", "/v2/models/tiny")[1].get("versions") != ["2"]:
            assert time.time() < deadline, s.log()
            time.sleep(0.1)
        n_swap = len(codes)
        while len(codes) < n_swap + 40:  # requests go on to version 2
            time.sleep(0.05)
    except BaseException:
        s.stop()
        raise
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(30)
    try:
        assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        st, doc = s.json("POST", "/predict", images[1], {"Content-Type": "image/png"})
        assert st == 200 and doc["version"] == "2" and doc["predictions"][0]["top"][0]["label"] == "class_1"
        assert s.json("POST", "/models/tiny/versions/1/predict", images[1], {"Content-Type": "image/png"})[0] == 404
        text = s.request("GET", "/metrics")[2].decode()
        assert _metric(text, "imgclf_model_events_total", name="tiny", event="load") == 1
        assert _metric(text, "imgclf_model_events_total", name="tiny", event="unload") == 1
        assert _metric(text, "imgclf_on_drift_runs_total", model="tiny:1", result="failed") == 1  # once per episode
        assert 'imgclf_queue_images{model="tiny:1"}' not in text and 'imgclf_queue_images{model="tiny:2"}' in text
        assert _metric(text, "imgclf_images_total", model="tiny:2") > 0  # metrics per version
        # the KServe v2 repository extension, as tritonclient calls it
        import tritonclient.http as httpclient

        c = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
        index = c.get_model_repository_index()
        assert {(r["name"], r["version"], r["state"]) for r in index} == {("tiny", "2", "READY"),
                                                                          ("tiny", "1", "UNAVAILABLE")}  # fmt: skip
        c.unload_model("tiny")
        assert not c.is_model_ready("tiny") and s.json("GET", "/v2/models/tiny")[0] == 404
        time.sleep(0.5)  # the watcher leaves an unloaded model alone
        assert s.json("GET", "/v2/models/tiny")[0] == 404
        c.load_model("tiny")
        assert c.is_model_ready("tiny") and s.json("GET", "/v2/models/tiny")[1]["versions"] == ["2"]
    finally:
        assert s.stop() == 0, s.log()
    log = s.log()
    assert "exited with 7: failing on purpose" in log and "model tiny:1 unloaded" in log
    rows = _rows(cap)  # every image captured (rate 1), with its request id, the model version and prediction
    assert len(rows) == len(codes) + 1 and {r["version"] for r in rows} == {"1", "2"}
    assert all(r["label"] == "" for r in rows) and sum(r["source"].startswith("r") for r in rows) == len(codes)
    first = rows[0]
    assert (cap / first["path"]).read_bytes() == images[int(first["source"][1:]) % 12]
