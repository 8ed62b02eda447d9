"""Does `imgclf audit` find planted problems? Precision and recall per kind of finding on the embedded data.

Writes the embedded Fashion-MNIST subset (5,000 train / 1,000 test, 28 x 28 grey) as PNG files + CSVs into
bench/data/audit_injected/ with planted problems, each remembered as ground truth:

- 50 exact copies of training images (half byte copies, half lossless BMP re-saves: same decoded pixels);
- 30 near-duplicates (JPEG q=90 re-encodes, resized to 32 px or cropped by 1 px and resized back);
- 5 % flipped labels (a random other class; never on an image that has a planted copy);
- 3 corrupt files (zero bytes, a truncated PNG, text named .png);
- 40 train/test leaks (training images copied into the test split, same label).

Then runs the audit (`imgclf audit train.csv --test-data test.csv --input-size 80 --data.crop_pct 1`, packaged
Lite0) and scores it: precision and recall of exact duplicate pairs, near-duplicate pairs, leak pairs, corrupt files
and flagged labels, and precision@k of the ranked label issues (k = number flipped). A pair found between two
original images counts against precision (the embedded data may hold real near-duplicates). Results:
bench/results/audit_injected.json.

Usage: python bench/audit_injected.py [--quick]   (--quick: 400 train / 100 test images, fewer plants)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from demo_seeds import machine
from PIL import Image

from imgclf.api import audit
from imgclf.artifact import package_versions
from imgclf.data.sources import open_source
from imgclf.io import write_json

ROOT = Path(__file__).parent
DATA = ROOT / "data" / "audit_injected"
RESULTS = ROOT / "results" / "audit_injected.json"
FLAGS = {"input_size": 80, "crop_pct": 1.0, "weights": "packaged", "progress": False}
FULL = {"n_train": 5000, "n_test": 1000, "copies": 50, "near": 30, "flip": 0.05, "corrupt": 3, "leaks": 40}
QUICK = {"n_train": 400, "n_test": 100, "copies": 6, "near": 5, "flip": 0.05, "corrupt": 3, "leaks": 5}


def flip_labels(labels: np.ndarray, frac: float, k: int, rng: np.random.Generator, avoid=()) -> np.ndarray:
    """Indices of ``frac`` of ``labels`` (not in ``avoid``) whose labels are changed in place to another class."""
    pool = np.setdiff1d(np.arange(len(labels)), np.asarray(list(avoid), dtype=np.int64))
    idx = np.sort(rng.choice(pool, size=int(round(frac * len(labels))), replace=False))
    labels[idx] = (labels[idx] + rng.integers(1, k, size=len(idx))) % k
    return idx


def _near(img: Image.Image, j: int) -> Image.Image:
    """A near-duplicate: resized to 32 px, or cropped by 1 px and resized back (then saved as JPEG q=90)."""
    if j % 2 == 0:
        return img.resize((32, 32), Image.BICUBIC)
    w, h = img.size
    return img.crop((1, 1, w - 1, h - 1)).resize((w, h), Image.BICUBIC)


def build(sizes: dict, seed: int = 0) -> dict:
    """Write the injected data set; return the ground truth (paths as written in the CSVs, resolved)."""
    rng = np.random.default_rng(seed)
    train, test = open_source("builtin:fashion-mnist"), open_source("builtin:fashion-mnist:test")
    tr_idx = np.sort(rng.choice(len(train), sizes["n_train"], replace=False))
    te_idx = np.sort(rng.choice(len(test), sizes["n_test"], replace=False))
    shutil.rmtree(DATA, ignore_errors=True)
    (DATA / "train").mkdir(parents=True)
    (DATA / "test").mkdir(parents=True)
    names = train.class_names
    rows = {"train": [], "test": []}
    paths, labels = [], train.labels[tr_idx].copy()
    for n, i in enumerate(tr_idx):
        p = DATA / "train" / f"{n:05d}.png"
        train.load(int(i)).convert("L").save(p)
        paths.append(p)
    src = rng.choice(len(paths), sizes["copies"] + sizes["near"] + sizes["leaks"], replace=False)
    copies, near, leaks = np.split(src, [sizes["copies"], sizes["copies"] + sizes["near"]])
    flipped = flip_labels(labels, sizes["flip"], len(names), rng, avoid=src)
    truth = {"exact": [], "near": [], "leaks": [], "corrupt": [], "flipped": [str(paths[i].resolve()) for i in flipped]}
    rows["train"] = [(p, names[y]) for p, y in zip(paths, labels)]
    for j, i in enumerate(copies):
        p = DATA / "train" / f"copy_{j:03d}.{'png' if j % 2 == 0 else 'bmp'}"
        shutil.copy(paths[i], p) if j % 2 == 0 else Image.open(paths[i]).save(p)
        rows["train"].append((p, names[labels[i]]))
        truth["exact"].append(sorted([str(paths[i].resolve()), str(p.resolve())]))
    for j, i in enumerate(near):
        p = DATA / "train" / f"near_{j:03d}.jpg"
        _near(Image.open(paths[i]), j).save(p, quality=90)
        rows["train"].append((p, names[labels[i]]))
        truth["near"].append(sorted([str(paths[i].resolve()), str(p.resolve())]))
    for j, body in enumerate((b"", paths[0].read_bytes()[:50], b"not an image\n")):
        p = DATA / "train" / f"corrupt_{j}.png"
        p.write_bytes(body)
        rows["train"].append((p, names[0]))
        truth["corrupt"].append(str(p.resolve()))
    for n, i in enumerate(te_idx):
        p = DATA / "test" / f"{n:05d}.png"
        test.load(int(i)).convert("L").save(p)
        rows["test"].append((p, names[test.labels[i]]))
    for j, i in enumerate(leaks):
        p = DATA / "test" / f"leak_{j:03d}.png"
        shutil.copy(paths[i], p)
        rows["test"].append((p, names[labels[i]]))
        truth["leaks"].append(sorted([str(paths[i].resolve()), str(p.resolve())]))
    for split, body in rows.items():
        lines = ["path,label", *(f"{p.relative_to(DATA)},{y}" for p, y in body)]
        (DATA / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return truth


def _pr(found: set, truth: set) -> dict:
    hit = len(found & truth)
    return {"precision": round(hit / len(found), 4) if found else None, "recall": round(hit / len(truth), 4)
            if truth else None, "found": len(found), "planted": len(truth), "hits": hit}  # fmt: skip


def score(doc: dict, truth: dict) -> dict:
    """Precision / recall per finding kind, precision@k of the label issues."""

    def pairs(kinds: tuple[str, ...], match: str | None, leak: bool = False) -> set:
        return {tuple(sorted([str(Path(p["a"]["path"]).resolve()), str(Path(p["b"]["path"]).resolve())]))
                for k in kinds for p in doc[k] if match is None or p["match"] == match}  # fmt: skip

    issues = [str(Path(x["path"]).resolve()) for x in doc["label_issues"]]
    k = len(truth["flipped"])
    flipped = set(truth["flipped"])
    return {
        "exact_duplicates": _pr(pairs(("duplicates", "conflicts"), "exact"), {tuple(p) for p in truth["exact"]}),
        "near_duplicates": _pr(pairs(("duplicates", "conflicts"), "near"), {tuple(p) for p in truth["near"]}),
        "leaks": _pr(pairs(("leaks",), None), {tuple(p) for p in truth["leaks"]}),
        "corrupt": _pr(
            {str(Path(f["path"]).resolve()) for f in doc["files"] if f["kind"] == "unreadable"}, set(truth["corrupt"])
        ),  # fmt: skip
        "label_issues": {
            **_pr(set(issues), flipped),
            "precision_at_k": round(len(set(issues[:k]) & flipped) / k, 4) if k else None,
            "k": k,
        },  # fmt: skip
    }


def table(r: dict) -> str:
    lines = ["| finding | planted | found | precision | recall |", "|---|---|---|---|---|"]
    for kind, s in r["scores"].items():
        pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        lines.append(f"| {kind.replace('_', ' ')} | {s['planted']} | {s['found']} | {pct(s['precision'])} | "
                     f"{pct(s['recall'])} |")  # fmt: skip
    s = r["scores"]["label_issues"]
    lines.append(f"\nprecision@{s['k']} of the ranked label issues: {100 * s['precision_at_k']:.1f} %")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a check that the script runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    sizes = QUICK if a.quick else FULL
    truth = build(sizes)
    t0 = time.perf_counter()
    doc = audit(DATA / "train.csv", test_data=str(DATA / "test.csv"), cache_dir=str(DATA / "cache"), **FLAGS)
    secs = time.perf_counter() - t0
    result = {
        "command": "imgclf audit bench/data/audit_injected/train.csv --test-data bench/data/audit_injected/test.csv "
        "--input-size 80 --crop-pct 1 --weights packaged",
        "quick": a.quick,
        "sizes": sizes,
        "scores": score(doc, truth),
        "summary": doc["summary"],
        "probe": doc["probe"],
        "settings": doc["settings"],
        "seconds": round(secs, 1),
        "machine": machine(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(a.out if not a.quick else a.out.with_name("audit_injected_quick.json"), result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
