"""Reference statistics for drift monitoring and the distances between a reference and live traffic.

The reference comes from validation data (fitted with the calibration, stored in ``imgclf.json`` under
``drift``): the predicted-class distribution, the calibrated confidence distribution (bin edges at
its deciles, plus 101 quantiles for KS), and the per-dimension mean and variance of the embedding
the classifier sees. The run's task says what "predicted class" and "confidence" mean
(``class_rates`` and ``confidence``: argmax and top probability for single-label; per-label positive rates
under the run's thresholds and the largest label probability for multi-label). Live traffic is compared with it by

- PSI (population stability index) of the predicted classes and of the confidence bins:
  ``sum((p - q) * ln(p / q))``; the usual reading is < 0.1 stable, 0.1-0.25 moderate, > 0.25 major; for
  multi-label runs ``psi_class`` is the largest PSI of one label's positive rate (each label a yes/no
  distribution), so one label that shifts is seen among many that do not;
- KS: the largest gap between the live and reference confidence distribution functions;
- embedding shift: the root mean square over dimensions of the standardised mean difference
  ``(mean_live - mean_ref) / std_ref`` (Cohen's d per dimension: 0.2 is a "small" effect, 0.5 "medium";
  the default threshold 0.3 sits above the sampling noise of a 100-image window, about 0.1).

Example:
    >>> ref = reference_stats(probs, feats)                 # doctest: +SKIP
    >>> drift_scores(ref, live_probs, live_feats)           # doctest: +SKIP
    {'n': 500, 'psi_class': 0.012, 'psi_confidence': 0.03, 'ks_confidence': 0.05, 'embedding_shift': 0.11}
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ImgclfError
from ..train.tasks import SingleLabelTask

#: default thresholds past which the server reports (and logs) drift
THRESHOLDS = {"psi_class": 0.2, "psi_confidence": 0.2, "ks_confidence": 0.2, "embedding_shift": 0.3}
_EPS = 1e-4


def _decisions(probs: np.ndarray, task: Any) -> tuple[np.ndarray, np.ndarray]:
    """(K,) class rates and (N,) confidences of ``probs`` (N, K) under ``task`` (a ``train.tasks`` task, or the
    run's ``eval.trust.Trust``, which adds its multi-label decision thresholds; default single-label)."""
    t = torch.from_numpy(probs)
    task = task or SingleLabelTask()
    return task.class_rates(t).numpy().astype(np.float64), task.confidence(t).numpy().astype(np.float64)


def reference_stats(probs: np.ndarray, feats: np.ndarray | None = None, task: Any = None) -> dict[str, Any]:
    """JSON-ready reference statistics of calibrated ``probs`` (N, K) and embeddings ``feats`` (N, D);
    ``task`` (``train.tasks``; default single-label) defines the class rates and confidences."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < 2:
        raise ImgclfError(f"a drift reference needs at least 2 predictions (got {len(probs)})")
    rates, conf = _decisions(probs, task)
    edges = np.unique(np.quantile(conf, np.linspace(0, 1, 11)[1:-1]))  # inner decile edges
    ref: dict[str, Any] = {
        "n": len(probs),
        "class_dist": _r(rates),
        "conf_edges": _r(edges),
        "conf_hist": _r(_hist(conf, edges)),
        "conf_quantiles": _r(np.quantile(conf, np.linspace(0, 1, 101))),
    }
    if feats is not None:
        feats = np.asarray(feats, dtype=np.float64)
        ref["emb_mean"], ref["emb_var"] = _r(feats.mean(0)), _r(feats.var(0))
    return ref


def drift_scores(
    ref: dict[str, Any], probs: np.ndarray, feats: np.ndarray | None = None, task: Any = None
) -> dict[str, Any]:
    """Distances of live ``probs`` (N, K) / ``feats`` (N, D) from ``ref`` (see the module docstring), with the
    class rates and confidences of ``task`` (the run's; default single-label)."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    rates, conf = _decisions(probs, task)
    expected, actual = np.array(ref["class_dist"]), rates[: len(ref["class_dist"])]
    if getattr(task, "multi_label", False):
        out["psi_class"] = max(psi(np.array([e, 1 - e]), np.array([a, 1 - a])) for e, a in zip(expected, actual))
    else:
        out["psi_class"] = psi(expected, actual)
    edges = np.array(ref["conf_edges"])
    out["psi_confidence"] = psi(np.array(ref["conf_hist"]), _hist(conf, edges))
    out["ks_confidence"] = ks_to_quantiles(conf, np.array(ref["conf_quantiles"]))
    if feats is not None and "emb_mean" in ref:
        mean, var = np.array(ref["emb_mean"]), np.array(ref["emb_var"])
        var = np.maximum(var, 1e-3 * var.mean() + 1e-12)  # dead (constant) dimensions would divide by zero
        d = (np.asarray(feats, dtype=np.float64).mean(0) - mean) / np.sqrt(var)
        out["embedding_shift"] = float(np.sqrt((d**2).mean()))
    return {key: round(v, 6) if isinstance(v, float) else v for key, v in out.items()}


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (both smoothed by 1e-4)."""
    p, q = np.clip(expected, _EPS, None), np.clip(actual, _EPS, None)
    p, q = p / p.sum(), q / q.sum()
    return float(((q - p) * np.log(q / p)).sum())


def ks_to_quantiles(x: np.ndarray, quantiles: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the sample ``x`` and the distribution given by its quantiles.

    The reference CDF is the piecewise-linear one through (quantile, level), with steps where quantiles
    tie (saturated confidences put many values at exactly 1.0). Both CDFs are compared at every sample
    value and every quantile, from the right and from the left, so atoms shared by both sides cost nothing.
    """
    xs = np.sort(np.asarray(x, dtype=np.float64))
    q = np.asarray(quantiles, dtype=np.float64)
    levels = np.linspace(0, 1, len(q))
    n = len(xs)
    pts = np.unique(np.concatenate([xs, q]))

    def ref_cdf(p: np.ndarray, right: bool) -> np.ndarray:
        inside = np.interp(p, q, levels)
        hi = np.searchsorted(q, p, side="right")  # quantiles <= p
        lo = np.searchsorted(q, p, side="left")  # quantiles < p
        tied = hi > lo  # p is a quantile value (possibly several): a step
        step = levels[np.maximum(hi - 1, 0)] if right else levels[np.maximum(lo - 1, 0)] * (lo > 0)
        out = np.where(tied, step, inside)
        out = np.where(p < q[0], 0.0, out)
        return np.where(p > q[-1], 1.0, out)

    right = np.abs(np.searchsorted(xs, pts, side="right") / n - ref_cdf(pts, True))
    left = np.abs(np.searchsorted(xs, pts, side="left") / n - ref_cdf(pts, False))
    return float(max(right.max(), left.max()))


def drifted(scores: dict[str, Any], thresholds: dict[str, float] | None = None) -> list[str]:
    """The statistics past their threshold (empty: no drift)."""
    th = {**THRESHOLDS, **(thresholds or {})}
    return [k for k, t in th.items() if scores.get(k) is not None and scores[k] > t]


def _hist(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, conf, side="right"), minlength=len(edges) + 1) / max(len(conf), 1)


def _r(a: np.ndarray) -> list[float]:
    return [round(float(v), 7) for v in a]
