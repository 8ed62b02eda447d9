"""Time-to-accuracy on the full Fashion-MNIST (60k train / 10k official test): wall time to >= 94 % test top-1,
and the best test top-1 in 20 wall-minutes, on this machine.

Each entry is one whole `imgclf train --data bench/data/fashion_mnist_full.npz <flags>` command in a subprocess
(10 % of the official training split held out for validation, the official test split only for the figure),
timed from the start of the process to its exit: data loading, the fast path's decode, every epoch's training
and validation, the test evaluation, calibration, the OOD statistics and the report are all inside the wall
time. Results merge into bench/results/time_to_accuracy_fmnist.json (re-run a subset with --only); the script
prints the README table. Run alone on the machine: the wall time is the figure.

Usage: python bench/time_to_accuracy_fmnist.py [--only fastest-94 ...] [--list]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from demo_seeds import machine
from fashion_mnist import ensure_full
from recipes_fmnist import RUNS_DIR, run_one

from imgclf.artifact import package_versions
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "time_to_accuracy_fmnist.json"
TARGET = 0.94  # test top-1 of the "time to accuracy" figure
BUDGET_MIN = 20.0  # wall minutes of the "best in a budget" figure

#: name -> (flags after `imgclf train --data FMNIST`, flags after `imgclf eval RUN --data FMNIST` or None); all use
#: the packaged scratch-small recipe (a 1.2 M-parameter CNN at the native 28 px, bf16 autocast where the CPU has
#: AMX) with the fast data path its small images get. A second command's wall time is added to the first's.
RUNS = {
    "scratch-small-10": ("--recipe scratch-small --epochs 10", None),
    "scratch-small-16": ("--recipe scratch-small --epochs 16", None),
    "scratch-small-16+tta": ("--recipe scratch-small --epochs 16", "--tta flip"),
    "scratch-small-17": ("--recipe scratch-small --epochs 17", None),
    "scratch-small-17+tta": ("--recipe scratch-small --epochs 17", "--tta flip_multiscale"),
}


def with_eval(name: str, train_flags: str, eval_flags: str, data: Path, results: dict) -> dict:
    """The trained run ``name`` (same train flags, already in RUNS_DIR) evaluated by ``imgclf eval --data DATA
    <eval_flags>`` on the official test split: its top-1, and the two commands' wall time summed."""
    base = next(r for r in results.values() if r["command"].endswith(train_flags) and "eval" not in r)
    run = RUNS_DIR / base["run"]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "imgclf", "eval", str(run), "--data", str(data), "--no-progress", "--format", "json",
           *shlex.split(eval_flags)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    top1 = json.loads(proc.stdout)["top1"]
    return {**base, "eval": f"imgclf eval bench/runs/{base['run']} --data bench/data/fashion_mnist_full.npz "
            + eval_flags, "test_top1": top1, "eval_minutes": round(wall / 60, 1),
            "wall_minutes": round(base["wall_minutes"] + wall / 60, 1)}  # fmt: skip


def table(results: dict) -> str:
    head = "| run | flags after `imgclf train --data fashion_mnist_full.npz` | test top-1 | wall time | train img/s |"
    lines = [head, "|---|---|---|---|---|"]
    for name, r in results.items():
        flags = r["command"].split("fashion_mnist_full.npz ", 1)[1]
        if r.get("eval"):
            flags += "`, then `imgclf eval RUN " + r["eval"].split("fashion_mnist_full.npz ", 1)[1]
        top1 = f"{100 * r['test_top1']:.2f} %"
        top1 = f"**{top1}**" if r["test_top1"] >= TARGET else top1
        lines.append(f"| {name} | `{flags}` | {top1} | {r['wall_minutes']} min | {r['train_img_per_s']:.0f} |")
    hits = [r for r in results.values() if r["test_top1"] >= TARGET]
    fast = min(hits, key=lambda r: r["wall_minutes"], default=None)
    inside = [r for r in results.values() if r["wall_minutes"] <= BUDGET_MIN]
    best = max(inside, key=lambda r: r["test_top1"], default=None)
    if fast:
        top1 = 100 * fast["test_top1"]
        lines.append(f"\nfastest to >= {100 * TARGET:.0f} %: {fast['wall_minutes']} min ({top1:.2f} %)")
    if best:
        lines.append(f"best within {BUDGET_MIN:.0f} min: {100 * best['test_top1']:.2f} % ({best['wall_minutes']} min)")
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
            train_flags, eval_flags = RUNS[name]
            if eval_flags:
                results[name] = with_eval(name, train_flags, eval_flags, data, results)
            else:
                results[name] = {**run_one(name, train_flags, data, RUNS_DIR), "run": name}
            results[name]["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
            print(f"{name}: test top-1 {100 * results[name]['test_top1']:.2f} %, "
                  f"{results[name]['wall_minutes']} min", flush=True)  # fmt: skip
            order = {n: results[n] for n in RUNS if n in results}
            write_json(RESULTS, {"runs": order, "machine": machine(), "versions": package_versions()})
    print(table({n: results[n] for n in RUNS if n in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
