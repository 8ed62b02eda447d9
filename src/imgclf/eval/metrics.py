"""Printed tables of metrics (``imgclf.train.metrics.compute_metrics`` computes them)."""

from __future__ import annotations

from typing import Any

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
