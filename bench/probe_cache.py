"""Cached-feature probe vs the same probe recomputing the backbone every epoch (20 epochs).

Three runs of `imgclf train --recipe probe --probe.solver sgd` on the embedded Fashion-MNIST subset
(4,500 train / 500 val / 1,000 test, packaged EfficientNet-Lite0 at 80 px): cached with an empty cache
(cold: the backbone runs once), cached again with a different learning rate (warm: no backbone pass at
all for training), and uncached (`--probe.cache false`: the backbone runs on every batch of every epoch).
Training time is `fit` wall time (data, model, features and head training; the final val/test
measurement is the same for all and left out). Writes bench/results/probe_cache.json.

Usage: python bench/probe_cache.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from demo_seeds import machine

from imgclf.api import make_config, train
from imgclf.artifact import package_versions
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "probe_cache.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    a = ap.parse_args()
    base = {"model.name": "tf_efficientnet_lite0", "model.weights": "packaged", "data.input_size": 80,
            "data.crop_pct": 1.0, "probe.solver": "sgd", "train.epochs": a.epochs, "train.ema": False,
            "optim.lr": 0.003, "sched.warmup_epochs": 1, "run.progress": False}  # fmt: skip
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = {**base, "run.output": tmp, "probe.cache_dir": str(Path(tmp) / "cache")}
        plan = [
            ("cached_cold", {}),
            ("cached_warm", {"optim.lr": 0.002}),  # another head setting: features come from the cache
            ("uncached", {"probe.cache": False}),
        ]
        for name, extra in plan:
            t0 = time.perf_counter()
            res = train(make_config(recipe="probe", overrides={**common, **extra, "run.name": name}))
            runs[name] = {
                "fit_seconds": round(res.seconds, 1),
                "total_seconds": round(time.perf_counter() - t0, 1),
                "val_top1": res.val_metrics["top1"],
                "test_top1": res.test_metrics["top1"],
                "overrides": extra,
            }
            print(name, runs[name], flush=True)
    u = runs["uncached"]
    doc = {
        "command": "imgclf train --recipe probe --probe.solver sgd --epochs 20 --input-size 80 --data.crop_pct 1.0 "
        "--train.ema false --lr 0.003 [--probe.cache false]",
        "runs": runs,
        "speedup_cold": round(u["fit_seconds"] / runs["cached_cold"]["fit_seconds"], 1),
        "speedup_warm": round(u["fit_seconds"] / runs["cached_warm"]["fit_seconds"], 1),
        "test_top1_difference_points": round(100 * (runs["cached_cold"]["test_top1"] - u["test_top1"]), 2),
        "machine": machine(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(RESULTS, doc)
    cached = runs["cached_cold"]["test_top1"]
    print(f"uncached / cached fit time: {doc['speedup_cold']}x (cold cache), {doc['speedup_warm']}x (warm cache); "
          f"test top-1 cached {100 * cached:.2f} % vs uncached {100 * u['test_top1']:.2f} %")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
