"""Time and peak memory of `imgclf audit` on the full Fashion-MNIST training set (60,000 images; its official
10,000-image test split, stored in the same .npz, is audited with it for leaks).

Builds bench/data/fashion_mnist_full.npz once (`bench/fashion_mnist.py`), then runs the audit twice in a
subprocess (so the peak RSS is the audit's own): cold (empty hash and feature cache) and warm (everything
cached: only the searches, the probe folds and cleanlab run). Packaged Lite0 at 80 px, as the probe recipe's
README runs. Results: bench/results/audit_fmnist.json (wall time, peak RSS, findings per kind).

Usage: python bench/audit_fmnist.py [--quick]   (--quick: a 2,000 / 500 image subset)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from fashion_mnist import ensure_full

from imgclf.artifact import package_versions
from imgclf.io import atomic_path, write_json

ROOT = Path(__file__).parent
RESULTS = ROOT / "results" / "audit_fmnist.json"
FLAGS = ["--input-size", "80", "--crop-pct", "1", "--weights", "packaged", "--no-progress", "-q"]


def quick_subset(full: Path, n_train: int = 2000, n_test: int = 500) -> Path:
    """The first ``n_train`` / ``n_test`` images of the full .npz, for a quick check of the script."""
    out = ROOT / "data" / "fashion_mnist_quick.npz"
    with np.load(full) as z:
        parts = {k: z[k][:n_train] if k.startswith("train") else z[k][:n_test] if k.startswith("test") else z[k]
                 for k in z.files}  # fmt: skip
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **parts)
    return out


def run(data: Path, cache: Path, report: Path) -> dict:
    """One audit in a subprocess: wall seconds and the subprocess's peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgclf", "audit", str(data), "--cache-dir", str(cache), "--json",
                           str(report), *FLAGS], capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"audit failed:\n{proc.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far (Linux: KiB)
    return {"wall_seconds": round(wall, 1), "peak_rss_mib_max_so_far": round(rss), "stdout": proc.stdout}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (a check that the script runs)")
    a = ap.parse_args()
    full = ensure_full()
    assert full.is_file(), full
    data = quick_subset(full) if a.quick else full
    with tempfile.TemporaryDirectory() as tmp:
        cold = run(data, Path(tmp) / "cache", Path(tmp) / "cold.json")
        warm = run(data, Path(tmp) / "cache", Path(tmp) / "warm.json")
        doc = json.loads((Path(tmp) / "warm.json").read_text())
    print(cold.pop("stdout"))
    warm.pop("stdout")
    result = {
        "command": f"imgclf audit {data.relative_to(ROOT.parent)} {' '.join(FLAGS)}",
        "quick": a.quick,
        "images": {k: v["n"] for k, v in doc["splits"].items()},
        "cold": cold,
        "warm": warm,
        "peak_rss_mib": cold["peak_rss_mib_max_so_far"],
        "summary": doc["summary"],
        "probe": doc["probe"],
        "settings": doc["settings"],
        "machine": machine(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(RESULTS if not a.quick else RESULTS.with_name("audit_fmnist_quick.json"), result)
    print(f"cold {cold['wall_seconds']} s, warm {warm['wall_seconds']} s, peak RSS {result['peak_rss_mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
