"""The whole training job: fit, then measure the best weights on validation and test data and write
the artifact. The trainer knows nothing of artifacts; this module composes the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import Artifact, save_artifact
from .config import Config, config_to_dict
from .data.sources import Samples
from .eval.inference import infer
from .eval.metrics import compute_metrics
from .models.factory import architecture_of
from .train.probe import fit_probe
from .train.trainer import Fitted, eval_loader, fit


@dataclass
class TrainResult:
    """Where the run is and its numbers."""

    run_dir: Path
    best_epoch: int
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_training(cfg: Config, resume: bool = False) -> TrainResult:
    """Train, then evaluate the best weights and save ``model.safetensors`` + ``imgclf.json``."""
    cached_probe = cfg.transfer.strategy == "probe" and cfg.probe.cache
    f = fit_probe(cfg, resume=resume) if cached_probe else fit(cfg, resume=resume)
    val_m = _measure(f, f.splits.val, "val")
    test_m = _measure(f, f.splits.test, "test") if f.splits.test is not None else None
    metrics: dict[str, Any] = {
        "val": val_m,
        "best_epoch": f.state.best_epoch,
        "best_weights": f.state.best_which,
        "epochs_run": f.state.epoch,
        "train_seconds": round(f.seconds, 1),
    }
    if test_m is not None:
        metrics["test"] = test_m
    if f.skips.items:
        metrics["skipped_files"] = f.skips.items
    art = Artifact(
        arch=architecture_of(f.model, cfg.model.name),
        class_names=f.splits.class_names,
        preprocessing=f.preprocessing,
        config=config_to_dict(cfg),
        metrics=metrics,
        weights_source=f.weights_source,
        extra={"data": {"train": f.splits.train.name, "n_train": len(f.splits.train), "n_val": len(f.splits.val)}},
    )
    if f.dist.is_main:
        save_artifact(f.run_dir, f.model, art)
    return TrainResult(f.run_dir, f.state.best_epoch, val_m, test_m, f.state.history, dict(f.skips.items), f.seconds)


def _measure(f: Fitted, samples: Samples, desc: str) -> dict[str, Any]:
    loader = eval_loader(samples, f.preprocessing, f.cfg, f.dist.device.type == "cuda")
    o = infer(
        f.model, loader, f.dist.device, skips=f.skips, amp_dtype=None, channels_last=f.cfg.model.channels_last,
        progress=f.cfg.run.progress and f.dist.is_main, desc=desc,
    )  # fmt: skip
    return compute_metrics(o.logits, o.labels, f.splits.class_names)
