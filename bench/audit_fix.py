"""Does `imgclf audit --fix` help training on noisy labels? A noisy copy of the embedded data (10 % of the
training labels flipped to a random other class) is trained on as is and after `--fix` (suspected label errors
dropped, or relabelled to the suggestion), 3 seeds each, evaluated on the clean embedded test split.

Recipe: `--recipe probe --input-size 80 --data.crop_pct 1.0` (frozen packaged Lite0, cached features, L-BFGS
logistic regression): each run takes seconds once the features are cached, so the 9 runs stay far under 25 min
on 2 cores. The seed changes the validation split (10 %, stratified) the L2 strength is chosen on.
Results (mean ± std of test top-1 per variant, the fix's drop counts and how many flipped images it removed or
corrected): bench/results/audit_fix.json.

Usage: python bench/audit_fix.py [--quick]   (--quick: 600 training images, one seed)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from audit_injected import flip_labels
from demo_seeds import machine
from recipes_fmnist import train_run

from imgclf.api import audit
from imgclf.artifact import package_versions
from imgclf.data.sources import open_source
from imgclf.io import atomic_path, write_json

ROOT = Path(__file__).parent
DATA = ROOT / "data" / "audit_fix"
RESULTS = ROOT / "results" / "audit_fix.json"
RECIPE = "--recipe probe --input-size 80 --data.crop_pct 1.0 --weights packaged --test-data builtin:fashion-mnist:test"
AUDIT = {"input_size": 80, "crop_pct": 1.0, "weights": "packaged", "progress": False}


def noisy_copy(n: int | None, frac: float = 0.10, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """The embedded training images with ``frac`` of the labels flipped, as an .npz; (path, flipped, clean)."""
    s = open_source("builtin:fashion-mnist")
    rng = np.random.default_rng(seed)
    idx = np.arange(len(s)) if n is None else np.sort(rng.choice(len(s), n, replace=False))
    clean = s.labels[idx].copy()
    labels = clean.copy()
    flipped = flip_labels(labels, frac, len(s.class_names), rng)
    path = DATA / "noisy.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=s.arrays[idx], labels=labels, class_names=np.array(s.class_names))
    return path, flipped, clean


def fixed(noisy: Path, how: str, flipped: np.ndarray, clean: np.ndarray) -> tuple[Path, dict]:
    """`imgclf audit NOISY --fix OUT --fix-labels HOW`; the fix's counts and its effect on the flipped labels."""
    out = DATA / f"fixed_{how}.npz"
    doc = audit(noisy, fix=out, fix_labels=how, cache_dir=str(DATA / "cache"), **AUDIT)
    with np.load(out) as z:
        kept, labels = z["kept_indices"], z["labels"]
    still_wrong = int((labels != clean[kept]).sum())
    return out, {**doc["fix"], "flipped": int(len(flipped)), "wrong_labels_left": still_wrong,
                 "label_issues_found": len(doc["label_issues"])}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 images, one seed (a check that the script runs)")
    ap.add_argument("--recipe", default=RECIPE, help="training flags (default: the cached-feature probe)")
    ap.add_argument("--fixes", nargs="+", default=["drop", "relabel"], choices=["drop", "relabel"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    seeds = [0] if a.quick else [0, 1, 2]
    noisy, flipped, clean = noisy_copy(600 if a.quick else None)
    variants, fixes = {"noisy": noisy}, {}
    for how in a.fixes:
        variants[f"fix ({how})"], fixes[how] = fixed(noisy, how, flipped, clean)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in variants.items():
            tops = []
            for seed in seeds:
                run = f"{name.replace(' ', '_')}_{seed}"
                doc, wall, _ = train_run(run, f"{a.recipe} --seed {seed}", data, Path(tmp))
                tops.append(doc["metrics"]["test"]["top1"])
            results[name] = {"test_top1": tops, "mean": statistics.mean(tops),
                             "std": statistics.stdev(tops) if len(tops) > 1 else 0.0}  # fmt: skip
            print(f"{name}: test top-1 {100 * results[name]['mean']:.2f} ± {100 * results[name]['std']:.2f} %")
    write_json(a.out if not a.quick else a.out.with_name(a.out.stem + "_quick.json"), {
        "command": f"imgclf train --data <noisy or fixed .npz> {a.recipe} --seed S", "quick": a.quick, "seeds": seeds,
        "results": results, "fixes": fixes, "machine": machine(), "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d")})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
