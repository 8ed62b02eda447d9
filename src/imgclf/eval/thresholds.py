"""Per-class decision thresholds of a multi-label run, tuned on validation probabilities.

For each class the candidate thresholds are its validation scores (scikit-learn ``precision_recall_curve``:
predict the class when ``p >= threshold``) and the one kept

- ``f1``: maximises the class's F1 (the usual choice; ties go to the higher threshold);
- ``precision``: the lowest threshold whose precision reaches ``target`` (the most recall at that precision);
- ``recall``: the highest threshold whose recall still reaches ``target`` (the most precision at that recall).

The threshold kept is the midpoint between the chosen score and the next lower validation score: the same
decisions on validation, with a margin on both sides for new images (the chosen score itself would put the
weakest accepted positive of validation right on the boundary).

A class with no positive validation image keeps ``fallback`` (0.5), and a ``precision``/``recall`` target no
threshold reaches falls back to the F1 optimum; both are listed in the report (``notes``) so none passes silently.
Thresholds apply to calibrated probabilities, so tune after fitting the calibration.

Example:
    >>> p = torch.tensor([[0.9], [0.8], [0.3], [0.2]]); y = torch.tensor([[1], [1], [0], [1]])
    >>> [round(t, 3) for t in tune_thresholds(p, y).thresholds]  # all three positives found, one false alarm
    [0.2]
    >>> [round(t, 3) for t in tune_thresholds(p, y, "precision", 1.0).thresholds]  # between 0.3 and 0.8
    [0.55]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ImgclfError

OBJECTIVES = ("f1", "precision", "recall")


@dataclass
class Tuned:
    """Thresholds (K,) and per class what they reach on the data they were tuned on."""

    thresholds: tuple[float, ...]
    objective: str
    target: float | None
    per_class: list[dict[str, Any]] = field(default_factory=list)  # {"threshold", "precision", "recall", "f1"}
    notes: list[str] = field(default_factory=list)


def tune_thresholds(
    probs: torch.Tensor,
    targets: torch.Tensor,
    objective: str = "f1",
    target: float | None = None,
    class_names: list[str] | None = None,
    fallback: float = 0.5,
) -> Tuned:
    """Tune one threshold per class on (N, K) calibrated ``probs`` against (N, K) 0/1 ``targets``.

    Raises:
        ImgclfError: an unknown ``objective``, or ``precision``/``recall`` without a ``target`` in (0, 1].
    """
    from sklearn.metrics import precision_recall_curve

    if objective not in OBJECTIVES:
        raise ImgclfError(f"threshold objective must be one of {', '.join(OBJECTIVES)} (got {objective!r})")
    if objective != "f1" and not (target is not None and 0 < target <= 1):
        raise ImgclfError(f"a {objective} objective needs a target in (0, 1] (got {target})")
    p, y = probs.double().cpu().numpy(), targets.cpu().numpy().astype(np.int64)
    names = class_names or [str(i) for i in range(p.shape[1])]
    out = Tuned((), objective, target if objective != "f1" else None)
    ths = []
    for k, name in enumerate(names):
        if y[:, k].sum() == 0:
            ths.append(fallback)
            out.per_class.append({"threshold": fallback, "precision": None, "recall": None, "f1": None})
            out.notes.append(f"{name}: no positive validation image; threshold {fallback}")
            continue
        prec, rec, cand = precision_recall_curve(y[:, k], p[:, k])
        prec, rec = prec[:-1], rec[:-1]  # the last point (recall 0) has no threshold
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
        i = _pick(objective, target, prec, rec, f1)
        if i is None:
            i = int(np.flatnonzero(f1 == f1.max())[-1])
            out.notes.append(f"{name}: no threshold reaches {objective} {target} on validation; the F1 optimum is "
                             f"used (precision {prec[i]:.3f}, recall {rec[i]:.3f})")  # fmt: skip
        th = float(cand[i] + cand[i - 1]) / 2 if i > 0 else float(cand[0])
        ths.append(th)
        out.per_class.append({"threshold": th, "precision": float(prec[i]), "recall": float(rec[i]),
                              "f1": float(f1[i])})  # fmt: skip
    out.thresholds = tuple(ths)
    return out


def _pick(objective: str, target: float | None, prec: np.ndarray, rec: np.ndarray, f1: np.ndarray) -> int | None:
    """Index into the ascending candidate thresholds, or None when the target is out of reach."""
    if objective == "f1":
        return int(np.flatnonzero(f1 == f1.max())[-1])  # ties: the highest threshold (fewer false positives)
    ok = np.flatnonzero((prec if objective == "precision" else rec) >= target)
    if not len(ok):
        return None
    return int(ok[0]) if objective == "precision" else int(ok[-1])
