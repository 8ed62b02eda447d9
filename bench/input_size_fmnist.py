"""Accuracy and cost of the input size on 28 px data: the evidence behind ``data.input_size auto``.

Fine-tunes the packaged ImageNet EfficientNet-Lite0 on ``--train-images`` of the official Fashion-MNIST training
split (28 px grey, a stratified 10 % held out for validation) with the ``default`` recipe at each input size and
epoch count of ``--runs`` (crop_pct 1.0, seed 0), and evaluates on the official 10,000-image test split
(``bench/data/fashion_mnist_full.npz``; standard error ~0.3 points): at equal epochs, and at about equal compute
(32 px for 4x the epochs of 64 px). ``--weights none`` trains from random init instead. Per run it records test
top-1, training images/s and wall time; ``--threads`` pins torch's threads (1 keeps a shared machine's load from
swamping the figures).

Usage: python bench/input_size_fmnist.py [--runs 32:3 64:3 96:3 32:12] [--weights packaged none]
    [--train-images 2500] [--threads 1] [--out bench/results/input_size_fmnist.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgclf.api import make_config, train
from imgclf.artifact import package_versions
from imgclf.io import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_seeds import machine  # noqa: E402
from fashion_mnist import ensure_full  # noqa: E402


def subset(full: Path, n: int, out: Path) -> Path:
    """The first ``n`` images of the official training split (stratified: n / 10 per class) with the official
    test split, as one .npz."""
    z = np.load(full)
    y = z["train_labels"]
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[: n // 10] for c in range(10)]))
    np.savez(out, train_images=z["train_images"][idx], train_labels=y[idx], test_images=z["test_images"],
             test_labels=z["test_labels"], class_names=z["class_names"])  # fmt: skip
    return out


def one(size: int, weights: str, epochs: int, seed: int, data: Path, out: str) -> dict:
    overrides = {"data.path": str(data), "data.input_size": size, "data.crop_pct": 1.0, "data.fast_path": "auto",
                 "train.epochs": epochs,
                 "train.seed": seed, "model.weights": weights, "run.output": out, "run.progress": False,
                 "trust.report": False, "trust.ood": False, "trust.calibrate": False}  # fmt: skip
    if weights == "none":  # random init trains every layer at one rate
        overrides["transfer.strategy"] = "scratch"
    t0 = time.perf_counter()
    res = train(make_config(recipe="default", overrides=overrides))  # the default recipe: Lite0, gentle crops
    rates = [round(r["img_per_s"], 1) for r in res.history]
    return {"size": size, "epochs": epochs, "weights": weights, "test_top1": res.test_metrics["top1"],
            "val_top1": res.val_metrics["top1"], "train_img_per_s": rates,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "load": Path("/proc/loadavg").read_text().split()[:3]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=["32:3", "64:3", "96:3", "32:12"],
                    help="SIZE:EPOCHS per run (32:12 costs about what 64:3 does)")  # fmt: skip
    ap.add_argument("--weights", nargs="+", default=["packaged"])
    ap.add_argument("--train-images", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "input_size_fmnist.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(ensure_full(), a.train_images, Path(tmp) / "fmnist.npz")
        for weights in a.weights:
            for size, epochs in (map(int, r.split(":")) for r in a.runs):
                rows.append(one(size, weights, epochs, a.seed, data, tmp))
                print(json.dumps(rows[-1]), flush=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"command": "python bench/input_size_fmnist.py " + " ".join(sys.argv[1:]), "rows": rows,
           "threads": torch.get_num_threads(), "machine": machine(), "versions": package_versions(),
           "date": time.strftime("%Y-%m-%d"), "git": git}  # fmt: skip
    write_json(a.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
