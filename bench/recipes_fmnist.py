"""Transfer strategies on the official Fashion-MNIST split (60k train / 10k test): accuracy, time, img/s.

Each entry runs `imgclf train --data bench/data/fashion_mnist_full.npz <flags>` in a subprocess (10 % of the
official training split is held out for validation; the official test split is the test set), then
reads the run's imgclf.json. Results merge into bench/results/recipes_fmnist.json (re-run a subset with
--only) and the script prints the README table.

Usage: python bench/recipes_fmnist.py [--only probe finetune ...] [--list]
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from demo_seeds import machine
from fashion_mnist import ensure_full

from imgclf.artifact import package_versions
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "recipes_fmnist.json"
#: the trained runs stay here (gitignored) for bench/trust_fmnist.py; a re-run replaces its run
RUNS_DIR = Path(__file__).parent / "runs"

#: name -> flags after `imgclf train --data FMNIST`; input sizes keep each run inside ~30 CPU-minutes here
SMALL = "--input-size 64 --data.crop_pct 1.0"  # 28 px images upsampled for the ImageNet backbone
RUNS = {
    "probe": "--recipe probe --input-size 80 --data.crop_pct 1.0",
    "staged": f"--recipe finetune --strategy staged --transfer.head_epochs 1 --epochs 5 {SMALL}",
    "finetune": f"--recipe finetune --epochs 5 {SMALL}",
    "finetune-strong": f"--recipe finetune-strong --epochs 5 {SMALL}",
    "scratch-small": "--recipe scratch-small --epochs 18",
}


def train_run(name: str, flags: str, data: Path, out: Path) -> tuple[dict, float, float]:
    """``imgclf train --data DATA <flags>`` as ``out/name`` (replaced) in a subprocess: (its imgclf.json, wall
    seconds, CPU seconds of the subprocess and its workers)."""
    if (out / name).exists():
        shutil.rmtree(out / name)
    args = ["train", "--data", str(data), "--output", str(out), "--name", name, "--no-progress", *shlex.split(flags)]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / name / "imgclf.json").read_text()), wall, cpu


def run_one(name: str, flags: str, data: Path, out: Path) -> dict:
    doc, wall, cpu = train_run(name, flags, data, out)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["img_per_s"] for r in rows if "img_per_s" in r]
    return {
        "command": "imgclf train --data bench/data/fashion_mnist_full.npz " + flags,
        "test_top1": doc["metrics"]["test"]["top1"],
        "val_top1": doc["metrics"]["val"]["top1"],
        "wall_minutes": round(wall / 60, 1),
        "cpu_minutes": round(cpu / 60, 1),
        "train_img_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "epochs_run": doc["metrics"]["epochs_run"],
        "best_epoch": doc["metrics"]["best_epoch"],
        "config": doc["config"],
        "date": time.strftime("%Y-%m-%d"),
    }


def table(results: dict) -> str:
    head = (
        "| strategy | flags after `imgclf train --data fmnist.npz` | test top-1 | wall time | CPU time | train img/s |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for name, r in results.items():
        flags = r["command"].split("fashion_mnist_full.npz ", 1)[1]
        speed = f"{r['train_img_per_s']:.0f}" if r.get("train_img_per_s") else "n/a (features once)"
        lines.append(f"| {name} | `{flags}` | {100 * r['test_top1']:.2f} % | {r['wall_minutes']} min | "
                     f"{r.get('cpu_minutes', '?')} min | {speed} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(RUNS), help="run just these")
    ap.add_argument("--list", action="store_true", help="print the table of stored results and exit")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else {}
    if not a.list:
        data = ensure_full()
        for name in a.only or list(RUNS):
            results[name] = run_one(name, RUNS[name], data, RUNS_DIR)
            print(f"{name}: test top-1 {100 * results[name]['test_top1']:.2f} %, "
                  f"{results[name]['wall_minutes']} min", flush=True)  # fmt: skip
            order = {n: results[n] for n in RUNS if n in results}
            write_json(RESULTS, {"runs": order, "machine": machine(), "versions": package_versions()})
    print(table({n: results[n] for n in RUNS if n in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
