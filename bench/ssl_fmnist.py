"""Self-supervised pretraining on the full Fashion-MNIST training images (labels unused) against random init and the
ImageNet EfficientNet-Lite0 probe: linear-probe and 5-shot k-NN accuracy on the official 10k test set.

1. ``imgclf pretrain bench/data/fashion_mnist_full.npz --method simclr --model resnet18 ...`` (in a subprocess;
   its time and peak memory are the run's own record; skipped when the run exists, ``--resume`` continues it).
2. Per arm (SSL backbone, the same architecture at random init, Lite0 with its packaged ImageNet weights):
   - the linear probe: ``imgclf train --data FMNIST --recipe probe --model M --weights W ...`` (frozen backbone,
     L-BFGS logistic regression, L2 chosen on a 10 % validation split of the training images), test top-1;
   - 5-shot k-NN: 5 labelled training images per class (seeds 0-4) as the support of a k-NN index (``imgclf knn``'s
     rule: k 10, cosine, temperature 0.07; also the nearest class mean), every test image classified; mean and std.
Results: bench/results/ssl_fmnist.json; the README table is printed.

Usage: python bench/ssl_fmnist.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from demo_seeds import machine
from fashion_mnist import ensure_full
from recipes_fmnist import train_run

from imgclf.artifact import package_versions
from imgclf.fewshot import classify_embeddings, embed
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "ssl_fmnist.json"
RUNS_DIR = Path(__file__).parent / "runs"
SSL_NAME = "ssl-simclr-resnet18"
SSL_FLAGS = ("--method simclr --model resnet18 --input-size 28 --data.crop_pct 1.0 --train.amp none "
             "--knn-data bench/data/fashion_mnist_full.npz")  # fmt: skip
SMALL = "--input-size 28 --data.crop_pct 1.0"  # the SSL arms at the native 28 px
ARMS = {  # name -> (model, weights, preprocessing flags)
    "ssl": ("resnet18", str(RUNS_DIR / SSL_NAME), SMALL),
    "random": ("resnet18", "none", SMALL),
    "lite0-imagenet": ("tf_efficientnet_lite0", "packaged", "--input-size 80 --data.crop_pct 1.0"),  # the recipe
}
SEEDS = range(5)


def pretrain(data: Path, epochs: int) -> dict:
    run = RUNS_DIR / SSL_NAME
    if not (run / "imgclf.json").is_file():
        resume = (
            ["--resume", "--name", SSL_NAME, "--output", str(RUNS_DIR)]
            if run.exists()
            else [
                str(data),
                *shlex.split(SSL_FLAGS),
                "--epochs",
                str(epochs),
                "--output",
                str(RUNS_DIR),
                "--name",
                SSL_NAME,
            ]
        )
        proc = subprocess.run([sys.executable, "-m", "imgclf", "pretrain", *resume, "--no-progress"])
        if proc.returncode != 0:
            raise SystemExit("pretraining failed")
    return json.loads((run / "imgclf.json").read_text())


def probe(arm: str, data: Path) -> dict:
    model, weights, flags = ARMS[arm]
    doc, wall, cpu = train_run(f"ssl-probe-{arm}", f"--recipe probe --model {model} --weights {weights} {flags}", data,
                               RUNS_DIR)  # fmt: skip
    return {"test_top1": doc["metrics"]["test"]["top1"], "val_top1": doc["metrics"]["val"]["top1"],
            "wall_minutes": round(wall / 60, 1), "cpu_minutes": round(cpu / 60, 1),
            "command": f"imgclf train --data bench/data/fashion_mnist_full.npz --recipe probe --model {model} "
                       f"--weights {weights} {flags}"}  # fmt: skip


def few_shot(arm: str, data: Path, shots: int = 5) -> dict:
    model, weights, flags = ARMS[arm]
    size = int(shlex.split(flags)[1])
    kw = {"model": model, "weights": weights, "input_size": size, "crop_pct": 1.0, "workers": 0, "progress": False}
    test = embed(str(data), split="test", **kw)
    out: dict[str, list[float]] = {"knn": [], "prototype": []}
    for seed in SEEDS:
        sup = embed(str(data), split="train", per_class=shots, seed=seed, **kw)
        for mode in out:
            pred = classify_embeddings(test.features, sup.features, sup.labels, 10, mode=mode).argmax(1)
            out[mode].append(float((pred == test.labels).float().mean()))
    return {f"{shots}shot_{m}": {"mean": statistics.mean(v), "std": statistics.stdev(v), "per_seed": v}
            for m, v in out.items()}  # fmt: skip


def table(res: dict) -> str:
    rows = ["| backbone | weights | linear probe (test top-1) | 5-shot k-NN (mean ± std, 5 seeds) | 5-shot nearest"
            " class mean |", "|---|---|---|---|---|"]  # fmt: skip
    names = {"ssl": "SimCLR on the 60k training images (labels unused)", "random": "random init",
             "lite0-imagenet": "ImageNet (packaged), 80 px"}  # fmt: skip
    for arm, r in res["arms"].items():
        k, p = r["5shot_knn"], r["5shot_prototype"]
        rows.append(
            f"| {ARMS[arm][0]} | {names[arm]} | {100 * r['probe']['test_top1']:.2f} % | "
            f"{100 * k['mean']:.2f} ± {100 * k['std']:.2f} % | {100 * p['mean']:.2f} ± {100 * p['std']:.2f} % |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = ensure_full()
    ssl = pretrain(data, args.epochs)
    m = ssl["metrics"]
    pre = {"command": f"imgclf pretrain bench/data/fashion_mnist_full.npz {SSL_FLAGS} --epochs {len(m['history'])}",
           "minutes": round(m["pretrain_seconds"] / 60, 1), "peak_rss_mb": m["peak_rss_mb"],
           "peak_worker_rss_mb": m.get("peak_worker_rss_mb"), "history": m["history"]}  # fmt: skip
    res = {"pretrain": pre, "arms": {}, "machine": machine(), "versions": package_versions(),
           "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    for arm in ARMS:
        res["arms"][arm] = {"probe": probe(arm, data), **few_shot(arm, data)}
        print(arm, json.dumps(res["arms"][arm]["probe"]), flush=True)
    gain = res["arms"]["ssl"]["probe"]["test_top1"] - res["arms"]["random"]["probe"]["test_top1"]
    res["ssl_probe_gain_over_random_points"] = round(100 * gain, 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, res)
    print(table(res))
    print(f"SSL probe - random-init probe: {100 * gain:+.2f} points (target >= +10)")


if __name__ == "__main__":
    main()
