"""The layout of a run directory, owned in one place (no path literals in the stages).

::

    runs/<name>/
        model.safetensors          weights (a k-NN index: backbone + index tensors)   artifact
        imgclf.json                the artifact: arch, classes, preprocessing, task, calibration, ...
        config.yaml                the resolved training config                        train/logger
        metrics.jsonl, metrics.csv one row per epoch                                   train/logger
        tensorboard/               optional event files                                train/logger
        run.lock                   held while a training process owns the run          train/logger
        checkpoints/last.pt        resume state (weights, optimiser, history)          train
        checkpoints/best.safetensors  best weights so far                              train
        ood.safetensors            feature statistics for Mahalanobis / k-NN OOD       eval/trust
        val_predictions.safetensors  validation outputs for the report                 pipeline
        report.html                the training report                                 eval/report
        export/                    exported graphs + export.json                       deploy/export
        retrain/                   a retrained run's data: train/test CSVs, PNGs       retrain
        retrain.json               its decision against the run it came from           retrain

Example:
    >>> r = RunDir("runs/pets")
    >>> r.weights.as_posix(), r.last_checkpoint.as_posix()
    ('runs/pets/model.safetensors', 'runs/pets/checkpoints/last.pt')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
META_FILE = "imgclf.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
LAST_CKPT = f"{CHECKPOINTS_DIR}/last.pt"
BEST_WEIGHTS = f"{CHECKPOINTS_DIR}/best.safetensors"
OOD_FILE = "ood.safetensors"
VAL_PREDICTIONS = "val_predictions.safetensors"
REPORT_FILE = "report.html"
EXPORT_DIR = "export"
EXPORT_FILE = "export.json"
RETRAIN_DIR = "retrain"  # written before training starts: the data the run is then trained on
#: what a run holds before its first epoch ends (a folder with only these may be started again)
EARLY_FILES = frozenset(
    {CONFIG_FILE, METRICS_JSONL, METRICS_CSV, TENSORBOARD_DIR, CHECKPOINTS_DIR, LOCK_FILE, RETRAIN_DIR}
)


@dataclass(frozen=True)
class RunDir:
    """A run directory's paths (nothing is created or read on construction)."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    weights = property(lambda self: self.path / WEIGHTS_FILE)
    meta = property(lambda self: self.path / META_FILE)
    lock = property(lambda self: self.path / LOCK_FILE)
    config = property(lambda self: self.path / CONFIG_FILE)
    metrics_jsonl = property(lambda self: self.path / METRICS_JSONL)
    metrics_csv = property(lambda self: self.path / METRICS_CSV)
    tensorboard = property(lambda self: self.path / TENSORBOARD_DIR)
    checkpoints = property(lambda self: self.path / CHECKPOINTS_DIR)
    last_checkpoint = property(lambda self: self.path / LAST_CKPT)
    best_weights = property(lambda self: self.path / BEST_WEIGHTS)
    ood_stats = property(lambda self: self.path / OOD_FILE)
    val_predictions = property(lambda self: self.path / VAL_PREDICTIONS)
    report = property(lambda self: self.path / REPORT_FILE)
    export = property(lambda self: self.path / EXPORT_DIR)
    export_record = property(lambda self: self.path / EXPORT_DIR / EXPORT_FILE)
