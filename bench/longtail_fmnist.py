"""Long-tailed Fashion-MNIST: the class-imbalance methods side by side, same backbone and budget.

The training set is the official Fashion-MNIST training split cut to an exponential profile with imbalance ratio
100 (Cao et al. 2019, "LDAM"; the CIFAR-10-LT construction): class ``c`` (in the official class order) keeps the
first ``floor(6000 * 100 ** (-c / 9))`` of its images, 6,000 for T-shirt/top down to 60 for Ankle boot, 14,886
in all. The test set is the official balanced test split (1,000 per class). Written once to
bench/data/fmnist_lt100.npz (`train_*`, `test_*`, `class_names`).

Every trained entry runs `imgclf train --data fmnist_lt100.npz <BASE> <flags>`: the fine-tune recipe of the
single-label table at a smaller budget (EfficientNet-Lite0, packaged ImageNet weights, 48 px, 4 epochs), the
best epoch picked by validation balanced accuracy (10 % of the long-tailed training set, stratified, so it is
long-tailed too). The derived entries reuse the plain cross-entropy run: cRT and tau-normalisation (`imgclf
rebalance`, Kang et al. 2020) retrain or rescale its head on its frozen features, and post-hoc logit adjustment
(Menon et al. 2021) evaluates it with uniform deployment priors (`imgclf eval --priors uniform`). Reported: test
top-1, balanced accuracy (the mean per-class recall; the test set is balanced, so it equals top-1 up to
rounding) and the mean recall of the rarest third of the classes (Sneaker, Bag, Ankle boot: 166, 100 and 60
training images).
Results merge into bench/results/longtail_fmnist.json; the script prints the README table.

Usage: python bench/longtail_fmnist.py [--only ce crt ...] [--list]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from fashion_mnist import ensure_full
from recipes_fmnist import train_run

from imgclf.artifact import package_versions
from imgclf.io import atomic_path, write_json

DATA = Path(__file__).parent / "data" / "fmnist_lt100.npz"
RESULTS = Path(__file__).parent / "results" / "longtail_fmnist.json"
RUNS_DIR = Path(__file__).parent / "runs" / "longtail"
RATIO, N_MAX = 100, 6000

BASE = "--recipe finetune --epochs 4 --input-size 48 --data.crop_pct 1.0 --train.metric balanced_accuracy"
#: name -> (label, flags after `imgclf train --data fmnist_lt100.npz BASE`)
TRAINED = {
    "ce": ("cross-entropy (plain)", ""),
    "weighted_ce": ("class-weighted CE (inverse frequency)", "--train.class_weights inverse"),
    "class_balanced": (
        "class-balanced CE (effective number, beta 0.9999)",
        "--train.class_weights effective --train.cb_beta 0.9999",
    ),  # fmt: skip
    "focal": ("focal loss (gamma 2)", "--train.loss focal"),
    "logit_adjusted": ("logit-adjusted loss (tau 1)", "--train.loss logit_adjusted"),
    "balanced_softmax": ("balanced softmax", "--train.loss balanced_softmax"),
    "balanced_sampler": ("class-balanced sampler", "--data.sampler balanced"),
}
#: name -> (label, the imgclf command run on the plain cross-entropy run {ce})
DERIVED = {
    "crt": ("cRT: head retrained class-balanced on frozen features", "rebalance {ce} --method crt --name {name}"),
    "tau_norm": ("tau-normalised head", "rebalance {ce} --method tau_norm --name {name}"),
    "posthoc_la": (
        "post-hoc logit adjustment (uniform priors)",
        "eval {ce} --data {data} --split test --priors uniform --format json",
    ),  # fmt: skip
}
ORDER = [*TRAINED, *DERIVED]


def profile(k: int = 10) -> list[int]:
    """Training images kept per class: ``floor(N_MAX * RATIO ** (-c / (k - 1)))``."""
    return [int(N_MAX * RATIO ** (-c / (k - 1))) for c in range(k)]


def ensure_longtail() -> Path:
    """Write the long-tailed .npz once and return its path."""
    if DATA.is_file():
        return DATA
    with np.load(ensure_full()) as z:
        tx, ty, names = z["train_images"], z["train_labels"], z["class_names"]
        test_x, test_y = z["test_images"], z["test_labels"]
    keep = np.concatenate([np.flatnonzero(ty == c)[:n] for c, n in enumerate(profile(len(names)))])
    keep.sort()
    DATA.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(DATA) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, train_images=tx[keep], train_labels=ty[keep], test_images=test_x, test_labels=test_y,
                     class_names=names)  # fmt: skip
    return DATA


def figures(test: dict, names: list[str]) -> dict:
    rare = names[-len(names) // 3 :]  # the rarest third: the last classes of the exponential profile
    return {
        "test_top1": test["top1"],
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_rare_recall": float(np.mean([test["per_class"][n]["recall"] for n in rare])),
        "test_per_class_recall": {n: test["per_class"][n]["recall"] for n in names},
    }


def run_trained(name: str, flags: str, data: Path) -> dict:
    doc, wall, cpu = train_run(name, f"{BASE} {flags}".strip(), data, RUNS_DIR)
    return {
        "command": f"imgclf train --data bench/data/{DATA.name} {BASE} {flags}".strip(),
        **figures(doc["metrics"]["test"], doc["class_names"]),
        "val_balanced_accuracy": doc["metrics"]["val"]["balanced_accuracy"],
        "wall_minutes": round(wall / 60, 1),
        "cpu_minutes": round(cpu / 60, 1),
        "best_epoch": doc["metrics"]["best_epoch"],
        "date": time.strftime("%Y-%m-%d"),
    }


def run_derived(name: str, template: str, data: Path) -> dict:
    ce = RUNS_DIR / "ce"
    if not (ce / "imgclf.json").is_file():
        raise SystemExit(f"{name} needs the plain cross-entropy run first: python bench/longtail_fmnist.py --only ce")
    args = shlex.split(template.format(ce=ce, name=name, data=data))
    if args[0] == "rebalance":
        args += ["--output", str(RUNS_DIR), "--no-progress"]
        if (RUNS_DIR / name).exists():
            import shutil

            shutil.rmtree(RUNS_DIR / name)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    if args[0] == "eval":
        test, names = json.loads(proc.stdout), json.loads((ce / "imgclf.json").read_text())["class_names"]
    else:
        doc = json.loads((RUNS_DIR / name / "imgclf.json").read_text())
        test, names = doc["metrics"]["test"], doc["class_names"]
    return {"command": "imgclf " + template.format(ce="bench/runs/longtail/ce", name=name, data=DATA.name),
            **figures(test, names), "wall_minutes": round(wall / 60, 2), "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def table(results: dict) -> str:
    base = results.get("ce")
    lines = ["| method | test balanced accuracy | vs plain CE | recall, rarest third | wall time |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name in ORDER:
        if name not in results:
            continue
        r = results[name]
        label = (TRAINED.get(name) or DERIVED[name])[0]
        gain = f"{100 * (r['test_balanced_accuracy'] - base['test_balanced_accuracy']):+.2f}" if base else ""
        wall = f"{r['wall_minutes']} min" + (" (on the CE run)" if name in DERIVED else "")
        lines.append(f"| {label} | {100 * r['test_balanced_accuracy']:.2f} % | {gain} | "
                     f"{100 * r['test_rare_recall']:.2f} % | {wall} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=ORDER, help="run just these")
    ap.add_argument("--list", action="store_true", help="print the table of stored results and exit")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else {}
    if not a.list:
        data = ensure_longtail()
        for name in a.only or ORDER:
            if name in TRAINED:
                results[name] = run_trained(name, TRAINED[name][1], data)
            else:
                results[name] = run_derived(name, DERIVED[name][1], data)
            r = results[name]
            print(f"{name}: balanced accuracy {100 * r['test_balanced_accuracy']:.2f} %, rare recall "
                  f"{100 * r['test_rare_recall']:.2f} %, {r['wall_minutes']} min", flush=True)  # fmt: skip
            write_json(RESULTS, {"runs": {n: results[n] for n in ORDER if n in results},
                                 "data": {"ratio": RATIO, "train_per_class": profile(), "test_per_class": 1000},
                                 "machine": machine(), "versions": package_versions()})  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
