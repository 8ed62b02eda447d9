"""Plots (matplotlib, headless Agg backend), written atomically as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write


def _figure(w: float = 6.4, h: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(w, h), dpi=120)


def lr_find_plot(result: dict[str, Any], path: Path) -> None:
    """Loss (raw and smoothed) against the learning rate on a log axis, with the suggestion marked."""
    plt, fig = _figure()
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
    plt.close(fig)
