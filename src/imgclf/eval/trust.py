"""Trust settings of a run: the calibration, the decision rule, and the OOD thresholds and statistics.

Fitted after training (``fit_trust``) on the validation split (calibration: minimum NLL, one temperature for
single-label runs, a temperature (and a Platt bias) per class for multi-label runs; multi-label decision
thresholds: tuned per class on the calibrated probabilities (``eval.thresholds``); OOD thresholds:
``trust.ood_tpr`` of validation images accepted) and on training features (Mahalanobis class means and shared
precision, k-NN bank); stored in ``imgclf.json`` (``calibration``, ``decision``, ``ood``) and
``ood.safetensors``; applied by eval, predict, export and serve through ``Trust``.

Example:
    >>> trust = Trust.load("runs/x", art)                      # doctest: +SKIP
    >>> probs = trust.probs(logits); score, unknown = trust.unknown(logits, feats)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ImgclfError
from ..io import save_safetensors
from ..rundir import OOD_FILE
from ..train.tasks import Decision, SingleLabelTask, Task, task_from_json
from .calibration import (
    calibration_metrics,
    fit_per_class,
    fit_temperature,
    multilabel_calibration_metrics,
    multilabel_reliability,
    reliability,
)
from .ood import FEATURE_SCORES, SCORES, FeatureStats, fit_feature_stats, logit_scores, threshold_for_tpr


@dataclass
class Trust:
    """Calibration, decision rule, OOD thresholds (one per score) and the feature statistics of one run.

    ``temperature`` is one value (single-label) or one per class (multi-label), ``bias`` the per-class Platt
    offsets of a multi-label run or the prior shift of a single-label run (``eval.priors``; None: temperature
    scaling only), ``decision`` the multi-label decision rule (None: argmax for single-label, threshold 0.5 for
    multi-label).
    """

    temperature: float | list[float] = 1.0
    ood_score: str = "energy"
    tpr: float = 0.95
    thresholds: dict[str, float] = field(default_factory=dict)
    stats: FeatureStats | None = None
    task: Task = field(default_factory=SingleLabelTask)  # the head's activation and decision
    bias: list[float] | None = None
    decision: Decision | None = None
    priors: dict[str, Any] | None = None  # single-label: the deployment priors behind ``bias`` (``eval.priors``)

    @property
    def needs_features(self) -> bool:
        return self.ood_score in FEATURE_SCORES and self.stats is not None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) calibrated probabilities: the task's activation with the run's calibration."""
        return self.task.probs(logits, self.temperature, self.bias)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """The task's decisions of calibrated ``probs``: (N,) class indices, or (N, K) bool label sets."""
        return self.task.decide(probs, self.decision)

    def class_rates(self, probs: torch.Tensor) -> torch.Tensor:
        """(K,) share of images decided for each class (multi-label: per-label positive rates; drift)."""
        return self.task.class_rates(probs, self.decision)

    def confidence(self, probs: torch.Tensor) -> torch.Tensor:
        """(N,) confidence of each decision (drift)."""
        return self.task.confidence(probs)

    @property
    def multi_label(self) -> bool:
        return self.task.multi_label

    def _logit_scores(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return logit_scores(logits, self.temperature, self.bias, self.task.multi_label)

    def scores(self, logits: torch.Tensor, feats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every OOD score available from these outputs (higher = more in-distribution)."""
        out = self._logit_scores(logits)
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
            s = self._logit_scores(logits)[name]
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
    def of(cls, art: Any) -> Trust:
        """The run's task, calibration and decision rule from its ``imgclf.json`` alone (no OOD statistics):
        what turns its logits into calibrated probabilities and answers."""
        task = task_from_json(art.task)
        decision = Decision.from_json(art.decision) if task.multi_label else None
        return cls(art.temperature, task=task, bias=art.calibration.get("bias"), decision=decision,
                   priors=None if task.multi_label else art.calibration.get("priors"))  # fmt: skip

    @classmethod
    def load(cls, run_dir: str | Path, art: Any, device: str = "cpu") -> Trust:
        """``of(art)`` plus the OOD settings (``ood``) and statistics (``ood.safetensors``); identity if absent."""
        ood = art.ood or {}
        stats = None
        if ood.get("feature_stats"):
            from safetensors.torch import load_file

            path = Path(run_dir) / ood["feature_stats"]
            if not path.is_file():
                raise ImgclfError(f"{run_dir}: OOD statistics {path.name} are missing (retrain or drop OOD)")
            stats = FeatureStats.from_state(load_file(str(path), device=device), ood.get("knn_k") or 10)
        trust = cls.of(art)
        trust.ood_score, trust.tpr, trust.stats = ood.get("ood_score", "energy"), float(ood.get("tpr", 0.95)), stats
        trust.thresholds = {k: float(v) for k, v in (ood.get("thresholds") or {}).items()}
        return trust


def with_priors(trust: Trust, art: Any, spec: str | None) -> Trust:
    """``trust`` with the prior shift for deployment priors ``spec`` (``eval.priors.prior_shift``) instead of the
    run's own; ``spec`` None keeps the run's, ``none`` removes it."""
    if spec is None:
        return trust
    from .priors import prior_shift

    bias, record = prior_shift(art, spec)
    return replace(trust, bias=bias, priors=record)


def fit_trust(
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    val_feats: torch.Tensor | None,
    train_feats: torch.Tensor | None,
    train_labels: torch.Tensor | None,
    num_classes: int,
    cfg: Any,
    task: Task | None = None,
    class_names: list[str] | None = None,
) -> tuple[Trust, dict[str, Any]]:
    """Calibration and (multi-label) decision thresholds on validation outputs, feature statistics on training
    features, OOD thresholds on validation.

    ``cfg`` is the run's ``TrustConfig``; ``task`` the run's (default single-label). Returns the ``Trust`` and a
    report with the calibration metrics before and after scaling, the reliability curves and, for multi-label
    runs, the tuned thresholds (``decision``).
    """
    task = task or SingleLabelTask()
    report: dict[str, Any] = {}
    if task.multi_label:
        trust = _fit_multilabel(val_logits, val_labels, task, cfg, class_names, report)
    else:
        if cfg.calibration_method == "platt":
            raise ImgclfError("trust.calibration_method platt applies to multi-label runs (single-label runs fit "
                              "one temperature)")  # fmt: skip
        t = fit_temperature(val_logits, val_labels) if cfg.calibrate else 1.0
        trust = Trust(t, task=task)
        report.update(temperature=t, val={"before": calibration_metrics(val_logits, val_labels),
                                          "after": calibration_metrics(val_logits, val_labels, t)})  # fmt: skip
        report["reliability"] = {"before": reliability(val_logits.softmax(1), val_labels),
                                 "after": reliability(trust.probs(val_logits), val_labels)}  # fmt: skip
    if cfg.ood and train_feats is not None and len(train_feats) >= 2:
        trust.stats = fit_feature_stats(train_feats, train_labels, num_classes, knn_k=cfg.knn_k)
    trust.ood_score = cfg.ood_score if cfg.ood_score != "auto" else ("knn" if task.multi_label else "energy")
    trust.tpr = cfg.ood_tpr
    if cfg.ood:
        scores = trust.scores(val_logits, val_feats)
        trust.thresholds = {k: threshold_for_tpr(v, cfg.ood_tpr) for k, v in scores.items() if k in SCORES}
    return trust, report


def _fit_multilabel(logits: torch.Tensor, labels: torch.Tensor, task: Task, cfg: Any, names: list[str] | None,
                    report: dict[str, Any]) -> Trust:  # fmt: skip
    """Per-class temperature / Platt scaling, then the decision rule on the calibrated validation probabilities."""
    from .thresholds import tune_thresholds

    method = "platt" if cfg.calibration_method == "auto" else cfg.calibration_method
    t, b = fit_per_class(logits, labels, method) if cfg.calibrate else (1.0, None)
    trust = Trust(t, task=task, bias=b)
    report.update(method=method if cfg.calibrate else "none", temperature=t, bias=b,
                  val={"before": multilabel_calibration_metrics(logits, labels),
                       "after": multilabel_calibration_metrics(logits, labels, t, b)})  # fmt: skip
    p = trust.probs(logits)
    report["reliability"] = {"before": multilabel_reliability(logits.float().sigmoid(), labels),
                             "after": multilabel_reliability(p, labels)}  # fmt: skip
    rule = cfg.threshold
    if rule == "top_k":
        trust.decision = Decision("top_k", top_k=cfg.threshold_top_k, objective="top_k")
    elif rule == "fixed":
        trust.decision = Decision("threshold", cfg.threshold_value, objective="fixed")
    else:
        tuned = tune_thresholds(p, labels, rule, cfg.threshold_target if rule != "f1" else None, names)
        trust.decision = Decision("threshold", tuned.thresholds, objective=rule, target=tuned.target)
        report["thresholds"] = {"per_class": tuned.per_class, "notes": tuned.notes}
    return trust


def alternative_k(val_labels: torch.Tensor) -> int:
    """The k of the top-k alternative decision rule: the mean number of labels per validation image, rounded."""
    return max(1, round(float(val_labels.float().sum(1).mean()))) if len(val_labels) else 1


def task_metrics(trust: Trust, o: Any, names: list[str], top_k: int | None = None) -> dict[str, Any]:
    """The run's metrics of outputs ``o`` (``models.inference.Outputs``) with its calibration and decision rule
    (``trust``). Multi-label runs given ``top_k`` also get the decision metrics of the other rules
    (``alternatives``: a fixed 0.5 threshold and the ``top_k`` labels), to show what tuning the thresholds
    gained."""
    task, p, k = trust.task, trust.probs(o.logits), top_k
    m = task.metrics(o.logits, o.labels, names, loss=task.eval_criterion(), probs=p, decision=trust.decision)
    if task.multi_label and top_k and len(o.labels):
        m["decision"] = trust.decision.to_json() if trust.decision is not None else Decision().to_json()
        m["alternatives"] = {}
        for name, d in (("fixed_0.5", Decision()), (f"top_{k}", Decision("top_k", top_k=k))):
            alt = task.metrics(o.logits, o.labels, names, probs=p, decision=d)
            m["alternatives"][name] = {key: alt[key] for key in ("micro_f1", "macro_f1", "samples_f1", "exact_match",
                                                                 "hamming_loss")}  # fmt: skip
    return m


def calibration_report(trust: Trust, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Calibration metrics of ``logits`` against ``labels`` before and after the run's calibration (``trust``)."""
    if trust.task.multi_label:
        return {"before": multilabel_calibration_metrics(logits, labels),
                "after": multilabel_calibration_metrics(logits, labels, trust.temperature, trust.bias)}  # fmt: skip
    return {"before": calibration_metrics(logits, labels), "after": calibration_metrics(logits, labels,
                                                                                      trust.temperature)}  # fmt: skip
