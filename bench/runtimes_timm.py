"""Runtime throughput for standard ImageNet architectures: resnet18, efficientnet_b0, mobilenetv3_large_100.

Each architecture is saved as an imgclf run with random weights (speed does not depend on the weight
values; the ImageNet weights need a download this machine cannot do) and ImageNet preprocessing at
224 px, 1,000 classes; then ``imgclf bench`` measures every runtime at batch 1 and 32 (pixels in,
calibrated probabilities out). The int8 runtimes are left out: their exports need real weights and
data for calibration and the accuracy check. Writes bench/results/runtimes_timm.json; the README
table comes from it.

Usage: python bench/runtimes_timm.py [--archs resnet18 ...] [--runtimes torch openvino-bf16 ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
from demo_seeds import machine

from imgclf.artifact import Artifact, save_artifact
from imgclf.data.preprocess import Preprocess
from imgclf.deploy.bench import bench_run
from imgclf.deploy.runtime import available_runtimes
from imgclf.io import write_json

RESULTS = Path(__file__).parent / "results" / "runtimes_timm.json"
ARCHS = ("resnet18", "efficientnet_b0", "mobilenetv3_large_100")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--runtimes", nargs="+", default=[r for r in available_runtimes() if not r.endswith("int8")])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    out = {"machine": machine(), "command": "python bench/runtimes_timm.py", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs:
            model = timm.create_model(arch, pretrained=False, num_classes=1000).eval()
            art = Artifact(arch, [f"class_{i}" for i in range(1000)], Preprocess.from_model(model))
            run = save_artifact(Path(tmp) / arch, model, art)
            res = bench_run(run, a.runtimes, tuple(a.batch_sizes), warmup=3, repeats=a.repeats)
            out["models"][arch] = res
            for r in res["results"]:
                print(f"{arch:24s} {r['runtime']:16s} b{r['batch']:<3d} {r['img_per_s']:8.1f} img/s "
                      f"{r['latency_ms_median']:8.2f} ms  x{r['speedup']}")  # fmt: skip
            write_json(RESULTS, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
