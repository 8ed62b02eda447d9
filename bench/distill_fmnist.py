"""Knowledge distillation on the full Fashion-MNIST (60k train / 10k official test): a small student trained
without KD, with logit KD and with feature KD (``--seeds`` each), beside the teacher, with size and speed.

The teacher is a trained run (``--teacher``, default ``bench/runs/scratch-small-17``: the best single run of
``bench/time_to_accuracy_fmnist.py``, simplecnn_s, 1.2 M parameters); the student is ``--student`` (default
``simplecnn_t``, 0.29 M parameters) from scratch with the ``scratch-small`` recipe for ``--epochs``. Every run is
one `imgclf train --data bench/data/fashion_mnist_full.npz ...` command in a subprocess (10 % of the official
training split held out for validation, the official test split only for the figures); the teacher's test top-1
is the one the student runs measure (its own preprocessing, same images). Size is the safetensors file; img/s is
`imgclf bench RUN --runtimes torch` at batch 1 and 32. Results merge into bench/results/distill_fmnist.json
(re-run a subset with --only); the script prints the README table with mean ± std over the seeds.

Usage: python bench/distill_fmnist.py [--teacher bench/runs/scratch-small-17] [--student simplecnn_t]
    [--epochs 8] [--seeds 0 1 2] [--only none logit feature] [--remeasure] [--list]
(the students' img/s is the median over their runs: same architecture)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from demo_seeds import machine
from fashion_mnist import ensure_full
from recipes_fmnist import RUNS_DIR, run_one

from imgclf.artifact import package_versions
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "distill_fmnist.json"
#: condition -> flags added to the student's command
CONDITIONS = {
    "none": "",
    "logit": "--distill.methods logit",
    "feature": "--distill.methods logit+feature",
}


def speed(run: Path) -> dict:
    """Model file size (MB) and img/s at batch 1 and 32 of ``imgclf bench RUN --runtimes torch``."""
    out = RUNS_DIR / f"{run.name}-bench.json"
    cmd = [sys.executable, "-m", "imgclf", "bench", str(run), "--runtimes", "torch", "--batch-sizes", "1", "32",
           "--no-progress", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench {run} failed:\n{proc.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    rates = {str(r["batch"]): r["img_per_s"] for r in doc["results"] if r.get("runtime") == "torch"}
    return {"size_mb": round((run / "model.safetensors").stat().st_size / 1e6, 2), "img_per_s": rates}


def table(res: dict) -> str:
    head = "| model | KD | test top-1 (mean ± std) | seeds | size | img/s batch 1 / 32 |"
    lines = [head, "|---|---|---|---|---|---|"]
    t = res.get("teacher")
    if t:
        sp = t["speed"]
        lines.append(f"| teacher `{t['arch']}` | | {100 * t['test_top1']:.2f} % | 1 | {sp['size_mb']} MB | "
                     f"{sp['img_per_s'].get('1', 0):.0f} / {sp['img_per_s'].get('32', 0):.0f} |")  # fmt: skip
    for cond, runs in res.get("students", {}).items():
        accs = [100 * r["test_top1"] for r in runs.values()]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sp = next(iter(runs.values()))["speed"]
        rate = {b: statistics.median(r["speed"]["img_per_s"].get(b, 0) for r in runs.values()) for b in ("1", "32")}
        lines.append(f"| student `{res['student']}` | {cond} | {statistics.mean(accs):.2f} ± {sd:.2f} % | "
                     f"{len(accs)} | {sp['size_mb']} MB | {rate['1']:.0f} / {rate['32']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=RUNS_DIR / "scratch-small-17")
    ap.add_argument("--student", default="simplecnn_t")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=list(CONDITIONS))
    ap.add_argument("--list", action="store_true", help="print the table of stored results and exit")
    ap.add_argument("--remeasure", action="store_true",
                    help="measure size and img/s again (teacher and every student run, one after the other on a quiet "
                         "machine) without training")  # fmt: skip
    a = ap.parse_args()
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"students": {}}
    if a.remeasure:
        res["teacher"]["speed"] = speed(Path(res["teacher"]["run"]))
        for cond, runs in res["students"].items():
            for seed in runs:
                runs[seed]["speed"] = speed(RUNS_DIR / f"kd-{res['student']}-{cond}-s{seed}")
        res["speed_remeasured"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
        write_json(RESULTS, res)
    elif not a.list:
        data = ensure_full()
        teacher = json.loads((a.teacher / "imgclf.json").read_text())
        res.update(student=a.student, epochs=a.epochs, teacher={
            "run": str(a.teacher), "arch": teacher["arch"], "test_top1": teacher["metrics"]["test"]["top1"],
            "speed": speed(a.teacher)})  # fmt: skip
        for cond in a.only or list(CONDITIONS):
            for seed in a.seeds:
                name = f"kd-{a.student}-{cond}-s{seed}"
                flags = (f"--recipe scratch-small --model {a.student} --epochs {a.epochs} --seed {seed} "
                         + (f"--teacher {a.teacher} {CONDITIONS[cond]}" if cond != "none" else ""))  # fmt: skip
                row = run_one(name, flags.strip(), data, RUNS_DIR)
                row["speed"] = speed(RUNS_DIR / name)
                res["students"].setdefault(cond, {})[str(seed)] = row
                print(f"{name}: test top-1 {100 * row['test_top1']:.2f} %, {row['wall_minutes']} min", flush=True)
                write_json(RESULTS, {**res, "machine": machine(), "versions": package_versions()})
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
