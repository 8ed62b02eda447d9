"""Plots written atomically as PNG files, with matplotlib's object API (``matplotlib.figure.Figure``): no
pyplot, no global figure registry and no backend switch, so importing or using imgclf never changes a
notebook user's matplotlib backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write


def figure(w: float = 6.4, h: float = 4.0):
    """A standalone ``Figure`` (w x h inches, 120 dpi); ``savefig`` renders it with Agg."""
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=120)


def lr_find_plot(result: dict[str, Any], path: Path) -> None:
    """Loss (raw and smoothed) against the learning rate on a log axis, with the suggestion marked."""
    fig = figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result["lrs"], result["losses"], color="#bbbbbb", lw=1, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="#1f77b4", lw=2, label="smoothed")
    lr = result["suggested_lr"]
    ax.axvline(lr, color="#d62728", ls="--", lw=1.5, label=f"suggested {lr:.2g} (steepest fall)")
    ax.axvline(result["min_loss_lr"], color="#999999", ls=":", lw=1, label=f"min loss at {result['min_loss_lr']:.2g}")
    ax.set_xscale("log")
    lo, hi = min(result["smoothed"]), max(result["smoothed"][: max(3, len(result["smoothed"]) // 10)])
    ax.set_ylim(lo - 0.1 * abs(lo), hi + 0.5 * (hi - lo) + 1e-6)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['model']} ({result['strategy']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (for embedding), then closed."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def training_curves(rows: list[dict[str, Any]]) -> bytes:
    """Train/val loss and val top-1 (raw and EMA) per epoch; val mAP instead for multi-label runs (no top-1)."""
    fig = figure(9.0, 3.4)
    ep = [r["epoch"] for r in rows]
    ax = fig.add_subplot(1, 2, 1)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss"), ("ema_val_loss", "val loss (EMA)")):
        if any(key in r for r in rows):
            ax.plot(ep, [r.get(key, float("nan")) for r in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    keys, title = (("val_top1", "val top-1"), ("ema_val_top1", "val top-1 (EMA)")), "validation accuracy (%)"
    if not any("val_top1" in r for r in rows) and any("val_map" in r for r in rows):  # multi-label history rows
        keys, title = (("val_map", "val mAP"), ("ema_val_map", "val mAP (EMA)")), "validation mAP (%)"
    for key, label in keys:
        if any(key in r for r in rows):
            ax.plot(ep, [100 * r.get(key, float("nan")) for r in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def recall_vs_frequency(counts: list[int], recall: list[float], names: list[str]) -> bytes:
    """Per-class recall (%) against the number of training images of the class (log scale), each point named:
    on long-tailed data the rare classes sit at the bottom left when the classifier favours frequent ones."""
    import numpy as np

    n, r = np.maximum(np.asarray(counts, dtype=float), 1), 100 * np.asarray(recall, dtype=float)
    fig = figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(n, r, color="#1f77b4", zorder=3)
    if len(names) <= 40:  # beyond that the names cover each other
        for x, y, name in zip(n, r, names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ratio = n.max() / n.min()
    ax.set_xscale("log")
    ax.set_ylim(min(-2, r.min() - 5), 102)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("recall %")
    ax.set_title(f"recall against class frequency (imbalance ratio {ratio:.0f}:1)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def confusion_heatmap(cm: list[list[int]], names: list[str]) -> bytes:
    """Row-normalised confusion matrix with counts."""
    import numpy as np

    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    return _count_heatmap(m, norm, norm, names, "Blues", ("predicted", "true"), "fraction of the true class", True)


def _count_heatmap(counts: Any, norm: Any, shown: Any, names: list[str], cmap: Any, axes: tuple[str, str],
                   bar: str, diagonal_white: bool) -> bytes:  # fmt: skip
    """A K x K heatmap of ``shown`` (``norm``, possibly masked) with the ``counts`` written in the cells (up to 25
    classes) and the class names as ticks (up to 60); ``axes`` = (x label, y label), ``bar`` the colour bar's."""
    k = len(names)
    size = min(12.0, 2.5 + 0.45 * k)
    fig = figure(size, size * 0.85)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
    if k <= 60:
        ax.set_xticks(range(k), [n[:14] for n in names], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), [n[:14] for n in names], fontsize=8)
    else:  # too many to label: the tables next to the plot name them
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    white = norm[i, j] > 0.5 and (diagonal_white or i != j)
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if white else "black")  # fmt: skip
    fig.colorbar(im, fraction=0.046, pad=0.04, label=bar)
    fig.tight_layout()
    return png_bytes(fig)


def reliability_diagram(
    before: dict[str, list[float]],
    after: dict[str, list[float]],
    t: float = 1.0,
    *,
    after_title: str | None = None,
    pooled: bool = False,
) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling (``t``).

    ``after_title`` replaces the right panel's title (multi-label runs: per-class scaling, no single ``t``);
    ``pooled``: the bins hold pooled label probabilities of a multi-label run, so the axes read "label
    probability" and "fraction positive" (``calibration.multilabel_reliability``)."""
    xlabel, ylabel = ("label probability", "fraction positive") if pooled else ("confidence", "accuracy")
    fig = figure(8.0, 3.6)
    after_title = after_title or f"after temperature scaling (T = {t:.2f})"
    for i, (rel, title) in enumerate(((before, "before"), (after, after_title))):
        ax = fig.add_subplot(1, 2, i + 1)
        mids = [(lo + hi) / 2 for lo, hi in zip(rel["lower"], rel["upper"])]
        width = rel["upper"][0] - rel["lower"][0]
        acc = [a if c else 0 for a, c in zip(rel["accuracy"], rel["count"])]
        ax.bar(mids, acc, width=width * 0.95, color="#1f77b4", alpha=0.8, label=ylabel)
        conf = [c if n else 0 for c, n in zip(rel["confidence"], rel["count"])]
        ax.bar(mids, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width * 0.95, color="#d62728", alpha=0.35,
               label=f"gap to {xlabel}")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return png_bytes(fig)


def ood_histograms(scores: dict[str, tuple[Any, Any]], thresholds: dict[str, float]) -> bytes:
    """Per OOD score: histograms of in-distribution and OOD scores, with the threshold."""
    import numpy as np

    n = len(scores)
    fig = figure(3.2 * n, 3.0)
    for i, (name, (ind, ood)) in enumerate(scores.items()):
        ax = fig.add_subplot(1, n, i + 1)
        both = np.concatenate([np.asarray(ind), np.asarray(ood)])
        bins = np.linspace(np.percentile(both, 0.5), np.percentile(both, 99.5), 40)
        ax.hist(np.asarray(ind), bins=bins, alpha=0.6, label="in-distribution", density=True)
        ax.hist(np.asarray(ood), bins=bins, alpha=0.6, label="OOD", density=True)
        if name in thresholds:
            ax.axvline(thresholds[name], color="k", ls="--", lw=1, label="threshold")
        ax.set_title(name, fontsize=10)
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def pr_curves(
    curves: list[dict[str, Any]], micro: dict[str, Any] | None = None, point_label: str = "decision threshold"
) -> bytes:
    """Precision against recall, one curve per class, with each class's operating point as a dot.

    ``curves``: dicts with ``name``, ``precision``, ``recall`` (as ``sklearn.metrics.precision_recall_curve``
    returns them), ``ap`` and ``point`` (the (recall, precision) of the run's decision rule, or None); ``micro``:
    the same for all label probabilities pooled (drawn dashed black)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20" if len(curves) > 10 else "tab10"]
    fig = figure(8.4, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(curves):
        color = cmap(i % cmap.N)
        ax.plot(c["recall"], c["precision"], color=color, lw=1.4, drawstyle="steps-post",
                label=f"{c['name'][:18]} (AP {100 * c['ap']:.1f})")  # fmt: skip
        if c.get("point") is not None:
            ax.plot(*c["point"], "o", color=color, ms=6, mec="k", mew=0.6)
    if micro is not None:
        ax.plot(micro["recall"], micro["precision"], "k--", lw=2, drawstyle="steps-post",
                label=f"micro-average (AP {100 * micro['ap']:.1f})")  # fmt: skip
        if micro.get("point") is not None:
            ax.plot(*micro["point"], "o", color="k", ms=7)
    ax.plot([], [], "o", color="#999999", mec="k", mew=0.6, label=point_label)  # legend entry for the dots
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.subplots_adjust(left=0.08, right=0.68, bottom=0.11, top=0.96)
    return png_bytes(fig)


def cooccurrence_heatmap(counts: Any, names: list[str]) -> bytes:
    """Label co-occurrence of a multi-label data set: colour P(column | row) (the share of the row label's
    images that also carry the column label), text the counts; the diagonal (grey) is each label's support."""
    import numpy as np
    from matplotlib import colormaps

    m = np.asarray(counts, dtype=float)
    support = np.diag(m).copy()
    norm = m / np.maximum(support[:, None], 1)
    cmap = colormaps["Blues"].with_extremes(bad="#e3e6ea")  # the masked diagonal
    shown = np.ma.masked_array(norm, mask=np.eye(len(names), dtype=bool))
    return _count_heatmap(m, norm, shown, names, cmap, ("also labelled", "label"), "P(column label | row label)",
                          False)  # fmt: skip


def pareto_plot(doc: dict[str, Any], path: Path) -> None:
    """Probe accuracy against latency (batch ``doc["batch_sizes"][0]``, log axis) per architecture, the Pareto front
    joined, and below, on the same axis, the architectures timed for speed only; without any probe accuracy, GMACs
    against latency. ``doc``: ``backbones.benchmark_backbones``'s result."""
    from matplotlib.ticker import ScalarFormatter

    b, rows = doc["batch_sizes"][0], doc["rows"]
    scored = [r for r in rows if r["probe_top1"] is not None]
    timed = [r for r in rows if r["probe_top1"] is None] if scored else []
    fig = figure(7.5, 5.2 if timed else 4.5)
    grid = fig.add_gridspec(2 if timed else 1, 1, height_ratios=[4, 1] if timed else [1])
    ax = fig.add_subplot(grid[0])
    y = (lambda r: 100 * r["probe_top1"]) if scored else (lambda r: r["gmacs"])
    shown = scored or rows
    front = sorted((r for r in shown if r["arch"] in doc["pareto"]), key=lambda r: r["latency_ms"][b])
    ax.scatter([r["latency_ms"][b] for r in shown], [y(r) for r in shown], color="#1f77b4", zorder=3)
    if front:
        ax.plot([r["latency_ms"][b] for r in front], [y(r) for r in front], color="#d62728", lw=1.5, zorder=2,
                label="Pareto front")  # fmt: skip
    for r in shown:
        ax.annotate(r["arch"], (r["latency_ms"][b], y(r)), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes = [ax]
    if timed:
        low = fig.add_subplot(grid[1], sharex=ax)
        low.scatter([r["latency_ms"][b] for r in timed], [0] * len(timed), marker="x", color="#777777")
        for i, r in enumerate(sorted(timed, key=lambda r: r["latency_ms"][b])):
            low.annotate(r["arch"], (r["latency_ms"][b], 0), fontsize=6, rotation=20, xytext=(3, 3 + 15 * (i % 2)),
                         textcoords="offset points")  # fmt: skip
        low.set_yticks([])
        low.set_ylim(-0.5, 4)
        low.set_ylabel("speed\nonly", fontsize=8)
        axes.append(low)
    choice = (doc.get("choice") or {}).get("latency_ms")
    for a in axes:
        if choice:
            a.axvline(choice, color="#999999", ls="--", lw=1, label=f"budget {choice} ms" if a is ax else None)
        a.set_xscale("log")
        a.xaxis.set_major_formatter(ScalarFormatter())
        a.xaxis.set_minor_formatter(ScalarFormatter())
        a.tick_params(axis="x", which="minor", labelsize=7)
        a.grid(True, which="both", alpha=0.3)
    if front or choice:
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel(f"latency at batch {b} (ms, {', '.join(sorted({r['runtime'] for r in rows}))})")
    ax.set_ylabel("linear-probe top-1 (%)" if scored else "GMACs")
    ax.set_title("backbones on this machine" + (f" and {doc['data']}" if scored else ""))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def robustness_heatmap(doc: dict[str, Any]) -> bytes:
    """Top-1 per corruption (rows) and severity (columns) of ``eval.shift.evaluate_shift``, with the clean top-1
    as the first column and the values printed."""
    import numpy as np

    names = list(doc["per_corruption"])
    sev = sorted({r["severity"] for r in doc["rows"]})
    acc = {(r["corruption"], r["severity"]): r["top1"] for r in doc["rows"]}
    m = np.array([[doc["clean"]["top1"], *[acc.get((n, s), np.nan) for s in sev]] for n in names])
    fig = figure(1.6 + 0.9 * (len(sev) + 1), 1.0 + 0.38 * len(names))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sev) + 1), ["clean", *[str(s) for s in sev]])
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set_xlabel("severity")
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="top-1")
    fig.tight_layout()
    return png_bytes(fig)
