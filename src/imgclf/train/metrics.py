"""Classification metrics with torchmetrics: top-1/top-5, per-class precision/recall/F1, macro-F1,
balanced accuracy and the confusion matrix (the single-label task's metric set; ``imgclf.cli.output``
prints them).

Example:
    >>> import torch
    >>> m = compute_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), ["a", "b"])
    >>> m["top1"]
    0.5
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def compute_metrics(
    logits: torch.Tensor, targets: torch.Tensor, class_names: list[str], loss: Any = None,
    scores: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Metrics of ``logits`` (N, K) against integer ``targets`` (N) as a JSON-ready dict; ``loss`` is the task's
    evaluation criterion (``(logits, targets) -> scalar``; default cross-entropy). The decisions (accuracy, F1,
    recall, confusion) are the argmax of ``scores`` (N, K) when given (calibrated probabilities with a prior
    shift), else of the logits; the loss is always of the logits."""
    k = len(class_names)
    logits, targets = logits.float().cpu(), targets.long().cpu()
    decided_by = logits if scores is None else scores.float().cpu()
    n = int(targets.numel())
    out: dict[str, Any] = {"n": n, "num_classes": k}
    if n == 0:
        return out
    out["loss"] = float(loss(logits, targets) if loss is not None else F.cross_entropy(logits, targets))
    out["top1"] = float(MulticlassAccuracy(k, top_k=1, average="micro")(decided_by, targets))
    if k > 5:
        out["top5"] = float(MulticlassAccuracy(k, top_k=5, average="micro")(decided_by, targets))
    out["macro_f1"] = float(MulticlassF1Score(k, average="macro")(decided_by, targets))
    prec = MulticlassPrecision(k, average=None)(decided_by, targets)
    rec = MulticlassRecall(k, average=None)(decided_by, targets)
    f1 = MulticlassF1Score(k, average=None)(decided_by, targets)
    support = torch.bincount(targets, minlength=k)
    # balanced accuracy = mean recall over the classes present in the targets (as scikit-learn defines it)
    out["balanced_accuracy"] = float(rec[support > 0].mean())
    out["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, prec, rec, f1, support)
    }
    out["confusion_matrix"] = MulticlassConfusionMatrix(k)(decided_by, targets).tolist()
    return out


def multilabel_metrics(
    probs: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    *,
    decided: torch.Tensor | None = None,
    loss: float | None = None,
    at_k: tuple[int, ...] = (1, 3),
) -> dict[str, Any]:
    """Multi-label metrics of (N, K) probabilities against (N, K) 0/1 ``targets`` as a JSON-ready dict.

    Ranking metrics (no threshold): ``map`` (macro mean average precision over the classes with at least one
    positive), ``map_micro`` (AP of all N x K scores pooled), per-class ``ap``, ``lrap`` (label ranking average
    precision) and ``precision@k`` / ``recall@k`` (of each image's k most probable labels: the share that are
    true, and the share of its true labels found; images without a true label are left out of recall@k).
    Decision metrics of the (N, K) bool ``decided`` label sets (default ``probs >= 0.5``): ``micro_f1``,
    ``macro_f1``, ``samples_f1``, ``exact_match`` (subset accuracy), ``hamming_loss`` and per-class precision,
    recall, F1. A 0/0 ratio counts as 1 (nothing to find and nothing predicted is right; scikit-learn's
    ``zero_division=1``). AP, F1, exact match, Hamming loss and LRAP are torchmetrics'; precision@k, recall@k
    and samples-F1 (which torchmetrics does not have) are computed here, checked against scikit-learn in the tests.
    """
    from torchmetrics.functional.classification import (
        multilabel_average_precision,
        multilabel_exact_match,
        multilabel_f1_score,
        multilabel_hamming_distance,
        multilabel_precision,
        multilabel_ranking_average_precision,
        multilabel_recall,
    )

    k = len(class_names)
    p, y = probs.float().cpu(), targets.cpu().long()
    n = int(len(y))
    out: dict[str, Any] = {"n": n, "num_classes": k, "multi_label": True}
    if n == 0:
        return out
    if loss is not None:
        out["loss"] = float(loss)
    d = (p >= 0.5) if decided is None else decided.cpu().bool()
    support = y.sum(0)  # (K,) positives per class
    present = support > 0
    ap = torch.full((k,), float("nan"))
    if present.any():
        ap[present] = multilabel_average_precision(p[:, present], y[:, present], int(present.sum()), average=None)
    out["map"] = float(ap[present].mean()) if present.any() else float("nan")
    out["map_micro"] = float(multilabel_average_precision(p, y, k, average="micro")) if present.any() else float("nan")
    out["lrap"] = float(multilabel_ranking_average_precision(p, y, k)) if present.any() else float("nan")
    for kk in at_k:
        if kk < k:
            top = p.topk(kk, dim=1).indices
            hits = y.gather(1, top).sum(1).double()  # (N,) true labels among the top kk
            has = y.sum(1) > 0
            out[f"precision@{kk}"] = float((hits[has] / kk).mean()) if has.any() else float("nan")
            out[f"recall@{kk}"] = float((hits[has] / y.sum(1)[has]).mean()) if has.any() else float("nan")
    db = d.long()
    kw = {"threshold": 0.5, "zero_division": 1.0}
    out["micro_f1"] = float(multilabel_f1_score(db, y, k, average="micro", **kw))
    out["macro_f1"] = float(multilabel_f1_score(db, y, k, average="macro", **kw))
    inter, sizes = (db & y).sum(1).double(), (db.sum(1) + y.sum(1)).double()
    out["samples_f1"] = float(torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), torch.ones_like(sizes)).mean())
    out["exact_match"] = float(multilabel_exact_match(db, y, k, threshold=0.5))
    out["hamming_loss"] = float(multilabel_hamming_distance(db, y, k, threshold=0.5, average="micro"))
    out["label_cardinality"] = {"true": float(y.sum(1).double().mean()), "predicted": float(db.sum(1).double().mean())}
    prec = multilabel_precision(db, y, k, average=None, **kw)
    rec = multilabel_recall(db, y, k, average=None, **kw)
    f1 = multilabel_f1_score(db, y, k, average=None, **kw)
    out["per_class"] = {
        name: {"ap": None if a != a else float(a), "precision": float(pr), "recall": float(r), "f1": float(f),
               "support": int(s), "predicted": int(c)}
        for name, a, pr, r, f, s, c in zip(class_names, ap, prec, rec, f1, support, db.sum(0))
    }  # fmt: skip
    return out
