"""Trust settings of a run: the calibration temperature and the OOD thresholds and statistics.

Fitted after training (``fit_trust``) on the validation split (temperature: minimum NLL; thresholds:
``trust.ood_tpr`` of validation images accepted) and on training features (Mahalanobis class means
and shared precision, k-NN bank); stored in ``imgclf.json`` (``calibration``, ``ood``) and
``ood.safetensors``; applied by eval, predict and, later, export and serve through ``Trust``.

Example:
    >>> trust = Trust.load("runs/x", art)                      # doctest: +SKIP
    >>> probs = trust.probs(logits); score, unknown = trust.unknown(logits, feats)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ImgclfError
from ..io import save_safetensors
from ..rundir import OOD_FILE
from ..train.tasks import SingleLabelTask, task_from_json
from .calibration import calibration_metrics, fit_temperature, reliability
from .ood import FEATURE_SCORES, SCORES, FeatureStats, fit_feature_stats, logit_scores, threshold_for_tpr


@dataclass
class Trust:
    """Temperature, OOD thresholds (one per score) and the feature statistics of one run."""

    temperature: float = 1.0
    ood_score: str = "energy"
    tpr: float = 0.95
    thresholds: dict[str, float] = field(default_factory=dict)
    stats: FeatureStats | None = None
    task: SingleLabelTask = field(default_factory=SingleLabelTask)  # the head's activation and decision

    @property
    def needs_features(self) -> bool:
        return self.ood_score in FEATURE_SCORES and self.stats is not None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: the task's activation at the run's temperature."""
        return self.task.probs(logits, self.temperature)

    def scores(self, logits: torch.Tensor, feats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every OOD score available from these outputs (higher = more in-distribution)."""
        out = logit_scores(logits, self.temperature)
        if feats is not None and self.stats is not None:
            out.update(self.stats.scores(feats))
        return out

    def unknown(
        self, logits: torch.Tensor, feats: torch.Tensor | None = None, score: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(score, is_unknown) of the chosen score, or None when the run has no threshold for it."""
        name = score or self.ood_score
        if name not in self.thresholds:
            return None
        if name in FEATURE_SCORES:  # only the chosen score: k-NN and Mahalanobis cost far more than the rest
            if feats is None or self.stats is None:
                raise ImgclfError(f"OOD score '{name}' needs features and the run's {OOD_FILE}")
            s = getattr(self.stats, name)(feats)
        else:
            s = logit_scores(logits, self.temperature)[name]
        return s, s < self.thresholds[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "ood_score": self.ood_score,
            "tpr": self.tpr,
            "thresholds": self.thresholds,
            "knn_k": self.stats.knn_k if self.stats else None,
            "feature_stats": OOD_FILE if self.stats is not None else None,
        }

    def save_stats(self, run_dir: Path) -> None:
        if self.stats is not None:
            save_safetensors(run_dir / OOD_FILE, self.stats.state())

    @classmethod
    def load(cls, run_dir: str | Path, art: Any, device: str = "cpu") -> Trust:
        """From ``imgclf.json`` (``calibration`` and ``ood``) and ``ood.safetensors``; identity if absent."""
        ood = art.ood or {}
        stats = None
        if ood.get("feature_stats"):
            from safetensors.torch import load_file

            path = Path(run_dir) / ood["feature_stats"]
            if not path.is_file():
                raise ImgclfError(f"{run_dir}: OOD statistics {path.name} are missing (retrain or drop OOD)")
            stats = FeatureStats.from_state(load_file(str(path), device=device), ood.get("knn_k") or 10)
        return cls(art.temperature, ood.get("ood_score", "energy"), float(ood.get("tpr", 0.95)),
                   {k: float(v) for k, v in (ood.get("thresholds") or {}).items()}, stats,
                   task_from_json(art.task))  # fmt: skip


def fit_trust(
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    val_feats: torch.Tensor | None,
    train_feats: torch.Tensor | None,
    train_labels: torch.Tensor | None,
    num_classes: int,
    cfg: Any,
) -> tuple[Trust, dict[str, Any]]:
    """Temperature on validation logits, feature statistics on training features, thresholds on validation.

    ``cfg`` is the run's ``TrustConfig``. Returns the ``Trust`` and a report with ECE/NLL/Brier before and
    after scaling and the reliability curves.
    """
    t = fit_temperature(val_logits, val_labels) if cfg.calibrate else 1.0
    stats = None
    if cfg.ood and train_feats is not None and len(train_feats) >= 2:
        stats = fit_feature_stats(train_feats, train_labels, num_classes, knn_k=cfg.knn_k)
    trust = Trust(t, cfg.ood_score, cfg.ood_tpr, {}, stats)
    if cfg.ood:
        scores = trust.scores(val_logits, val_feats)
        trust.thresholds = {k: threshold_for_tpr(v, cfg.ood_tpr) for k, v in scores.items() if k in SCORES}
    report = {
        "temperature": t,
        "val": {
            "before": calibration_metrics(val_logits, val_labels),
            "after": calibration_metrics(val_logits, val_labels, t),
        },
        "reliability": {
            "before": reliability(val_logits.softmax(1), val_labels),
            "after": reliability(trust.probs(val_logits), val_labels),
        },  # fmt: skip
    }
    return trust, report
