"""Drift seen by imgclf serve: the same run served twice, one version fed Fashion-MNIST test images, the
other a different real data set (sklearn's scanned digits); GET /drift after each.

Usage: python bench/drift_serve.py RUN [--n 500]   (writes bench/results/drift_serve.json)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from demo_seeds import machine

from imgclf.artifact import package_versions
from imgclf.data.sources import open_source
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "drift_serve.json"
SOURCES = {"1": "builtin:fashion-mnist:test", "2": "builtin:digits"}


def post_images(base: str, version: str, images: list) -> None:
    b = uuid.uuid4().hex
    body = b""
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        body += f'--{b}\r\nContent-Disposition: form-data; name="f"; filename="{i}.png"\r\n\r\n'.encode()
        body += buf.getvalue() + b"\r\n"
    body += f"--{b}--\r\n".encode()
    req = urllib.request.Request(f"{base}/models/m/versions/{version}/predict", body,
                                 {"Content-Type": f"multipart/form-data; boundary={b}"})  # fmt: skip
    urllib.request.urlopen(req).read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=500, help="images per data set (the drift window holds 1,000)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        log = open(Path(tmp) / "serve.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "serve", f"m={a.run}", f"m:2={a.run}", "--port",
                                 "0", "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise SystemExit((Path(tmp) / "serve.log").read_text())
                time.sleep(0.3)
            base = f"http://127.0.0.1:{json.loads(ready.read_text())['port']}"
            for version, source in SOURCES.items():
                src = open_source(source)
                idx = np.random.default_rng(0).permutation(len(src))[: a.n]
                for chunk in np.array_split(idx, max(1, a.n // 16)):
                    post_images(base, version, [src.load(int(i)) for i in chunk])
            drift = json.load(urllib.request.urlopen(base + "/drift"))["models"]
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
        warnings = [ln for ln in (Path(tmp) / "serve.log").read_text().splitlines() if "drift on model" in ln]
    doc = {"run": a.run, "command": "python bench/drift_serve.py " + " ".join(sys.argv[1:]),
           "data": {f"m:{v}": s for v, s in SOURCES.items()}, "drift": drift, "log_warnings": warnings,
           "machine": machine(), "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    write_json(RESULTS, doc)
    for key, rep in drift.items():
        stats = " ".join(f"{k} {rep[k]:.3f}" for k in ("psi_class", "psi_confidence", "ks_confidence",
                                                       "embedding_shift", "unknown_rate"))  # fmt: skip
        print(f"{key} ({doc['data'][key]}): {rep['status']}  {stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
