"""The production loop end to end, on loopback, stopping by itself: serve -> shift -> drift -> capture -> label ->
retrain -> promote -> hot-swap under load.

1. The demo run becomes version 1 of model ``fmnist`` in a model repository; ``imgclf serve --repository`` serves
   it with capture on (every unknown and low-confidence image plus ``--capture-rate`` of the rest) and an
   ``--on-drift`` command that appends the drift report to a file.
2. A client streams Fashion-MNIST test images (official test split, images ``[0, --stream)``) with rising
   ``--corruption`` severity: clean, then severities 1, 2, 3 (``--per-phase`` images each).
3. Drift fires: the command must have run exactly once.
4. The captured images get their labels from the data set (standing in for a person; the request id is the
   test index), then ``imgclf retrain REPO/fmnist/1 --new-data CAPTURE`` runs while a client keeps the server
   busy; when it promotes, the server picks version 2 up from the repository and swaps to it under that load.
   Every request during the whole loop must be answered 200 (no 5xx, no connection error).
5. Versions 1 and 2 are scored in this process on test images never streamed (``[--stream, 10000)``): clean,
   and with the corruption at severities 1-3 (a third each, seeded). Targets: version 2 >= 5 points better on
   the shifted images and <= 1 point worse on the clean ones.

Usage: python bench/production_loop.py RUN [--work DIR]   (writes bench/results/production_loop.json)
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from fashion_mnist import ensure_full
from PIL import Image

from imgclf.artifact import package_versions
from imgclf.eval.shift import corrupt
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "production_loop.json"
SEVERITIES = (1, 2, 3)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Client:
    """Keep-alive HTTP/1.1 POSTs of PNG bodies to /predict; counts every answer by status (errors as 0)."""

    def __init__(self, port: int):
        self.port, self.codes, self.lock = port, {}, threading.Lock()
        self.versions: dict[str, int] = {}

    def post(self, conn: http.client.HTTPConnection, body: bytes, rid: str) -> dict | None:
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "image/png", "X-Request-Id": rid})
            r = conn.getresponse()
            data, status = r.read(), r.status
        except (OSError, http.client.HTTPException):
            conn.close()
            status, data = 0, b""
        with self.lock:
            self.codes[status] = self.codes.get(status, 0) + 1
        if status != 200:
            return None
        doc = json.loads(data)
        with self.lock:
            self.versions[doc["version"]] = self.versions.get(doc["version"], 0) + 1
        return doc

    def stream(self, bodies: list[tuple[str, bytes]], threads: int = 4) -> None:
        """Send every (request id, body) once, on ``threads`` connections."""

        def work(part):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            for rid, body in part:
                self.post(conn, body, rid)
            conn.close()

        ts = [threading.Thread(target=work, args=(bodies[k::threads],)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def load(self, bodies: list[bytes], stop: threading.Event, threads: int = 2, pause: float = 0.01) -> None:
        """Background load until ``stop``: ``threads`` connections cycling through ``bodies``."""

        def work(k):
            conn, i = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60), k
            while not stop.is_set():
                self.post(conn, bodies[i % len(bodies)], f"load-{i}")
                i += threads
                time.sleep(pause)
            conn.close()

        self.load_threads = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in self.load_threads:
            t.start()


def shifted(images: np.ndarray, name: str, severities: list[int], seed: int, offset: int) -> list[Image.Image]:
    return [corrupt(Image.fromarray(x), name, s, seed, offset + i) if s else Image.fromarray(x)
            for i, (x, s) in enumerate(zip(images, severities))]  # fmt: skip


def accuracy(run: Path, images: list[Image.Image], labels: np.ndarray) -> float:
    from imgclf.deploy.runtime import load_predictor, to_pixels

    pred = load_predictor(run, "torch")
    hits = 0
    for i in range(0, len(images), 256):
        px = to_pixels(images[i : i + 256], pred.art)
        hits += int((pred(px)[1].argmax(1) == labels[i : i + 256]).sum())
    return 100.0 * hits / len(images)


def label_capture(cap: Path, labels: np.ndarray, names: list[str]) -> int:
    """Fill ``label`` of every captured row from the data set (the request id is ``test-<index>``)."""
    with open(cap / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    for r in rows:
        r["label"] = names[int(labels[int(r["source"].removeprefix("test-"))])]
    with open(cap / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def start_server(args: list[str], work: Path) -> tuple[subprocess.Popen, int]:
    ready = work / "ready.json"
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "serve", *args, "--port", "0", "--ready-file",
                             str(ready)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    t0 = time.time()
    while not ready.exists():
        if proc.poll() is not None or time.time() - t0 > 300:
            raise SystemExit("server did not start:\n" + (work / "serve.log").read_text())
        time.sleep(0.3)
    return proc, json.loads(ready.read_text())["port"]


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    doc = json.loads(conn.getresponse().read())
    conn.close()
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the run to serve as version 1 (make demo's run)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--corruption", default="gaussian_noise")
    ap.add_argument("--per-phase", type=int, default=1200, help="images per severity phase of the stream")
    ap.add_argument("--capture-rate", type=float, default=0.5)
    ap.add_argument("--retrain-args", default="", help="extra flags for imgclf retrain")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not (a.run / "imgclf.json").is_file():
        raise SystemExit(f"{a.run}: no trained run (make demo trains one in runs/)")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        doc = loop(a, work)
    write_json(RESULTS, doc)
    print(json.dumps({k: doc[k] for k in ("accuracy", "targets", "requests", "drift_hook_runs", "timings_s")},
                     indent=1))  # fmt: skip
    return 0 if all(doc["targets"].values()) else 1


def loop(a: argparse.Namespace, work: Path) -> dict:
    data = np.load(ensure_full())
    x, y, names = data["test_images"], data["test_labels"], [str(n) for n in data["class_names"]]
    stream_n = 4 * a.per_phase
    sev = [0] * a.per_phase + [s for s in SEVERITIES for _ in range(a.per_phase)]
    repo, cap, fired = work / "repo", work / "capture", work / "drift-events.jsonl"
    for d in (repo, cap):
        shutil.rmtree(d, ignore_errors=True)
    fired.unlink(missing_ok=True)
    shutil.copytree(a.run, repo / "fmnist" / "1")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    hook = f"cat >> {fired}; echo >> {fired}"  # the drift report, one JSON line per run
    proc, port = start_server(["--repository", repo, "--poll-s", "1", "--capture-dir", cap, "--capture-rate",
                               str(a.capture_rate), "--on-drift", hook], work)  # fmt: skip
    client = Client(port)
    try:
        bodies = [(f"test-{i}", png(im)) for i, im in enumerate(shifted(x[:stream_n], a.corruption, sev, a.seed, 0))]
        t1 = time.perf_counter()
        for p in range(4):  # phase by phase: clean, then severity 1, 2, 3
            client.stream(bodies[p * a.per_phase : (p + 1) * a.per_phase])
        t["stream"] = time.perf_counter() - t1
        time.sleep(3)  # the last drift check and the hook
        drift = get_json(port, "/drift")["models"]
        labelled = work / "labelled"  # what a labeller hands back: a copy of the capture with labels filled in
        n_labelled = _wait_capture(cap, labelled, y, names)
        stop = threading.Event()
        client.load([b for _, b in bodies[a.per_phase :: 7]], stop)  # the server stays busy from here on
        t1 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "imgclf.cli", "retrain", str(repo / "fmnist" / "1"), "--new-data",
                            str(labelled), *a.retrain_args.split()], capture_output=True, text=True)  # fmt: skip
        t["retrain"] = time.perf_counter() - t1
        print(r.stdout[-3000:], r.stderr[-2000:], sep="\n")
        swapped = _wait_swap(port, r.returncode == 0)
        time.sleep(3)  # more load on the new version
        stop.set()
        for th in client.load_threads:
            th.join()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
    t["total"] = time.perf_counter() - t0
    serve_log = (work / "serve.log").read_text()
    runs = [ln for ln in fired.read_text().splitlines() if ln.strip()] if fired.exists() else []
    held = slice(stream_n, len(x))
    hsev = list(np.random.default_rng(a.seed + 1).choice(SEVERITIES, len(x) - stream_n))
    clean_imgs = [Image.fromarray(im) for im in x[held]]
    shift_imgs = shifted(x[held], a.corruption, hsev, a.seed + 1, stream_n)
    v2 = repo / "fmnist" / "2"
    acc = {"v1": {"clean": accuracy(repo / "fmnist" / "1", clean_imgs, y[held]),
                  "shifted": accuracy(repo / "fmnist" / "1", shift_imgs, y[held])}}  # fmt: skip
    if v2.is_dir():
        acc["v2"] = {"clean": accuracy(v2, clean_imgs, y[held]), "shifted": accuracy(v2, shift_imgs, y[held])}
    gain = acc["v2"]["shifted"] - acc["v1"]["shifted"] if "v2" in acc else None
    loss = acc["v1"]["clean"] - acc["v2"]["clean"] if "v2" in acc else None
    retrain_doc = json.loads((v2 / "retrain.json").read_text()) if (v2 / "retrain.json").is_file() else None
    return {
        "command": "python bench/production_loop.py " + " ".join(sys.argv[1:]), "run": str(a.run),
        "corruption": a.corruption, "stream": {"images": stream_n, "severities": [0, *SEVERITIES],
                                               "per_phase": a.per_phase},  # fmt: skip
        "held_out": {"images": len(x) - stream_n, "severities": "1-3 (a third each)"},
        "drift_at_end": {k: {s: v.get(s) for s in ("status", "drifted", "psi_class", "embedding_shift",
                                                   "unknown_rate")} for k, v in drift.items()},  # fmt: skip
        "drift_hook_runs": len(runs), "drift_hook_first": json.loads(runs[0]) if runs else None,
        "captured_and_labelled": n_labelled, "retrain_exit": r.returncode, "retrain": retrain_doc,
        "swapped": swapped, "requests": {str(k): v for k, v in sorted(client.codes.items())},
        "answered_by_version": client.versions, "accuracy": acc,
        "targets": {"drift_hook_once": len(runs) == 1, "promoted_and_swapped": bool(swapped),
                    "shifted_gain_ge_5": gain is not None and gain >= 5.0,
                    "clean_loss_le_1": loss is not None and loss <= 1.0,
                    "no_failed_request": set(client.codes) == {200}},  # fmt: skip
        "shifted_gain_points": gain, "clean_loss_points": loss,
        "timings_s": {k: round(v, 1) for k, v in t.items()},
        "swap_log": [ln for ln in serve_log.splitlines() if "fmnist:" in ln and ("from" in ln or "unloaded" in ln)],
        "machine": machine(), "versions": package_versions(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def _wait_capture(cap: Path, labelled: Path, y: np.ndarray, names: list[str]) -> int:
    """Wait for the capture writer to catch up (its count stops moving), copy what it kept and label the copy."""
    last, still = -1, 0
    while still < 3:
        time.sleep(0.5)
        n = sum(1 for _ in open(cap / "labels.csv", encoding="utf-8")) if (cap / "labels.csv").exists() else 0
        still = still + 1 if n == last else 0
        last = n
    shutil.rmtree(labelled, ignore_errors=True)
    shutil.copytree(cap, labelled)
    return label_capture(labelled, y, names)


def _wait_swap(port: int, promoted: bool, timeout: float = 120) -> dict | None:
    """Wait until version 2 answers alone (the server picked it up and unloaded version 1)."""
    if not promoted:
        return None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        doc = get_json(port, "/v2/models/fmnist")
        if doc.get("versions") == ["2"]:
            return {"seconds_after_promotion": round(time.perf_counter() - t0, 2)}
        time.sleep(0.2)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
