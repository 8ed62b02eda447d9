"""Run the embedded default job (`imgclf train`) for several seeds; record test top-1 and wall time.

Usage: python bench/demo_seeds.py [--seeds 0 1 2] [--out bench/results/demo_seeds.json]

The result file holds the command, per-seed figures, their mean/min, the machine and package versions,
so the README's demo row can be traced to a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from imgclf.api import make_config, train
from imgclf.artifact import package_versions
from imgclf.config import config_to_dict
from imgclf.io import write_json


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "os": platform.platform()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_seeds.json")
    a = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            cfg = make_config(overrides={"train.seed": seed, "run.output": tmp, "run.progress": False})
            t0 = time.perf_counter()
            res = train(cfg)
            wall = time.perf_counter() - t0
            runs.append(
                {
                    "seed": seed,
                    "test_top1": res.test_metrics["top1"],
                    "val_top1": res.val_metrics["top1"],
                    "best_epoch": res.best_epoch,
                    "wall_seconds": round(wall, 1),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    tops = [r["test_top1"] for r in runs]
    walls = [r["wall_seconds"] for r in runs]
    doc = {
        "command": "imgclf train   # embedded default; seeds via --seed",
        "config": config_to_dict(make_config()),
        "runs": runs,
        "test_top1_mean": statistics.mean(tops),
        "test_top1_min": min(tops),
        "wall_seconds_mean": statistics.mean(walls),
        "wall_seconds_max": max(walls),
        "machine": machine(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(a.out, doc)
    print(
        f"test top-1 mean {100 * doc['test_top1_mean']:.2f} % (min {100 * min(tops):.2f} %), "
        f"wall {doc['wall_seconds_mean']:.0f} s mean, {max(walls):.0f} s max -> {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
