"""A real multi-label benchmark: 2x2 mosaics of Fashion-MNIST items, the label set being the classes present.

Each 56 x 56 mosaic holds 1-4 items (the count uniform, the classes distinct and drawn uniformly, each item a
random image of its class, placed in a random cell; empty cells black, as Fashion-MNIST's background). Train
mosaics come from the official training split only, test mosaics from the official test split only, so no
item image is in both. The data set is written once to bench/data/fmnist_mosaic.npz (`train_images`,
`train_labels` (N, 10) 0/1, `test_*`, `class_names`), which `imgclf train --data` reads as multi-label data.

Each entry trains one run (`imgclf train --data fmnist_mosaic.npz <flags>`: 10 % of the training mosaics,
split by iterative stratification, validate and tune the thresholds; the test mosaics are the test set) and
reads its test metrics: mAP, micro/macro F1 and exact match under the tuned per-class thresholds and under the
alternatives (a fixed 0.5 threshold, the top-k labels with k the mean validation label count, rounded).
Results merge into bench/results/multilabel_fmnist.json; the script prints the README table.

Usage: python bench/multilabel_fmnist.py [--only bce asl] [--list] [--n-train 16000] [--n-test 4000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from fashion_mnist import ensure_full
from recipes_fmnist import train_run

from imgclf.artifact import package_versions
from imgclf.io import atomic_path, write_json

DATA = Path(__file__).parent / "data" / "fmnist_mosaic.npz"
RESULTS = Path(__file__).parent / "results" / "multilabel_fmnist.json"
RUNS_DIR = Path(__file__).parent / "runs"

#: name -> flags after `imgclf train --data fmnist_mosaic.npz`: the fine-tune recipe of the single-label table
#: (bench/recipes_fmnist.py) at 64 px (each 28 px item then spans ~32 px), with one loss per entry
BASE = (
    "--recipe finetune --epochs 6 --input-size 64 --data.crop_pct 1.0 --aug.hflip 0 --aug.scale '[0.9, 1.0]' "
    "--train.label_smoothing 0"
)
RUNS = {
    "bce": f"{BASE} --train.loss bce",
    "asl": f"{BASE} --train.loss asl",
}


def mosaics(images: np.ndarray, labels: np.ndarray, n: int, seed: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``n`` mosaics (n, 56, 56) uint8 and their (n, k) 0/1 label sets from 28 x 28 ``images`` with ``labels``."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    out = np.zeros((n, 56, 56), np.uint8)
    sets = np.zeros((n, k), np.uint8)
    for i in range(n):
        count = rng.integers(1, 5)  # 1..4 items
        classes = rng.choice(k, size=count, replace=False)
        cells = rng.permutation(4)[:count]
        for c, cell in zip(classes, cells):
            r, q = divmod(int(cell), 2)
            out[i, r * 28 : r * 28 + 28, q * 28 : q * 28 + 28] = images[rng.choice(by_class[c])]
            sets[i, c] = 1
    return out, sets


def ensure_mosaics(n_train: int, n_test: int) -> Path:
    """Write the mosaic .npz once (or again when the sizes change) and return its path."""
    if DATA.is_file():
        with np.load(DATA) as z:
            if len(z["train_labels"]) == n_train and len(z["test_labels"]) == n_test:
                return DATA
    with np.load(ensure_full()) as z:
        train_x, train_y, test_x, test_y = z["train_images"], z["train_labels"], z["test_images"], z["test_labels"]
        names = z["class_names"]
    tx, ty = mosaics(train_x, train_y, n_train, seed=0)
    vx, vy = mosaics(test_x, test_y, n_test, seed=1)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(DATA) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, train_images=tx, train_labels=ty, test_images=vx, test_labels=vy, class_names=names)
    return DATA


def run_one(name: str, flags: str, data: Path, out: Path) -> dict:
    doc, wall, cpu = train_run(name, flags, data, out)
    t = doc["metrics"]["test"]
    keys = ("micro_f1", "macro_f1", "samples_f1", "exact_match", "hamming_loss")
    rules = {f"tuned ({doc['decision']['objective']})": {k: t[k] for k in keys}, **t["alternatives"]}
    return {
        "command": "imgclf train --data bench/data/fmnist_mosaic.npz " + flags,
        "test_map": t["map"],
        "test_map_micro": t["map_micro"],
        "val_map": doc["metrics"]["val"]["map"],
        "rules": rules,
        "calibration": {k: doc["calibration"]["test"][k]["ece"] for k in ("before", "after")},
        "wall_minutes": round(wall / 60, 1),
        "cpu_minutes": round(cpu / 60, 1),
        "epochs_run": doc["metrics"]["epochs_run"],
        "best_epoch": doc["metrics"]["best_epoch"],
        "date": time.strftime("%Y-%m-%d"),
    }


def table(results: dict) -> str:
    lines = ["| loss | decision rule | mAP | micro-F1 | macro-F1 | exact match | Hamming loss | wall time |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        for i, (rule, m) in enumerate(r["rules"].items()):
            head = f"| {name.upper()} | " if i == 0 else "| | "
            wall = f"{r['wall_minutes']} min" if i == 0 else ""
            cells = [rule.replace("_", " "), *(f"{100 * v:.2f} %" for v in (r["test_map"], m["micro_f1"],
                     m["macro_f1"], m["exact_match"])), f"{m['hamming_loss']:.4f}", wall]  # fmt: skip
            lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(RUNS), help="run just these")
    ap.add_argument("--list", action="store_true", help="print the table of stored results and exit")
    ap.add_argument("--n-train", type=int, default=16000)
    ap.add_argument("--n-test", type=int, default=4000)
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else {}
    if not a.list:
        data = ensure_mosaics(a.n_train, a.n_test)
        for name in a.only or list(RUNS):
            results[name] = run_one(name, RUNS[name], data, RUNS_DIR)
            print(f"{name}: test mAP {100 * results[name]['test_map']:.2f} %, {results[name]['wall_minutes']} min",
                  flush=True)  # fmt: skip
            order = {n: results[n] for n in RUNS if n in results}
            write_json(RESULTS, {"runs": order, "data": {"n_train": a.n_train, "n_test": a.n_test},
                                 "machine": machine(), "versions": package_versions()})  # fmt: skip
    print(table({n: results[n] for n in RUNS if n in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
