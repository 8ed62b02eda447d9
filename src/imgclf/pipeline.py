"""The whole training job: fit, then measure the best weights on validation and test data and write
the artifact. The trainer knows nothing of artifacts; this module composes the stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import Artifact, save_artifact
from .config import Config, config_to_dict
from .data.sources import Samples, stratified_split
from .eval.drift import reference_stats
from .eval.predictions import save_predictions
from .eval.trust import alternative_k, calibration_report, fit_trust, task_metrics
from .models.factory import architecture_of, size_kwargs
from .models.heads import FEATURE_STATS_MAX_DIM, head_spec
from .models.inference import Outputs, embedding_dim, infer
from .rundir import VAL_PREDICTIONS
from .train.probe import fit_probe
from .train.trainer import Fitted, eval_loader, fit

log = logging.getLogger("imgclf")


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
    """Train, evaluate the best weights, fit calibration and OOD statistics, save the artifact and report."""
    cached_probe = cfg.transfer.strategy == "probe" and cfg.probe.cache
    f = fit_probe(cfg, resume=resume) if cached_probe else fit(cfg, resume=resume)
    narrow = embedding_dim(f.model) <= FEATURE_STATS_MAX_DIM  # wider (bilinear) features: logit OOD scores only
    if cfg.trust.ood and not narrow:
        log.info("features of %d values: OOD feature statistics and the drift embedding reference skipped (fitted "
                 "up to %d values); logit OOD scores only", embedding_dim(f.model), FEATURE_STATS_MAX_DIM)  # fmt: skip
    need_feats = cfg.trust.ood and narrow
    val_o = _outputs(f, f.splits.val, "val", True)  # features: OOD thresholds and the drift reference
    test_o = _outputs(f, f.splits.test, "test", need_feats) if f.splits.test is not None else None
    train_o = _outputs(f, _stats_subset(f.splits.train, cfg), "train features", True) if need_feats else None
    names, task = f.splits.class_names, f.task
    trust, cal = fit_trust(val_o.logits, val_o.labels, val_o.features, train_o and train_o.features,
                           train_o and train_o.labels, len(names), cfg.trust, task, names)  # fmt: skip
    k = alternative_k(val_o.labels) if task.multi_label else None
    val_m = task_metrics(trust, val_o, names, k)
    test_m = task_metrics(trust, test_o, names, k) if test_o is not None else None
    if test_o is not None:
        cal["test"] = calibration_report(trust, test_o.logits, test_o.labels)
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
        class_names=names,
        preprocessing=f.preprocessing,
        config=config_to_dict(cfg),
        metrics=metrics,
        weights_source=f.weights_source,
        task=task.to_json(),
        data={"train": f.splits.train.name, "n_train": len(f.splits.train), "n_val": len(f.splits.val)},
        calibration={k: v for k, v in cal.items() if k not in ("reliability", "thresholds")},
        decision=trust.decision.to_json() if trust.decision is not None else None,
        ood=trust.to_json() if cfg.trust.ood else None,
        drift=_drift_reference(trust, val_o, f.splits.val.name, features=narrow),
        model_kwargs=size_kwargs(cfg.model.name, cfg.data.input_size),  # what create_model built it with
        head=head_spec(cfg.model),
    )
    if f.dist.is_main:
        save_artifact(f.run_dir, f.model, art)
        trust.save_stats(f.run_dir)
        save_predictions(f.run_dir / VAL_PREDICTIONS, val_o, f.splits.val)
        if cfg.trust.report:
            from .eval.report import write_report

            write_report(f.run_dir, model=f.model, art=art, val=(val_o, f.splits.val), reliability=cal["reliability"])
    return TrainResult(f.run_dir, f.state.best_epoch, val_m, test_m, f.state.history, dict(f.skips.items), f.seconds)


def _drift_reference(trust, val_o: Outputs, name: str, features: bool = True) -> dict[str, Any] | None:
    """Reference statistics of the validation outputs (and their features) for drift monitoring (None with under
    2 images)."""
    if len(val_o.logits) < 2:
        return None
    feats = val_o.features.numpy() if features else None
    return {"data": f"{name} (validation split)", **reference_stats(trust.probs(val_o.logits).numpy(), feats, trust)}


def _stats_subset(train: Samples, cfg: Config) -> Samples:
    """A stratified subset of at most ``trust.ood_max_train`` training images for the OOD statistics."""
    n = len(train)
    if n <= cfg.trust.ood_max_train:
        return train
    _, keep = stratified_split(train.labels, cfg.trust.ood_max_train / n, cfg.train.seed)
    return train.subset(keep)


def _outputs(f: Fitted, samples: Samples, desc: str, features: bool) -> Outputs:
    loader = eval_loader(samples, f.preprocessing, f.cfg, f.dist.device.type == "cuda")
    return infer(
        f.model, loader, f.dist.device, skips=f.skips, amp_dtype=None, channels_last=f.cfg.model.channels_last,
        features=features, progress=f.cfg.run.progress and f.dist.is_main, desc=desc,
    )  # fmt: skip
