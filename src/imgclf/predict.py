"""Top-k predictions of a saved run for images, folders and CSVs, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.sources import scan_inputs
from .errors import ImgclfError
from .eval.inference import infer_run
from .eval.metrics import format_table


@dataclass
class Predictions:
    """One row per decoded input (in input order) plus the inputs that could not be read."""

    rows: list[dict[str, Any]]  # {"path": str, "top": [{"label": str, "prob": float}, ...]}
    skipped: dict[str, str] = field(default_factory=dict)


def predict_run(run_dir: str | Path, inputs: list[str], *, top_k: int = 5, **run_opts: Any) -> Predictions:
    """Batched top-k labels and probabilities for every readable input.

    ``run_opts``: batch_size, num_workers, device, strict_images, progress (see ``infer_run``).
    """
    if top_k < 1:
        raise ImgclfError(f"--top-k must be >= 1 (got {top_k})")
    out, art, samples, skips = infer_run(run_dir, lambda a: scan_inputs(inputs), desc="predict", **run_opts)
    k = min(top_k, art.num_classes)
    probs, idx = out.logits.softmax(-1).topk(k, dim=-1)
    rows = [
        {
            "path": samples.describe(int(i)),
            "top": [{"label": art.class_names[int(c)], "prob": round(float(p), 6)} for p, c in zip(pr, ix)],
        }
        for i, pr, ix in zip(out.indices, probs, idx)
    ]
    return Predictions(rows, dict(skips.items))


def render(preds: Predictions, fmt: str) -> str:
    """``table`` (aligned text), ``csv`` (path,label_1,prob_1,...) or ``json``."""
    if fmt == "json":
        doc = {"predictions": preds.rows, "skipped": [{"path": p, "reason": r} for p, r in preds.skipped.items()]}
        return json.dumps(doc, indent=2)
    k = max((len(r["top"]) for r in preds.rows), default=0)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", *[h for j in range(1, k + 1) for h in (f"label_{j}", f"prob_{j}")]])
        for r in preds.rows:
            w.writerow([r["path"], *[v for t in r["top"] for v in (t["label"], f"{t['prob']:.6f}")]])
        return buf.getvalue()
    if fmt == "table":
        body = [[r["path"], *[f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"]]] for r in preds.rows]
        return format_table(body, ["path", *[f"top{j}" for j in range(1, k + 1)]])
    raise ImgclfError(f"--format must be table, csv or json (got {fmt!r})")
