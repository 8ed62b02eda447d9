"""Classification metrics with torchmetrics: top-1/top-5, per-class precision/recall/F1, macro-F1,
balanced accuracy and the confusion matrix, plus the printed table.

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


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Metrics of ``logits`` (N, K) against integer ``targets`` (N) as a JSON-ready dict."""
    k = len(class_names)
    logits, targets = logits.float().cpu(), targets.long().cpu()
    n = int(targets.numel())
    out: dict[str, Any] = {"n": n, "num_classes": k}
    if n == 0:
        return out
    out["loss"] = float(F.cross_entropy(logits, targets))
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


SUMMARY_KEYS = ("top1", "top5", "macro_f1", "balanced_accuracy", "loss", "n")


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def metrics_table(m: dict[str, Any], title: str = "") -> str:
    """The summary and per-class tables for a metrics dict."""
    rows = []
    for key in SUMMARY_KEYS:
        if key in m:
            v = m[key]
            rows.append([key, str(v) if key == "n" else (f"{v:.4f}" if key == "loss" else _pct(v) + " %")])
    parts = [title] if title else []
    parts.append(format_table(rows, ["metric", "value"]))
    if "per_class" in m:
        pc = [
            [name, _pct(d["precision"]), _pct(d["recall"]), _pct(d["f1"]), str(d["support"])]
            for name, d in m["per_class"].items()
        ]
        parts.append(format_table(pc, ["class", "precision %", "recall %", "f1 %", "support"]))
    return "\n\n".join(parts)


def confusion_table(m: dict[str, Any], class_names: list[str], width: int = 6) -> str:
    """The confusion matrix as text: rows = true class, columns = predicted class index."""
    cm = m.get("confusion_matrix")
    if not cm:
        return ""
    header = ["true \\ pred", *[str(i) for i in range(len(class_names))]]
    rows = [[f"{i} {name}"[:24], *[str(v) for v in row]] for i, (name, row) in enumerate(zip(class_names, cm))]
    return format_table(rows, header)
