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
    logits: torch.Tensor, targets: torch.Tensor, class_names: list[str], loss: Any = None
) -> dict[str, Any]:
    """Metrics of ``logits`` (N, K) against integer ``targets`` (N) as a JSON-ready dict; ``loss`` is the task's
    evaluation criterion (``(logits, targets) -> scalar``; default cross-entropy)."""
    k = len(class_names)
    logits, targets = logits.float().cpu(), targets.long().cpu()
    n = int(targets.numel())
    out: dict[str, Any] = {"n": n, "num_classes": k}
    if n == 0:
        return out
    out["loss"] = float(loss(logits, targets) if loss is not None else F.cross_entropy(logits, targets))
    out["top1"] = float(MulticlassAccuracy(k, top_k=1, average="micro")(logits, targets))
    if k > 5:
        out["top5"] = float(MulticlassAccuracy(k, top_k=5, average="micro")(logits, targets))
    out["macro_f1"] = float(MulticlassF1Score(k, average="macro")(logits, targets))
    prec = MulticlassPrecision(k, average=None)(logits, targets)
    rec = MulticlassRecall(k, average=None)(logits, targets)
    f1 = MulticlassF1Score(k, average=None)(logits, targets)
    support = torch.bincount(targets, minlength=k)
    # balanced accuracy = mean recall over the classes present in the targets (as scikit-learn defines it)
    out["balanced_accuracy"] = float(rec[support > 0].mean())
    out["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, prec, rec, f1, support)
    }
    out["confusion_matrix"] = MulticlassConfusionMatrix(k)(logits, targets).tolist()
    return out
