"""Robustness of the demo run and the best Fashion-MNIST recipe to common corruptions at severities 1-5.

Runs ``imgclf eval RUN --data bench/data/fashion_mnist_full.npz --split test --shift corruptions --max-images N``
(a stratified, seeded share of the official 10k test images) for

- ``runs/demo`` (``make demo``: EfficientNet-Lite0, packaged ImageNet weights, fine-tuned on the embedded subset),
- ``bench/runs/scratch-small-17`` (the scratch-small recipe on the full training set, ``bench/distill_fmnist.py``'s
  teacher; the best recipe of ``bench/recipes_fmnist.py``),

and writes bench/results/shift_fmnist.json (per corruption x severity top-1, ECE, OOD rejection; mCA; wall time)
and prints the README table.

Usage: python bench/shift_fmnist.py [--max-images 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_seeds import machine
from fashion_mnist import ensure_full

from imgclf.artifact import package_versions
from imgclf.io import write_json

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results" / "shift_fmnist.json"
RUNS = {"demo (Lite0, embedded subset)": ROOT / "runs" / "demo",
        "scratch-small (full train set)": Path(__file__).parent / "runs" / "scratch-small-17"}  # fmt: skip


def measure(run: Path, data: Path, n: int) -> dict:
    """``imgclf eval --shift`` on a copy of ``run`` (robustness.json lands in the copy), timed."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "export", "tensorboard"))
        args = ["eval", str(copy), "--data", str(data), "--split", "test", "--shift", "corruptions", "--max-images",
                str(n), "--no-progress", "--format", "json"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
        doc = json.loads((copy / "robustness.json").read_text())
    doc["wall_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    doc["command"] = f"imgclf eval {run.relative_to(ROOT)} --data bench/data/fashion_mnist_full.npz --split test " \
                     f"--shift corruptions --max-images {n}"  # fmt: skip
    return doc


def table(res: dict) -> str:
    lines = []
    for label, doc in res["runs"].items():
        head = "| corruption | 1 | 2 | 3 | 4 | 5 | mean | rejected as unknown |"
        lines += [
            f"**{label}**: clean {100 * doc['clean']['top1']:.1f} %, mCA {100 * doc['mca']:.1f} %, relative drop "
            f"{100 * doc['relative_drop']:.1f} %, mean ECE under shift {100 * doc['mean_ece']:.1f} % "
            f"({doc['wall_minutes']} min)",
            "",
            head,
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, per in doc["per_corruption"].items():
            acc = {r["severity"]: r["top1"] for r in doc["rows"] if r["corruption"] == name}
            cells = " | ".join(f"{100 * acc[s]:.1f}" for s in range(1, 6))
            rej = f"{100 * per['rejected']:.0f} %" if per.get("rejected") is not None else "-"
            lines.append(f"| {name.replace('_', ' ')} | {cells} | {100 * per['top1']:.1f} | {rej} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-images", type=int, default=2000)
    args = ap.parse_args()
    data = ensure_full()
    res = {"runs": {label: measure(run, data, args.max_images) for label, run in RUNS.items()},
           "machine": machine(), "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, res)
    print(table(res))


if __name__ == "__main__":
    main()
