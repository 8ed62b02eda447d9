"""Metrics of a saved run on any labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.sources import open_source
from .inference import infer_run
from .metrics import compute_metrics


def evaluate_run(run_dir: str | Path, data: str, *, split: str = "test", **run_opts: Any) -> dict[str, Any]:
    """Load ``run_dir``, run it on ``data`` (folder, CSV, .npz, builtin) and return metrics.

    The data's class names are matched to the run's by name, so a test folder may hold a subset of classes.
    Unreadable files are skipped and listed under ``skipped_files``. ``run_opts``: batch_size, num_workers,
    device, strict_images, progress (see ``imgclf.eval.inference.infer_run``).
    """
    out, art, samples, skips = infer_run(
        run_dir, lambda a: open_source(data, split).remap_to(a.class_names), desc="eval", **run_opts
    )
    metrics = compute_metrics(out.logits, out.labels, art.class_names)
    metrics["data"] = samples.name
    if skips.items:
        metrics["skipped_files"] = skips.items
    return metrics
