"""Choosing a backbone under a latency budget on this machine and this data: ``imgclf models --benchmark``.

The production guide's architecture advice (the right backbone depends on the latency budget and the hardware)
made measurable (our value: no peer measures backbones on the user's machine and data). For each timm
architecture:

- parameters, and GMACs at the input size (one image; ``torch.utils.flop_counter.FlopCounterMode``, which counts
  a multiply-add as 2 FLOPs: MACs = FLOPs / 2);
- latency at batch 1 (median ms) and throughput at batch 32 (images/s) on ``runtime`` (auto: the fastest installed,
  as ``imgclf serve`` would pick), the whole served computation (uint8 pixels in, calibrated probabilities out),
  measured by ``deploy.bench``;
- given data and weights available offline (or ``hub``: downloads allowed), a quick linear-probe accuracy: the
  ``probe`` recipe (frozen backbone, cached features, L-BFGS logistic regression, its L2 strength chosen on the
  validation split), scored on the test split when the data has one, else on validation. Architectures without
  such weights are measured for speed only (random init) and marked so.

Every architecture becomes a run directory under ``output`` (a probe run, usable like any other, or the
speed-only model); ``benchmark.json`` holds the table, ``pareto.png`` plots accuracy against latency with the
Pareto front (the models no faster model is at least as accurate as), and ``latency_ms`` picks the most accurate
model within the budget.

Example:
    >>> res = benchmark_backbones(["tf_efficientnet_lite0", "resnet18"], data="builtin:fashion-mnist",
    ...                           input_size=80, output="runs/backbones")  # doctest: +SKIP
    >>> res["choice"]["arch"]                                           # doctest: +SKIP
    'tf_efficientnet_lite0'
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .errors import ImgclfError, first_line
from .io import write_json

log = logging.getLogger("imgclf")

RESULTS_FILE = "benchmark.json"
PLOT_FILE = "pareto.png"


def _hub_id(arch: str) -> str | None:
    """The Hugging Face repository of timm's pretrained weights for ``arch`` (None: timm knows none)."""
    import timm

    try:
        return getattr(timm.models.get_pretrained_cfg(arch), "hf_hub_id", None) or None
    except Exception:  # noqa: BLE001 - an unknown name: no weights
        return None


def offline_weights(arch: str) -> str | None:
    """``packaged`` when a pip package ships the weights, ``hub`` when timm's Hugging Face files are already in the
    local cache, else None (nothing is downloaded to find out)."""
    from huggingface_hub import try_to_load_from_cache

    from .models.weights import packaged_weights_file

    if packaged_weights_file(arch) is not None:
        return "packaged"
    hub_id = _hub_id(arch)
    if hub_id and any(isinstance(try_to_load_from_cache(hub_id.split("@")[0], f), str)
                      for f in ("model.safetensors", "pytorch_model.bin")):  # fmt: skip
        return "hub"
    return None


def gmacs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> float:
    """Multiply-accumulates (10^9) of one forward pass of one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2e9


def _probe_run(arch: str, weights: str, data: str, input_size: int | None, out: Path, progress: bool) -> Path:
    """The ``probe`` recipe on ``data`` with ``arch``: a real run directory under ``out``."""
    from .config import build_config, load_yaml, recipe_path
    from .pipeline import run_training

    over: dict[str, Any] = {"data": {"path": data}, "model": {"name": arch, "weights": weights},
                            "run": {"output": str(out), "name": arch, "progress": progress},
                            "trust": {"report": False, "ood": False}}  # fmt: skip
    if input_size:
        over["data"]["input_size"] = input_size
    cfg = build_config([load_yaml(recipe_path("probe")), over], ["recipe 'probe'", "imgclf models --benchmark"])
    return run_training(cfg).run_dir


def _speed_only_run(arch: str, class_names: list[str], input_size: int | None, out: Path) -> Path:
    """A randomly initialised ``arch`` saved as a run (for the runtimes), preprocessing from timm's config."""
    from .artifact import Artifact, save_artifact
    from .config import ModelConfig
    from .data.preprocess import Preprocess
    from .models.factory import create_model, size_kwargs

    model, source = create_model(ModelConfig(name=arch, weights="none"), len(class_names), input_size)
    pre = Preprocess.from_model(model)
    if input_size:
        pre = dataclasses.replace(pre, input_size=(pre.input_size[0], input_size, input_size))
    art = Artifact(arch, class_names, pre, weights_source=source, model_kwargs=size_kwargs(arch, input_size),
                   config={"model": {"name": arch, "weights": "none"}})  # fmt: skip
    return save_artifact(out / arch, model, art, overwrite=False)  # never over a run already there


def _data_facts(data: str | None) -> tuple[list[str], int | None]:
    """(class names, median image side) of the training data; an ImageNet-sized head and no side without data.
    ImgclfError for multi-label data (the benchmark ranks by top-1)."""
    if not data:
        return [f"class_{i}" for i in range(1000)], None
    from .data.sizing import median_side
    from .data.sources import open_source

    samples = open_source(data, "train")
    if samples.multi_label:
        raise ImgclfError(f"{data}: multi-label data; imgclf models --benchmark ranks by single-label top-1")
    return list(samples.class_names), median_side(samples)


def _input_size(arch: str, input_size: int | None, side: int | None) -> int | None:
    """``input_size``, else what ``imgclf train`` picks for ``arch`` on images of median side ``side``
    (``data.sizing``), else the architecture's default (None): probe and speed-only rows alike."""
    if input_size or side is None:
        return input_size
    from .data.sizing import auto_input_size
    from .models.factory import default_input_size

    default, fixed = default_input_size(arch)
    return auto_input_size(side if default else None, default, fixed).size


def _row(arch: str, run: Path, weights: str | None, runtime: str, batch_sizes: tuple[int, ...], repeats: int,
         probed: bool) -> dict[str, Any]:  # fmt: skip
    from .artifact import load_artifact
    from .deploy.bench import bench_run
    from .deploy.runtime import resolve_runtime

    model, art = load_artifact(run)
    rt = resolve_runtime(runtime, art)
    res = bench_run(run, [rt], batch_sizes, warmup=3, repeats=repeats, progress=False)
    if res["skipped"]:
        raise ImgclfError(f"{rt}: {res['skipped'][rt]}")
    by_batch = {r["batch"]: r for r in res["results"]}
    m = art.metrics
    split = "test" if "test" in m else "val"
    return {
        "arch": arch,
        "weights": weights or "none",
        "input_size": art.preprocessing.input_size[1],
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gmacs": float(f"{gmacs(model, art.preprocessing.input_size):.4g}"),
        "runtime": rt,
        "latency_ms": {b: r["latency_ms_median"] for b, r in by_batch.items()},
        "img_per_s": {b: r["img_per_s"] for b, r in by_batch.items()},
        "probe_top1": (m.get(split) or {}).get("top1") if probed else None,
        "probe_split": split if probed else None,
        "run": str(run),
    }


def pareto_front(rows: list[dict[str, Any]], latency_batch: int = 1) -> list[str]:
    """Architectures no other is both faster (at ``latency_batch``) and at least as accurate as (rows with a probe
    accuracy only)."""
    scored = [r for r in rows if r["probe_top1"] is not None]
    front = []
    for r in scored:
        lat = r["latency_ms"][latency_batch]
        if not any(o is not r and o["latency_ms"][latency_batch] <= lat and o["probe_top1"] >= r["probe_top1"]
                   and (o["latency_ms"][latency_batch] < lat or o["probe_top1"] > r["probe_top1"])
                   for o in scored):  # fmt: skip
            front.append(r["arch"])
    return front


def choose(rows: list[dict[str, Any]], latency_ms: float, latency_batch: int = 1) -> dict[str, Any]:
    """The most accurate architecture whose latency at ``latency_batch`` is within ``latency_ms``; without probe
    accuracies, the list of those within the budget (speed alone cannot rank them)."""
    fits = [r for r in rows if r["latency_ms"][latency_batch] <= latency_ms]
    scored = [r for r in fits if r["probe_top1"] is not None]
    if scored:
        best = max(scored, key=lambda r: (r["probe_top1"], -r["latency_ms"][latency_batch]))
        return {"latency_ms": latency_ms, "arch": best["arch"], "probe_top1": best["probe_top1"],
                "latency_ms_measured": best["latency_ms"][latency_batch],
                "fits": [r["arch"] for r in fits]}  # fmt: skip
    return {"latency_ms": latency_ms, "arch": None, "fits": [r["arch"] for r in fits],
            "why": "no architecture within the budget" if not fits else
            "no probe accuracy: pass --data; weights must be offline, or --hub"}  # fmt: skip


def benchmark_backbones(
    archs: list[str],
    *,
    data: str | None = None,
    input_size: int | None = None,
    runtime: str = "auto",
    batch_sizes: tuple[int, int] = (1, 32),
    repeats: int = 20,
    latency_ms: float | None = None,
    output: str | Path = "runs/backbones",
    hub: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure ``archs`` (timm names) as the module docstring says; returns and writes ``benchmark.json``:
    ``rows`` (arch, weights, input_size, params_m, gmacs, runtime, latency_ms {batch: ms}, img_per_s
    {batch: images/s}, probe_top1 in [0, 1] or None, run), ``pareto`` (arch names), ``choice`` (with
    ``latency_ms``), ``skipped`` ({arch: reason}: an architecture that cannot be built or exported here).

    Raises:
        ImgclfError: no architectures, an unknown name, or a bad budget or batch size.
    """
    from .models.factory import check_model_name

    if not archs:
        raise ImgclfError("imgclf models --benchmark: no architecture matches (give names or a pattern)")
    if runtime.endswith("int8"):
        raise ImgclfError(f"--runtime {runtime}: int8 needs a calibrated, accuracy-checked export of a trained run "
                          "(imgclf export / compress); benchmark backbones on a floating-point runtime")  # fmt: skip
    for a in archs:
        check_model_name(a)
    if latency_ms is not None and not latency_ms > 0:
        raise ImgclfError(f"--latency-ms must be > 0 (got {latency_ms})")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    names, side = _data_facts(data)
    rows, skipped = [], {}
    for arch in tqdm(archs, desc="backbones", disable=not progress):
        weights = offline_weights(arch) or ("hub" if hub and _hub_id(arch) else None)
        size = _input_size(arch, input_size, side)
        try:
            probed = bool(data and weights)
            run = (_probe_run(arch, weights, data, size, out, progress) if probed
                   else _speed_only_run(arch, names, size, out))  # fmt: skip
            rows.append(_row(arch, run, weights if probed else None, runtime, batch_sizes, repeats, probed))
        except Exception as e:  # noqa: BLE001 - one architecture failing (export, size) must not stop the others
            skipped[arch] = first_line(e, 300)
            log.warning("%s: skipped (%s)", arch, skipped[arch])
    if not rows:
        raise ImgclfError(f"no architecture could be measured: {'; '.join(f'{a}: {w}' for a, w in skipped.items())}")
    doc = {"rows": rows, "skipped": skipped, "data": data, "batch_sizes": list(batch_sizes),
           "pareto": pareto_front(rows, batch_sizes[0]), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    if latency_ms is not None:
        doc["choice"] = choose(rows, latency_ms, batch_sizes[0])
    from .artifact import package_versions
    from .plots import pareto_plot

    doc["versions"] = package_versions()
    write_json(out / RESULTS_FILE, doc)
    pareto_plot(doc, out / PLOT_FILE)
    doc["plot"] = str(out / PLOT_FILE)
    doc["output"] = str(out)
    return doc
