"""Throughput and latency of a run per runtime and batch size (``imgclf bench RUN``).

Each (runtime, batch size) gets ``warmup`` untimed calls, then ``repeats`` timed calls on the same
uint8 pixels; the median call time gives latency and throughput (images/s = batch / median). All
runtimes compute the same thing: pixels in, calibrated probabilities out (preprocessing and softmax or sigmoid
included), so the figures compare like with like.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..artifact import package_versions, read_artifact
from ..errors import ImgclfError, first_line
from .runtime import available_runtimes, load_predictor


def _bench_runtime(art, rt: str, batch_sizes, warmup: int, repeats: int, hwc, rng, inputs: dict, ref: dict,
                   is_first: bool, rows: list, bar) -> None:  # fmt: skip
    """Append one row per batch size for runtime ``rt`` (rows measured before a failure are kept). Every runtime
    gets the same pixels per batch size (``inputs``); ``ref`` holds the first runtime's top-1 answers, which
    ``is_first`` fills and the others are compared with (None where the first runtime failed)."""
    t_load = time.perf_counter()
    pred = load_predictor(art, rt)
    answers = _answers(art)
    load_s = time.perf_counter() - t_load
    for b in batch_sizes:
        px = inputs.setdefault(b, rng.integers(0, 256, (b, *hwc), dtype=np.uint8))
        for _ in range(warmup):
            pred(px)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, probs, _ = pred(px)
            times.append(time.perf_counter() - t0)
        top1 = answers(probs)  # (B,) classes, or (B, K) label sets of a multi-label run
        if is_first:
            ref[b] = top1
        med = statistics.median(times)
        rows.append({
            "runtime": rt,
            "batch": b,
            "img_per_s": round(b / med, 1),
            "latency_ms_median": round(1000 * med, 2),
            "latency_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
            "top1_agreement_with_first": float((top1 == ref[b]).reshape(b, -1).all(1).mean()) if b in ref else None,
            "load_seconds": round(load_s, 2),
            "file": pred.path,
        })  # fmt: skip
        bar.update()


def _answers(art):
    """Calibrated probabilities (B, K) -> the run's answers: top-1 classes, or label sets under its thresholds."""
    import torch

    from ..eval.trust import Trust

    trust = Trust.of(art)
    return lambda probs: trust.decide(torch.from_numpy(probs)).numpy()


def bench_run(
    run_dir: str | Path,
    runtimes: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    warmup: int = 3,
    repeats: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """``{"results": [{runtime, batch, img_per_s, latency_ms_median, latency_ms_p90, ...}], ...}``."""
    run_dir = Path(run_dir)
    art = read_artifact(run_dir)
    runtimes = runtimes or available_runtimes()
    if min(batch_sizes) < 1 or repeats < 1 or warmup < 0:
        raise ImgclfError("--batch-sizes and --repeats must be >= 1, --warmup >= 0")
    c, h, w = art.preprocessing.input_size
    rng = np.random.default_rng(0)
    rows, inputs, ref, skipped = [], {}, {}, {}
    bar = tqdm(total=len(runtimes) * len(batch_sizes), desc="bench", disable=not progress, leave=False)
    for rt in runtimes:
        done = len(rows)
        try:
            _bench_runtime(art, rt, batch_sizes, warmup, repeats, (h, w, c), rng, inputs, ref, rt == runtimes[0], rows,
                           bar)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a runtime that cannot load or run this model: say so, bench the rest
            # (e.g. an int8 export refused for its accuracy drop, an exporter that cannot translate the model)
            skipped[rt] = first_line(e, 300)
            bar.update(len(batch_sizes) - (len(rows) - done))
    bar.close()
    base = {r["batch"]: r["img_per_s"] for r in rows if r["runtime"] == runtimes[0]}
    for r in rows:
        r["speedup"] = round(r["img_per_s"] / base[r["batch"]], 2) if base.get(r["batch"]) else None
    return {
        "run": str(run_dir),
        "arch": art.arch,
        "input_size": list(art.preprocessing.input_size),
        "baseline": runtimes[0],
        "warmup": warmup,
        "repeats": repeats,
        "results": rows,
        "skipped": skipped,
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
