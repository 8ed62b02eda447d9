"""Large-image training throughput: imgclf's data path against a standard PyTorch pipeline, interleaved.

Data: JPEGs cut from the scikit-image photos (5 classes: chelsea, coffee, astronaut, rocket, motorcycle; random
crops of 50-100 %, then resized so the shorter side is uniform in --sizes, quality 85-95, half mirrored).
Every variant trains the same timm model (random init: speed only) at the same batch size, augmentation
(RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3), bicubic, horizontal flip, normalisation) and loss
(cross-entropy, label smoothing 0.1) with AdamW, for --epochs epochs; the first is warm-up (worker start, cache
build, compilation) and images/s is the median over the later epochs of all rounds (whole epochs: loader
start included). Variants run in turn within each round, so load from other processes hits all of them alike.
On a shared machine wall-clock rates swing with the others' load, so every epoch also records the CPU time it
used (this process and its loader workers, which exit at the end of each epoch: ``RUSAGE_CHILDREN``):
``cpu_ms_per_image`` is the work a variant needs per image, nearly independent of the load.

- ``standard``: torchvision ``ImageFolder`` with per-sample PIL transforms (torchvision RandomResizedCrop,
  flip, ToTensor, Normalize), a 2-worker shuffling DataLoader, a contiguous model and a plain AdamW loop.
- ``imgclf*``: imgclf's own training path (``train_loader`` + ``build_loop`` + ``train_one_epoch``, EMA off as
  in the plain loop) with its defaults (channels_last, workers from the core count, JPEG draft) and the
  variant's overrides (``data.cache``, ``train.amp``, ``train.compile``).

``--amp bf16`` runs every variant, the standard one included, under bf16 autocast (same precision).
Writes bench/results/large_images[_TAG].json with the config, machine, load averages and every epoch's rate.

``--components`` measures the parts instead, each in one thread by its own CPU time (nearly independent of the
machine's load): the data path per training image (decode, augmentation, tensor) of the standard pipeline and of
imgclf (draft on/off, decoded cache), and one training step per image (contiguous vs channels_last, fp32 vs
bf16); a pipeline's cost per image is its data path plus its step, and the ratio of those is the speed-up a
dedicated machine would see when the loader overlaps the model.

Usage: python bench/large_images.py --model resnet18 --sizes 256 512 --images 80 --rounds 2
       python bench/large_images.py --components --model resnet18 --sizes 1600 2400 --images 24 --amp bf16
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from demo_seeds import machine
from PIL import Image

from imgclf.artifact import package_versions
from imgclf.io import write_json

VARIANTS = {
    "standard": None,
    "imgclf": {},
    "imgclf-cache": {"data.cache": "memory"},
    "imgclf-compile": {"train.compile": True},
    "imgclf-cache-compile": {"data.cache": "memory", "train.compile": True},
}


def make_data(root: Path, per_class: int, lo: int, hi: int, seed: int = 0) -> Path:
    """``root/<photo>/NNNN.jpg``: random crops of the scikit-image photos, shorter side uniform in [lo, hi]."""
    import skimage.data as d

    rng = np.random.default_rng(seed)
    photos = {"cat": d.chelsea(), "coffee": d.coffee(), "astronaut": d.astronaut(), "rocket": d.rocket(),
              "motorcycle": d.stereo_motorcycle()[0]}  # fmt: skip
    for name, arr in photos.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr).convert("RGB")
        for k in range(per_class):
            f = rng.uniform(0.5, 1.0)
            cw, ch = int(img.width * f), min(img.height, int(img.height * f * rng.uniform(0.8, 1.2)))
            x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
            s = int(rng.integers(lo, hi + 1)) / min(cw, ch)
            crop = img.crop((x, y, x + cw, y + ch)).resize((round(cw * s), round(ch * s)), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(out / f"{k:04d}.jpg", quality=int(rng.integers(85, 96)))
    return root


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (finished loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def epoch_stats(seen: int, secs: float, cpu: float) -> dict:
    return {"img_per_s": seen / secs, "seconds": secs, "cpu_ms_per_image": 1000 * cpu / max(seen, 1)}


def run_standard(data: Path, a, amp: torch.dtype | None) -> list[dict]:
    """The standard pipeline: torchvision ImageFolder + per-sample PIL transforms, 2 workers, plain AdamW."""
    import timm
    from torchvision import datasets, transforms

    cfg = timm.data.resolve_model_data_config(timm.create_model(a.model, pretrained=False))
    tf = transforms.Compose([
        transforms.RandomResizedCrop(a.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip
    ds = datasets.ImageFolder(str(data), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=2, drop_last=True)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False, num_classes=len(ds.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    out = []
    for _ in range(a.epochs):
        t0, c0, seen = time.perf_counter(), cpu_seconds(), 0
        for x, y in loader:
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = crit(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y)
        del x, y
        out.append(epoch_stats(seen, time.perf_counter() - t0, cpu_seconds() - c0))
    return out


def run_imgclf(data: Path, a, overrides: dict, amp: str, tmp: str) -> list[dict]:
    """imgclf's training path on ``data`` with ``overrides`` (no validation: throughput only)."""
    from imgclf.config import build_config
    from imgclf.data.loader import set_epoch
    from imgclf.data.preprocess import Preprocess
    from imgclf.data.sources import open_source
    from imgclf.dist import Dist
    from imgclf.models.factory import create_model
    from imgclf.train.loop import State, train_one_epoch
    from imgclf.train.trainer import build_loop, train_loader

    over = {"model.name": a.model, "model.weights": "none", "data.input_size": a.input_size,
            "data.batch_size": a.batch_size, "train.ema": False, "train.amp": amp, "run.progress": False,
            "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05, "train.label_smoothing": 0.1,
            "data.cache_dir": str(Path(tmp) / "cache"), **overrides}  # fmt: skip
    layers: dict = {}
    for k, v in over.items():
        sec, _, key = k.partition(".")
        layers.setdefault(sec, {})[key] = v
    cfg = build_config([layers], ["bench"])
    samples = open_source(str(data))
    torch.manual_seed(0)
    model, _ = create_model(cfg.model, len(samples.class_names), cfg.data.input_size)
    pre = Preprocess.from_model(model, cfg.data)
    dist = Dist(torch.device("cpu"))
    t0 = time.perf_counter()
    tl = train_loader(samples, pre, cfg, dist)
    setup = time.perf_counter() - t0
    loop = build_loop(cfg, dist, model, len(tl), len(samples.class_names))
    state, out = State(), []
    for e in range(1, a.epochs + 1):
        set_epoch(tl, cfg.train.seed, e)
        c0, n0 = cpu_seconds(), state.updates
        st = train_one_epoch(loop, tl, state, "")
        seen = (state.updates - n0) * cfg.data.batch_size
        out.append(epoch_stats(seen, st["epoch_seconds"], cpu_seconds() - c0))
    out[0]["loader_setup_seconds"] = setup  # the decoded cache is built here
    return out


def data_costs(data: Path, a, n: int = 120) -> dict[str, float]:
    """Single-thread CPU ms per training image of the data path alone (decode + augmentation + tensor), on up to
    ``n`` images: the standard per-sample pipeline, imgclf without cache (draft on, and off) and with the cache."""
    import random

    from torchvision import datasets, transforms

    from imgclf.config import build_config
    from imgclf.data.cache import large_image_samples
    from imgclf.data.loader import ImageDataset
    from imgclf.data.preprocess import Preprocess
    from imgclf.data.sources import open_source

    pre = Preprocess((3, a.input_size, a.input_size), "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)
    s = open_source(str(data))
    s = s.subset(np.random.default_rng(0).permutation(len(s))[:n])
    tf = transforms.Compose([
        transforms.RandomResizedCrop(a.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std),
    ])  # fmt: skip
    std = datasets.ImageFolder(str(data), transform=tf)
    index = {p: i for i, (p, _) in enumerate(std.samples)}
    paths = {}
    for name, over in (("imgclf, jpeg_draft off", {"jpeg_draft": False}), ("imgclf", {}),
                       ("imgclf, data.cache memory", {"cache": "memory"})):  # fmt: skip
        cfg = build_config([{"data": {"path": str(data), **over}}], ["bench"])
        paths[name] = ImageDataset(large_image_samples(s, pre, cfg.data, cfg.aug), pre.train(cfg.aug))
    paths = {"standard": [index[p] for p in s.items]} | paths
    out = {}
    for name, ds in paths.items():
        get = (lambda i, idx=ds: std[idx[i]]) if name == "standard" else ds.__getitem__
        best = []
        for _ in range(2):
            t0 = time.thread_time()
            for i in range(len(s)):
                random.seed(i)
                torch.manual_seed(i)
                get(i)
            best.append(1000 * (time.thread_time() - t0) / len(s))
        out[name] = min(best)
    return out


def step_costs(a, batch: int = 16) -> dict[str, float]:
    """Single-thread CPU ms per image of one training step (forward, backward, AdamW) on random input: contiguous
    (the standard pipeline) and channels_last (imgclf), fp32 and bf16 autocast."""
    import timm

    out = {}
    for cl in (False, True):
        for bf16 in (False, True):
            torch.manual_seed(0)
            m = timm.create_model(a.model, num_classes=5)
            x, y = torch.randn(batch, 3, a.input_size, a.input_size), torch.randint(0, 5, (batch,))
            if cl:
                m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            opt, ts = torch.optim.AdamW(m.parameters(), 1e-3), []
            for _ in range(3):
                t0 = time.thread_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ts.append(time.thread_time() - t0)
            out[f"{'channels_last' if cl else 'contiguous'} {'bf16' if bf16 else 'fp32'}"] = 1000 * min(ts[1:]) / batch
    return out


def components(data: Path, a) -> dict:
    """Per-image CPU cost of each part (one thread: robust to other processes' load) and the pipelines they make."""
    torch.set_num_threads(1)
    d, c = data_costs(data, a), step_costs(a)
    prec = "bf16" if a.amp == "bf16" else "fp32"
    std = d["standard"] + c[f"contiguous {prec}"]
    total = {"standard": std} | {k: v + c[f"channels_last {prec}"] for k, v in d.items() if k != "standard"}
    for k, v in {"data_ms": d, "step_ms": c, "total_ms": total}.items():
        print(k, " | ".join(f"{n} {x:.1f}" for n, x in v.items()), flush=True)
    print("standard / imgclf CPU per image:", " | ".join(f"{k} {std / v:.2f}x" for k, v in total.items()))
    return {"data_ms_per_image": d, "step_ms_per_image": c, "total_ms_per_image": total,
            "speedup_vs_standard": {k: std / v for k, v in total.items()}}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--sizes", type=int, nargs=2, default=[256, 512], help="shorter side range of the JPEGs")
    ap.add_argument("--images", type=int, default=80, help="images per class (5 classes)")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="per variant and round; the first is warm-up")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--variants", nargs="+", default=["standard", "imgclf", "imgclf-cache"], choices=list(VARIANTS))
    ap.add_argument("--data", type=Path, help="an existing ImageFolder instead of generated photos")
    ap.add_argument("--tag", default="")
    ap.add_argument("--components", action="store_true", help="per-part single-thread CPU costs instead of runs")
    a = ap.parse_args()
    if a.components:
        with tempfile.TemporaryDirectory() as tmp:
            doc = {"config": vars(a) | {"data": str(a.data) if a.data else "generated"},
                   **components(a.data or make_data(Path(tmp) / "data", a.images, *a.sizes), a),
                   "machine": machine(), "load": os.getloadavg(), "versions": package_versions()}  # fmt: skip
        write_json(Path(__file__).parent / "results" / f"large_images_components_{a.tag or a.model}.json", doc)
        return 0
    amp = torch.bfloat16 if a.amp == "bf16" else None
    runs: dict[str, list] = {v: [] for v in a.variants}
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or make_data(Path(tmp) / "data", a.images, *a.sizes)
        for r in range(a.rounds):
            for v in a.variants:
                load = os.getloadavg()[0]
                if VARIANTS[v] is None:
                    epochs = run_standard(data, a, amp)
                else:
                    epochs = run_imgclf(data, a, VARIANTS[v], a.amp, tmp)
                runs[v].append({"round": r, "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                                "epochs": epochs})  # fmt: skip
                print(v, f"round {r}", " ".join(f"{e['img_per_s']:.1f}" for e in epochs), "img/s,",
                      " ".join(f"{e['cpu_ms_per_image']:.0f}" for e in epochs), f"CPU ms/img (load {load:.1f})",
                      flush=True)  # fmt: skip
    summary = {v: {k: statistics.median(e[k] for run in rs for e in run["epochs"][1:]) for k in
                   ("img_per_s", "cpu_ms_per_image")} for v, rs in runs.items()}  # fmt: skip
    for v, s in summary.items():
        ref = summary.get("standard")
        ratio = (f"  {s['img_per_s'] / ref['img_per_s']:.2f}x standard (wall), "
                 f"{ref['cpu_ms_per_image'] / s['cpu_ms_per_image']:.2f}x (CPU)") if ref else ""  # fmt: skip
        print(f"{v:22s} {s['img_per_s']:7.1f} img/s {s['cpu_ms_per_image']:6.0f} CPU ms/img{ratio}")
    doc = {"config": vars(a) | {"data": str(a.data) if a.data else "generated"}, "variants": {v: VARIANTS[v] for v in
           a.variants}, "median": summary, "runs": runs, "machine": machine(),
           "versions": package_versions()}  # fmt: skip
    name = f"large_images{'_' + a.tag if a.tag else ''}.json"
    write_json(Path(__file__).parent / "results" / name, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
