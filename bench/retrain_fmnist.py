"""Act on drift on Fashion-MNIST: ``imgclf retrain`` of the demo run on noisy images, with replay of its old data.

1. New data: ``--n`` (2,500) images of the official training split that the embedded subset (the demo run's training
   data) does not hold, a tenth per class, each under ``eval.shift``'s ``gaussian_noise`` at severity 1, 2 or 3 in
   turn (seeded by its index), written as PNG + ``labels.csv`` with the capture columns of ``imgclf serve
   --capture-dir`` (labels filled in, as a person would).
2. The demo run is copied as version 1 of a model repository ``bench/runs/retrain-repo/fmnist/1``.
3. ``imgclf retrain bench/runs/retrain-repo/fmnist/1 --new-data DIR`` (plus any flags after ``--``), timed: the
   decision's held-out sets are 20 % of the new data (shifted) and the demo run's test set (1,000 clean images).
4. Beyond the decision: champion and challenger on ``--eval-images`` (2,000) official test images (a stratified,
   seeded share; neither model trained on any), clean and under gaussian noise at severities 1-3 (``eval --shift``).

Writes bench/results/retrain_fmnist[-TAG].json and prints the figures.

Usage: python bench/retrain_fmnist.py [--run runs/demo] [--n 2500] [--tag T] [-- --epochs 3 --lr 3e-4 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from fashion_mnist import ensure_full
from PIL import Image

from imgclf.artifact import package_versions
from imgclf.eval.shift import corrupt, evaluate_shift
from imgclf.io import write_json

ROOT = Path(__file__).parents[1]
EMBEDDED = ROOT / "src/imgclf/data/embedded/fashion_mnist_subset.npz"
CAPTURE_COLUMNS = "path,label,predicted,confidence,unknown,ood_score,model,version,time,reason,source"


def new_data(out: Path, n: int, seed: int = 0) -> Path:
    """``out``: ``n`` noisy training-split images outside the embedded subset, as a labelled capture folder."""
    full = np.load(ensure_full())
    x, y, names = full["train_images"], full["train_labels"], [str(c) for c in full["class_names"]]
    used = set(np.load(EMBEDDED)["train_source_index"].tolist())
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation([i for i in np.flatnonzero(y == c) if i not in used])[: n // 10]
                           for c in range(10)])  # fmt: skip
    (out / "images").mkdir(parents=True)
    lines = [CAPTURE_COLUMNS]
    for k, i in enumerate(rng.permutation(pick)):
        sev = 1 + k % 3
        img = corrupt(Image.fromarray(x[i]).convert("RGB"), "gaussian_noise", sev, seed, int(i))
        img.save(out / "images" / f"{k:05d}.png")
        lines.append(f'images/{k:05d}.png,"{names[y[i]]}",,,,,fmnist,1,,noise-{sev},bench')
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


def shifted(run: Path, n: int) -> dict:
    """Top-1 clean and under gaussian noise 1-3 on ``n`` official test images."""
    doc = evaluate_shift(run, str(ensure_full()), split="test", corruptions="gaussian_noise", severities=(1, 2, 3),
                         max_images=n, progress=False)  # fmt: skip
    return {"clean": doc["clean"]["top1"], **{f"noise_{r['severity']}": r["top1"] for r in doc["rows"]},
            "noise_mean": doc["mca"], "n": doc["n"]}  # fmt: skip


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    work = Path(__file__).parent / "runs" / f"retrain{'-' + a.tag if a.tag else ''}"
    shutil.rmtree(work, ignore_errors=True)
    capture = new_data(work / "capture", a.n)
    repo = work / "repo" / "fmnist"
    shutil.copytree(a.run, repo / "1", ignore=shutil.ignore_patterns("checkpoints", "export", "tensorboard"))
    cmd = ["retrain", str(repo / "1"), "--new-data", str(capture), "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgclf", *cmd], capture_output=True, text=True)
    minutes = round((time.perf_counter() - t0) / 60, 2)
    print(proc.stdout)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"retrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run = repo / "2" if proc.returncode == 0 else next(repo.glob(".rejected-*"))
    doc = json.loads((run / "retrain.json").read_text())
    res = {"command": "imgclf " + " ".join(cmd).replace(str(ROOT) + "/", ""), "exit_code": proc.returncode,
           "wall_minutes": minutes, "retrain": doc,
           "independent": {"champion": shifted(repo / "1", a.eval_images), "challenger": shifted(run, a.eval_images)},
           "machine": machine(), "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    out = Path(__file__).parent / "results" / f"retrain_fmnist{'-' + a.tag if a.tag else ''}.json"
    write_json(out, res)
    print(json.dumps({k: res["independent"][k] for k in ("champion", "challenger")}, indent=1))
    print(f"{minutes} min; wrote {out}")


if __name__ == "__main__":
    main()
