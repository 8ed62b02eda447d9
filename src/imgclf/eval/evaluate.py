"""Metrics of a saved run on any labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact import load_artifact
from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.sources import open_source
from ..data.transforms import eval_transform
from ..dist import resolve_device
from .inference import infer
from .metrics import compute_metrics


def evaluate_run(
    run_dir: str | Path,
    data: str,
    *,
    split: str = "test",
    batch_size: int = 128,
    num_workers: int = -1,
    device: str = "auto",
    strict_images: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Load ``run_dir``, run it on ``data`` (folder, CSV, .npz, builtin) and return metrics.

    The data's class names are matched to the run's by name, so a test folder may hold a subset of classes.
    Unreadable files are skipped and listed under ``skipped_files``.
    """
    dev = resolve_device(device)
    model, art = load_artifact(run_dir, dev)
    samples = open_source(data, split).remap_to(art.class_names)
    loader = make_loader(
        ImageDataset(samples, eval_transform(art.preprocessing)), batch_size, train=False, num_workers=num_workers
    )
    skips = SkipLog(strict=strict_images)
    out = infer(model, loader, dev, skips=skips, progress=progress, desc="eval")
    metrics = compute_metrics(out.logits, out.labels, art.class_names)
    metrics["data"] = samples.name
    if skips.items:
        metrics["skipped_files"] = skips.items
    return metrics
