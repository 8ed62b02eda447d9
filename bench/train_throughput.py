"""Training images/s of `imgclf train` against a standard PyTorch pipeline and timm's train.py, interleaved.

Contenders, on the same model (tf_efficientnet_lite0, random init), data, batch size, augmentation
(RandomResizedCrop scale 0.08-1, ratio 3/4-4/3, bicubic, horizontal flip 0.5; no colour jitter) and precision
(``--precision``, fp32 by default), each in its own process:

- ``imgclf``: the `imgclf train` command with its defaults (whatever data path, workers, memory format and
  precision policy it picks: the fast data path for these small images, channels_last, ...), measured by its own
  per-epoch images/s of epoch 2 (epoch 1 warms up; decoding before epoch 1 is reported apart, ``decode_seconds``);
- ``imgclf-pil`` (``--contenders``): the same with ``--data.fast_path off``;
- ``standard``: a torchvision ``ImageFolder`` with per-sample PIL transforms, a 2-worker ``DataLoader`` and a plain
  AdamW loop (fp32, contiguous memory format), timed over ``--steps`` updates after ``--warmup`` updates;
- ``timm``: ``train.py`` of a timm checkout (``--timm PATH``, run with the checkout's own timm package, CPU, no
  prefetcher, 2 workers, ``--color-jitter 0``), timed over the same updates from its per-update log lines.

Cases: Fashion-MNIST (bench/data/fashion_mnist_full.npz) as 28 px PNGs trained at 32 px (the size
``data.input_size auto`` picks), the same upscaled to 64 px PNGs trained at 64 px, and 224 px JPEGs cut from the
scikit-image photos (5 classes, one per photo) trained at 224 px. Each contender trains on (warmup + steps) x
batch images; the contenders run in turn, ``--rounds`` times, and each figure is the median of its rounds. The
machine's load average (``/proc/loadavg``) is recorded before every run: the figures are only as good as the
machine was quiet.

Usage:
    python bench/train_throughput.py [--timm /tmp/timm-src] [--cases 28px 64px 224px] [--rounds 3]
        [--precision fp32|bf16] [--contenders imgclf standard timm] [--threads N]
        [--out bench/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: case -> (input size, batch size, warm-up updates, timed updates)
CASES = {"28px": (32, 64, 5, 30), "64px": (64, 64, 5, 20), "224px": (224, 32, 3, 8)}
MODEL = "tf_efficientnet_lite0"


def load() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# ------------------------------------------------------------------------------------------ data


def make_data(case: str, root: Path, n_train: int) -> tuple[Path, Path, int]:
    """``root/train/<class>/*.png|jpg`` (``n_train`` images) and a small ``root/val``; returns them and the classes."""
    from PIL import Image

    if case == "224px":
        pictures, classes = _photo_crops(n_train + 20), 5
    else:
        z = np.load(HERE / "data" / "fashion_mnist_full.npz")
        side = 28 if case == "28px" else 64
        imgs, labels = z["train_images"][: n_train + 20], z["train_labels"][: n_train + 20]
        pictures = [(Image.fromarray(a).resize((side, side), Image.BICUBIC), int(y)) for a, y in zip(imgs, labels)]
        classes = 10
    for i, (img, y) in enumerate(pictures):
        d = root / ("train" if i < n_train else "val") / f"c{y}"
        d.mkdir(parents=True, exist_ok=True)
        if case == "224px":
            img.save(d / f"{i:05d}.jpg", quality=90)
        else:
            img.save(d / f"{i:05d}.png")
    for y in range(classes):  # every class needs a val image (imgclf and timm read val/)
        (root / "val" / f"c{y}").mkdir(parents=True, exist_ok=True)
        if not any((root / "val" / f"c{y}").iterdir()):
            pictures[y][0].save(root / "val" / f"c{y}" / ("x.jpg" if case == "224px" else "x.png"))
    return root / "train", root / "val", classes


def _photo_crops(n: int) -> list:
    """``n`` random crops (10-100 % of the area) of the scikit-image photos, resized to 224 px; label = photo."""
    import skimage.data
    from PIL import Image

    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket(),
              skimage.data.stereo_motorcycle()[0]]  # fmt: skip
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y = i % len(photos)
        p = photos[y]
        h, w = p.shape[:2]
        s = int(min(h, w) * np.sqrt(rng.uniform(0.1, 1.0)))
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = Image.fromarray(p[top : top + s, left : left + s]).resize((224, 224), Image.BICUBIC)
        out.append((crop, y))
    return out


# ------------------------------------------------------------------------------------------ contenders


def run_imgclf(train: Path, val: Path, size: int, bs: int, a: argparse.Namespace, tmp: Path, extra=()) -> dict:
    """`imgclf train` for 2 epochs; epoch 2's images/s from its metrics.jsonl (epoch 1 warms up)."""
    amp = {"fp32": "none", "bf16": "bf16"}[a.precision]
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", train, "--val-data", val, "--model", MODEL,
           "--weights", "none", "--batch-size", bs, "--epochs", 2, "--train.amp", amp, "--device", a.device,
           "--output", tmp, "--name", "run", "--no-progress", "--trust.report", "false", "--trust.ood", "false",
           "--trust.calibrate", "false", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}  # this checkout's imgclf
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"imgclf failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    got = json.loads((tmp / "run" / "imgclf.json").read_text())["preprocessing"]["input_size"]
    if got[1:] != [size, size]:
        raise SystemExit(f"imgclf trained at {got}, not {size} px: the comparison would not be like for like")
    decoded = re.search(r"decoded \d+ images in ([\d.]+)s", r.stderr)
    path = re.search(r"data path: [^\n]*", r.stderr)
    return {"img_per_s": rows[1]["img_per_s"], "decode_seconds": float(decoded[1]) if decoded else None,
            "data_path": path[0] if path else None}  # fmt: skip


def run_standard(train: Path, size: int, bs: int, warmup: int, steps: int, a: argparse.Namespace) -> dict:
    """The standard pipeline in its own process (``--standard``)."""
    cmd = [sys.executable, __file__, "--standard", train, "--size", size, "--batch", bs, "--warmup", warmup,
           "--steps", steps, "--precision", a.precision, "--device", a.device]  # fmt: skip
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"standard pipeline failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def standard_pipeline(train: Path, size: int, bs: int, warmup: int, steps: int, precision: str, device: str) -> float:
    """torchvision ImageFolder + per-sample PIL transforms, a 2-worker DataLoader, plain AdamW; images/s of
    ``steps`` updates after ``warmup`` ones."""
    import timm
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                        interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])  # fmt: skip
    ds = datasets.ImageFolder(str(train), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=2, drop_last=True)
    model = timm.create_model(MODEL, num_classes=len(ds.classes)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    dtype = torch.bfloat16 if precision == "bf16" else None
    t0 = None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        x, y = x.to(device), y.to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - t0)


def run_timm(root: Path, size: int, bs: int, classes: int, warmup: int, steps: int, a: argparse.Namespace,
             tmp: Path) -> dict:  # fmt: skip
    """timm's train.py (the checkout's own timm package); the summed per-update times of updates warmup ..
    warmup + steps - 1 from its log lines (``--log-interval 1``)."""
    cmd = [sys.executable, "train.py", "--data-dir", root, "--train-split", "train", "--val-split", "val",
           "--model", MODEL, "--num-classes", classes, "--img-size", size, "-b", bs, "--epochs", 1, "--opt", "adamw",
           "--lr", "1e-3", "--weight-decay", "0.05", "--workers", 2, "--color-jitter", 0, "--device", a.device,
           "--no-prefetcher", "--log-interval", 1, "--warmup-epochs", 0, "--output", tmp, "--checkpoint-hist", 1,
           *(["--amp", "--amp-dtype", "bfloat16"] if a.precision == "bf16" else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(a.timm)}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=a.timm, env=env)
    lines = re.findall(r"Train: 0 \[\s*(\d+)/\d+.*?Time: ([\d.]+)s", r.stdout + r.stderr)
    times = {int(i): float(t) for i, t in lines}
    timed = [times.get(i) for i in range(warmup, warmup + steps)]
    if r.returncode or None in timed:
        raise SystemExit(f"timm train.py failed or logged too few updates:\n{(r.stdout + r.stderr)[-3000:]}")
    return {"img_per_s": steps * bs / sum(timed)}


# ------------------------------------------------------------------------------------------ the run


def run_case(case: str, a: argparse.Namespace, tmp: Path) -> list[dict]:
    """Every contender ``a.rounds`` times in turn on ``case``'s data; one row per run."""
    size, bs, warmup, steps = CASES[case]
    n = (warmup + steps) * bs
    train, val, classes = make_data(case, tmp / case, n)
    rows = []
    for rnd in range(a.rounds):
        for who in a.contenders:
            if who == "timm" and a.timm is None:
                continue
            before, t0 = load(), time.perf_counter()
            out = tmp / f"{case}-{who}-{rnd}"
            if who in ("imgclf", "imgclf-pil"):
                extra = ["--data.fast_path", "off"] if who == "imgclf-pil" else []
                got = run_imgclf(train, val, size, bs, a, out, extra)
            elif who == "standard":
                got = run_standard(train, size, bs, warmup, steps, a)
            else:
                got = run_timm(train.parent, size, bs, classes, warmup, steps, a, out)
            row = {"case": case, "round": rnd, "contender": who, **got, "load_before": before, "load_after": load(),
                   "process_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Median images/s per (case, contender) and imgclf's ratio to each other contender."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        med = {c: statistics.median(r["img_per_s"] for r in rows if r["case"] == case and r["contender"] == c)
               for c in dict.fromkeys(r["contender"] for r in rows if r["case"] == case)}  # fmt: skip
        for c, v in med.items():
            out.append({"case": case, "contender": c, "img_per_s": round(v, 1),
                        "imgclf_speedup": round(med["imgclf"] / v, 2) if "imgclf" in med else None})  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--contenders", nargs="+", choices=["imgclf", "imgclf-pil", "standard", "timm"],
                    default=["imgclf", "standard", "timm"])  # fmt: skip
    ap.add_argument("--timm", type=Path, default=None, help="a timm checkout holding train.py (without: timm skipped)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every contender (default: theirs)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_throughput.json")
    ap.add_argument("--standard", type=Path, help=argparse.SUPPRESS)  # internal: run the standard pipeline
    for k in ("--size", "--batch", "--warmup", "--steps"):
        ap.add_argument(k, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.standard is not None:
        rate = standard_pipeline(a.standard, a.size, a.batch, a.warmup, a.steps, a.precision, a.device)
        print(json.dumps({"img_per_s": rate}))
        return 0
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by every contender's process
    if a.timm is not None and not (a.timm / "train.py").is_file():
        raise SystemExit(f"--timm {a.timm}: no train.py there (a timm checkout)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for case in a.cases:
            rows += run_case(case, a, Path(tmp))
    table = summary(rows)
    print(f"\n{'case':<7} {'contender':<11} {'img/s':>8} {'imgclf x':>9}")
    for r in table:
        print(f"{r['case']:<7} {r['contender']:<11} {r['img_per_s']:>8.1f} {r['imgclf_speedup'] or '':>9}")
    _write(a, rows, table)
    return 0


def _write(a: argparse.Namespace, rows: list[dict], table: list[dict]) -> None:
    sys.path.insert(0, str(HERE))
    from demo_seeds import machine

    from imgclf.artifact import package_versions
    from imgclf.io import write_json

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    timm_rev = None
    if a.timm is not None:
        timm_rev = (a.timm / "timm" / "version.py").read_text().split("'")[1] if (a.timm / "timm").is_dir() else None
    doc = {"command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
           "cases": {c: dict(zip(("input_size", "batch", "warmup", "timed_updates"), CASES[c])) for c in a.cases},
           "model": MODEL, "precision": a.precision, "device": a.device, "threads": a.threads or "default",
           "summary": table, "runs": rows,
           "machine": machine(), "versions": package_versions(), "timm_checkout_version": timm_rev,
           "git": git.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    write_json(a.out, doc)
    print(f"-> {a.out}")


if __name__ == "__main__":
    raise SystemExit(main())
