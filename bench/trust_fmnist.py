"""Calibration, OOD detection, TTA and a 3-member ensemble on the official Fashion-MNIST test set.

Uses the runs that bench/recipes_fmnist.py trained (bench/runs/<recipe>; their temperatures and OOD
thresholds were fitted on the 10 % validation split held out of the official training set):

1. ECE (equal-width and equal-mass), NLL and Brier on the 10k test images before and after the
   run's temperature;
2. AUROC / AUPR / FPR@95%TPR of every OOD score, Fashion-MNIST test (in) vs. scikit-learn's digits
   (``builtin:digits``, 1,797 real 8x8 scans of handwritten digits, out);
3. top-1 and NLL with each TTA mode against no TTA;
4. deep ensembles (mean calibrated probabilities) against their best member: three scratch-small
   runs that differ only in the seed (5 epochs each, trained here into bench/runs/ens-<seed> when
   missing), and the three different recipes scratch-small + finetune + finetune-strong.

Writes bench/results/trust_fmnist.json, rewrites the main run's report.html with the OOD section and
prints the README tables.

Usage: python bench/trust_fmnist.py [--run scratch-small] [--seeds 0 1 2] [--member-epochs 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from demo_seeds import machine
from fashion_mnist import ensure_full
from recipes_fmnist import RUNS_DIR

from imgclf import api
from imgclf.artifact import package_versions
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "trust_fmnist.json"
OOD = "builtin:digits"


def _cal(m: dict) -> dict:
    return {k: round(v, 5) for k, v in m.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="scratch-small", help="recipe run for calibration, OOD and TTA")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the same-recipe ensemble")
    ap.add_argument("--member-epochs", type=int, default=5)
    ap.add_argument("--mixed", nargs="+", default=["scratch-small", "finetune", "finetune-strong"])
    ap.add_argument("--tta", nargs="+", default=["flip", "multiscale", "flip_multiscale"])
    ap.add_argument("--list", action="store_true", help="print the tables of stored results and exit")
    a = ap.parse_args()
    if a.list:
        print(tables(json.loads(RESULTS.read_text())))
        return 0
    data = str(ensure_full())
    run = RUNS_DIR / a.run
    if not (run / "imgclf.json").is_file():
        raise SystemExit(f"{run} is missing: run `python bench/recipes_fmnist.py --only {a.run}` first")
    opts = {"num_workers": 2, "progress": True}
    t0 = time.perf_counter()
    base = api.evaluate(str(run), data, ood_data=OOD, **opts)
    res: dict = {
        "run": a.run,
        "command": f"imgclf eval bench/runs/{a.run} --data bench/data/fashion_mnist_full.npz --ood-data {OOD}",
        "test_top1": base["top1"],
        "calibration": {
            "temperature": base["calibration"]["temperature"],
            "before": _cal(base["calibration"]["before"]),
            "after": _cal(base["calibration"]["after"]),
        },
        "ood": {
            "data": OOD,
            "n": base["ood"]["n"],
            "metrics": base["ood"]["metrics"],
            "rejected": base["ood"]["rejected"],
        },  # fmt: skip
        "tta": {"none": {"top1": base["top1"], "nll": base["calibration"]["after"]["nll"]}},
    }
    for mode in a.tta:
        m = api.evaluate(str(run), data, tta=mode, **opts)
        res["tta"][mode] = {"top1": m["top1"], "nll": m["calibration"]["after"]["nll"]}
    seeds = [train_member(data, seed, a.member_epochs) for seed in a.seeds]
    res["ensemble"] = ensemble(seeds, data, opts)
    res["ensemble"]["members_trained_with"] = MEMBER_FLAGS.format(epochs=a.member_epochs) + " --seed S"
    if all((RUNS_DIR / n / "imgclf.json").is_file() for n in a.mixed):
        res["ensemble_mixed"] = ensemble(a.mixed, data, opts)
    report = api.report(str(run), ood_data=OOD)
    res["report"] = str(report)
    res["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    res["machine"], res["versions"], res["date"] = machine(), package_versions(), time.strftime("%Y-%m-%d")
    write_json(RESULTS, res)
    print(tables(res))
    return 0


MEMBER_FLAGS = "--recipe scratch-small --epochs {epochs}"


def train_member(data: str, seed: int, epochs: int) -> str:
    """bench/runs/ens-<seed>: scratch-small with this seed, trained unless already there."""
    name = f"ens-{seed}"
    if not (RUNS_DIR / name / "imgclf.json").is_file():
        flags = MEMBER_FLAGS.format(epochs=epochs).split() + ["--seed", str(seed)]
        args = ["train", "--data", data, "--output", str(RUNS_DIR), "--name", name, "--no-progress", *flags]
        subprocess.run([sys.executable, "-m", "imgclf", *args], check=True)
    return name


def ensemble(names: list[str], data: str, opts: dict) -> dict:
    ens = api.evaluate_ensemble([str(RUNS_DIR / n) for n in names], data, **opts)
    return {
        "members": {Path(k).name: {"top1": v["top1"], "nll": v["calibration"]["nll"]}
                    for k, v in ens["members"].items()},
        "ensemble": {"top1": ens["ensemble"]["top1"], "nll": ens["ensemble"]["calibration"]["nll"]},
        "gain": ens["gain"],
        "command": "imgclf eval " + " ".join(f"bench/runs/{n}" for n in names)
        + " --data bench/data/fashion_mnist_full.npz",
    }  # fmt: skip


def tables(r: dict) -> str:
    c = r["calibration"]
    out = [f"Calibration on the Fashion-MNIST test set ({r['run']}, T = {c['temperature']:.3f}):", "",
           "| | ECE (15 equal-width bins) | ECE (equal-mass) | NLL | Brier |", "|---|---|---|---|---|"]  # fmt: skip
    for k in ("before", "after"):
        m = c[k]
        out.append(f"| {k} temperature scaling | {100 * m['ece']:.2f} % | {100 * m['ece_equal_mass']:.2f} % | "
                   f"{m['nll']:.4f} | {m['brier']:.4f} |")  # fmt: skip
    out += ["", f"OOD: Fashion-MNIST test (in, 10,000) vs. {r['ood']['data']} (out, {r['ood']['n']}):", "",
            "| score | AUROC | AUPR | FPR@95%TPR | OOD rejected at the val threshold |",
            "|---|---|---|---|---|"]  # fmt: skip
    for k, m in r["ood"]["metrics"].items():
        rej = r["ood"]["rejected"].get(k, {}).get("ood")
        out.append(f"| {k} | {m['auroc']:.4f} | {m['aupr']:.4f} | {100 * m['fpr_at_95_tpr']:.1f} % | "
                   f"{'' if rej is None else f'{100 * rej:.1f} %'} |")  # fmt: skip
    out += ["", "| TTA | test top-1 | NLL (calibrated) |", "|---|---|---|"]
    for k, m in r["tta"].items():
        out.append(f"| {k} | {100 * m['top1']:.2f} % | {m['nll']:.4f} |")
    for key in ("ensemble", "ensemble_mixed"):
        if key not in r:
            continue
        e = r[key]
        out += ["", "| ensemble member | test top-1 | NLL (calibrated) |", "|---|---|---|"]
        for k, m in e["members"].items():
            out.append(f"| {k} | {100 * m['top1']:.2f} % | {m['nll']:.4f} |")
        ens = e["ensemble"]
        out.append(f"| **mean of the three** | **{100 * ens['top1']:.2f} %** | **{ens['nll']:.4f}** |")
        g = e["gain"]
        out.append(f"\ngain over the best member: {g['top1_points']:+.2f} points top-1, NLL {-g['nll']:+.4f}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
