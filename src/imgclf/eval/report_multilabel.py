"""The multi-label sections of ``report.html`` (``report.write_report`` builds them for runs whose task is
multi-label): summary cards, per-class AP / threshold table, the decision rules compared, precision-recall
curves with each class's operating point, label co-occurrence, per-class calibration and top losses."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifact import Artifact
from ..data.sources import Samples
from .calibration import multilabel_reliability
from .predictions import Saved
from .report import _cam_picture, _img, _pct, _section, _table
from .trust import Trust

_METHODS = {"platt": "Platt (per class)", "temperature": "temperature (per class)", "none": "none"}


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _cards(cards: list[tuple[str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>' for k, v in cards)
        + "</div>"
    )


def decision_text(decision: dict | None) -> tuple[str, str]:
    """(short, long) description of a multi-label decision rule (``imgclf.json`` ``decision``)."""
    d = decision or {"rule": "threshold", "thresholds": 0.5, "objective": "fixed"}
    if d.get("rule") == "top_k":
        k = int(d.get("top_k", 1))
        return f"top-{k}", f"the {k} most probable labels of each image"
    t, objective, target = d.get("thresholds", 0.5), d.get("objective", "fixed"), d.get("target")
    if objective == "f1":
        return "tuned (F1)", "per-class thresholds tuned for F1 on validation"
    if objective in ("precision", "recall"):
        goal = f"{objective} ≥ {target:.2f}" if target is not None else objective
        return f"tuned ({goal})", f"per-class thresholds tuned for {goal} on validation"
    if isinstance(t, list) and len(set(t)) > 1:
        return "fixed (per class)", "fixed per-class thresholds"
    value = float(t[0] if isinstance(t, list) else t)
    return f"fixed {value:g}", f"a fixed threshold of {value:g} on every class"


def class_thresholds(decision: dict | None, k: int) -> list[float | None]:
    """The (K,) decision thresholds of a multi-label run (None for each class under a top-k rule)."""
    d = decision or {}
    if d.get("rule") == "top_k":
        return [None] * k
    t = d.get("thresholds", 0.5)
    return [float(x) for x in t] if isinstance(t, list) else [float(t)] * k


def _multilabel_summary(art: Artifact) -> str:
    m, cal = art.metrics, art.calibration
    split = "test" if "test" in m else "val"
    s, c = m[split], cal.get(split) or {}
    short, long = decision_text(art.decision)
    cards = [
        (f"{split} mAP", _pct(s.get("map"))),
        ("micro-F1", _pct(s.get("micro_f1"))),
        ("macro-F1", _pct(s.get("macro_f1"))),
        ("exact match", _pct(s.get("exact_match"))),
        ("calibration", _METHODS.get(cal.get("method", "none"), str(cal.get("method")))),
        (
            f"pooled ECE ({split}) before → after",
            f"{_pct(c.get('before', {}).get('ece'))} → {_pct(c.get('after', {}).get('ece'))}",
        ),
        ("decision rule", short),
    ]
    rows = []
    for name in ("val", "test"):
        if name in m:
            x, c = m[name], cal.get(name) or {}
            b, a = c.get("before", {}), c.get("after", {})
            rows.append(
                [
                    name,
                    x["n"],
                    _pct(x.get("map")),
                    _pct(x.get("micro_f1")),
                    _pct(x.get("macro_f1")),
                    _pct(x.get("samples_f1")),
                    _pct(x.get("exact_match")),
                    _pct(x.get("hamming_loss")),
                    _num(b.get("nll"), 4),
                    _num(a.get("nll"), 4),
                    _pct(b.get("ece")),
                    _pct(a.get("ece")),
                ]
            )
    header = "split|images|mAP|micro-F1|macro-F1|samples-F1|exact match|Hamming loss|NLL|NLL (cal.)|ECE|ECE (cal.)"
    table = _table(header.split("|"), rows)
    card = s.get("label_cardinality") or {}
    note = (
        f'<p class="note">Decision rule: {html.escape(long)}. Labels per {split} image: '
        f"{_num(card.get('true'), 2)} true, {_num(card.get('predicted'), 2)} predicted. "
        "ECE and NLL are over every (image, label) probability pooled.</p>"
    )
    return _cards(cards) + table + note


def _multilabel_per_class(art: Artifact, split: str) -> str:
    """Per-class table, worst AP first (classes without a positive image, so without an AP, last)."""
    per = art.metrics[split]["per_class"]
    thresholds = class_thresholds(art.decision, len(art.class_names))
    rows = []
    for name, t in zip(art.class_names, thresholds):
        d = per.get(name, {})
        rows.append(
            (
                d.get("ap"),
                [
                    name,
                    d.get("support", 0),
                    d.get("predicted", "–"),
                    _pct(d.get("ap")),
                    _pct(d.get("precision")),
                    _pct(d.get("recall")),
                    _pct(d.get("f1")),
                    _num(t),
                ],
            )
        )
    rows.sort(key=lambda r: (r[0] is None, r[0] if r[0] is not None else 0.0))
    return _table(
        ["class", "support", "predicted", "AP", "precision", "recall", "F1", "threshold"], [r for _, r in rows]
    )


def _decision_rules(art: Artifact) -> str:
    """The run's decision rule against a fixed 0.5 threshold and top-k, per split (``metrics["alternatives"]``)."""
    keys = ("micro_f1", "macro_f1", "samples_f1", "exact_match", "hamming_loss")
    short, _ = decision_text(art.decision)
    rows = []
    for split in ("val", "test"):
        m = art.metrics.get(split)
        if not m or "alternatives" not in m:
            continue
        rows.append([split, f"this run: {short}", *(_pct(m.get(k)) for k in keys)])
        for name, alt in m["alternatives"].items():
            label = name.replace("fixed_", "fixed ").replace("top_", "top-")
            rows.append([split, label, *(_pct(alt.get(k)) for k in keys)])
    if not rows:
        return '<p class="note">No decision-rule comparison in the metrics (retrain to get one).</p>'
    note = (
        '<p class="note">Thresholds are tuned on the validation split, so their gain there is optimistic; '
        "the test split (when there is one) shows what carries over. Top-k takes the k most probable labels, "
        "k = the mean number of labels per validation image.</p>"
    )
    header = ["split", "rule", "micro-F1", "macro-F1", "samples-F1", "exact match", "Hamming loss"]
    return _table(header, rows) + note


def pr_curve_data(
    probs: torch.Tensor, labels: torch.Tensor, decided: torch.Tensor, names: list[str], max_classes: int = 20
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    """Precision-recall curves of (N, K) ``probs`` against (N, K) 0/1 ``labels`` (scikit-learn), with each
    class's operating point under the (N, K) bool ``decided`` label sets.

    Returns the per-class curves (every class with a positive image when there are at most ``max_classes``
    of them, else the ``max_classes // 2`` with the lowest AP), the micro-average curve and the names of the
    classes without a positive image (no curve)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    p, y, d = probs.float().numpy(), labels.numpy() > 0.5, decided.numpy().astype(bool)

    def curve(name: str, pk, yk, dk) -> dict[str, Any]:
        precision, recall, _ = precision_recall_curve(yk, pk)
        tp, n_pred = int((dk & yk).sum()), int(dk.sum())
        point = (tp / int(yk.sum()), tp / n_pred if n_pred else 1.0)
        return {
            "name": name,
            "precision": precision,
            "recall": recall,
            "ap": float(average_precision_score(yk, pk)),
            "point": point,
        }

    curves = [curve(n, p[:, k], y[:, k], d[:, k]) for k, n in enumerate(names) if y[:, k].any()]
    missing = [n for k, n in enumerate(names) if not y[:, k].any()]
    if len(curves) > max_classes:
        curves = sorted(curves, key=lambda c: c["ap"])[: max_classes // 2]
    micro = curve("micro-average", p.ravel(), y.ravel(), d.ravel()) if y.any() else None
    return curves, micro, missing


def _pr_section(art: Artifact, trust: Trust, saved: Saved | None) -> str:
    from ..plots import pr_curves

    if saved is None:
        return '<p class="note">No saved validation predictions (retrain, or the file was removed).</p>'
    probs = trust.probs(saved.logits.float())
    curves, micro, missing = pr_curve_data(probs, saved.labels, trust.decide(probs), art.class_names)
    if micro is None:
        return '<p class="note">No positive label in the validation split: no precision-recall curve.</p>'
    short, _ = decision_text(art.decision)
    k = len(art.class_names)
    shown = "every class" if len(curves) + len(missing) == k else f"the {len(curves)} classes with the lowest AP"
    note = (
        f'<p class="note">Validation split, calibrated probabilities; {shown} and the micro-average '
        f"(all labels pooled). Dots: the operating point of the run's decision rule, {html.escape(short)}."
    )
    if missing:
        note += f" No positive validation image (no curve): {html.escape(', '.join(missing[:20]))}."
    return _img(pr_curves(curves, micro, f"decision rule: {short}"), "precision-recall curves") + note + "</p>"


def _cooccurrence_section(art: Artifact, saved: Saved | None) -> str:
    from ..plots import cooccurrence_heatmap

    if saved is None:
        return '<p class="note">No saved validation predictions (retrain, or the file was removed).</p>'
    y = (saved.labels > 0.5).double()
    counts = (y.T @ y).long()  # (K, K): images carrying both labels; diagonal: support
    names = art.class_names
    pairs = sorted(
        (
            (
                names[i],
                names[j],
                int(counts[i, j]),
                float(counts[i, j] / counts[i, i]),
                float(counts[i, j] / counts[j, j]),
            )
            for i in range(len(names))
            for j in range(i + 1, len(names))
            if counts[i, j]
        ),
        key=lambda r: -r[2],
    )[:10]
    table = _table(
        ["label A", "label B", "images with both", "P(B | A)", "P(A | B)"],
        [[a, b, c, _pct(pb), _pct(pa)] for a, b, c, pb, pa in pairs],
    )
    note = (
        f'<p class="note">{len(y)} validation images; {int((y.sum(1) == 0).sum())} without any label. '
        "Colour: the share of the row label's images that also carry the column label; numbers: image counts "
        "(diagonal: each label's support).</p>"
    )
    return (
        _img(cooccurrence_heatmap(counts.tolist(), names), "label co-occurrence")
        + note
        + (table if pairs else '<p class="note">No two labels appear together.</p>')
    )


def _multilabel_calibration(art: Artifact, trust: Trust, saved: Saved | None, rel: dict | None) -> str:
    from ..plots import reliability_diagram

    cal = art.calibration
    method = cal.get("method", "none")
    if rel is None and saved is not None:
        rel = {
            "before": multilabel_reliability(saved.logits.float().sigmoid(), saved.labels),
            "after": multilabel_reliability(trust.probs(saved.logits.float()), saved.labels),
        }
    after = f"after per-class {'Platt' if method == 'platt' else 'temperature'} scaling"
    if method == "none":
        after = "after (no calibration fitted)"
    body = (
        _img(reliability_diagram(rel["before"], rel["after"], after_title=after, pooled=True), "reliability")
        if rel
        else '<p class="note">No calibration data.</p>'
    )
    body += (
        '<p class="note">Reliability of every (image, label) probability pooled. Per class: the fitted '
        "temperature T and Platt bias b (probability = sigmoid(logit / T + b)) and its ECE.</p>"
    )
    k = len(art.class_names)
    t = trust.temperature if isinstance(trust.temperature, list) else [trust.temperature] * k
    b = cal.get("bias") or [None] * k
    v = cal.get("val") or {}
    eb = (v.get("before") or {}).get("ece_per_class") or [None] * k
    ea = (v.get("after") or {}).get("ece_per_class") or [None] * k
    rows = [[n, _num(t[i]), _num(b[i]), _pct(eb[i]), _pct(ea[i])] for i, n in enumerate(art.class_names)]
    summary = [
        [
            name,
            _pct(c.get("before", {}).get("ece_classwise")),
            _pct(c.get("after", {}).get("ece_classwise")),
            _num(c.get("before", {}).get("brier"), 4),
            _num(c.get("after", {}).get("brier"), 4),
        ]
        for name in ("val", "test")
        if (c := cal.get(name))
    ]
    return (
        body
        + _table(["split", "class-wise ECE", "class-wise ECE (cal.)", "Brier", "Brier (cal.)"], summary)
        + _table(["class", "T", "b", "ECE (val)", "ECE (val, cal.)"], rows)
    )


def _multilabel_parts(
    art: Artifact, trust: Trust, saved: Saved | None, reliability: dict | None, training: str
) -> list[str]:
    """The multi-label sections from the summary to the calibration."""
    split = "test" if "test" in art.metrics else "val"
    return [
        _section("summary", "Summary", _multilabel_summary(art)),
        training,
        _section("per-class", f"Per-class metrics ({split}, worst AP first)", _multilabel_per_class(art, split)),
        _section("thresholds", "Decision rule against a fixed 0.5 threshold and top-k", _decision_rules(art)),
        _section("pr-curves", "Precision-recall curves (validation)", _pr_section(art, trust, saved)),
        _section("co-occurrence", "Label co-occurrence (validation)", _cooccurrence_section(art, saved)),
        _section("calibration", "Calibration (validation)", _multilabel_calibration(art, trust, saved, reliability)),
    ]


def multilabel_top_losses(saved: Saved, class_names: list[str], n: int, trust: Trust) -> list[dict]:
    """The ``n`` validation images with a wrong predicted label set and the highest binary cross-entropy of their
    calibrated label probabilities (summed over labels); each with its true and predicted labels, their
    probabilities, and its most wrong label (the wrongly decided label with the highest cross-entropy)."""
    p = trust.probs(saved.logits.float())
    y = saved.labels > 0.5
    bce = -torch.where(y, p, 1 - p).clamp_min(1e-7).log()  # (N, K)
    decided = trust.decide(p)  # (N, K) bool
    wrong_label = decided != y
    wrong = wrong_label.any(1).nonzero().flatten()
    order = wrong[bce[wrong].sum(1).argsort(descending=True)][:n]
    out = []
    for i in order.tolist():
        worst = int(bce[i].masked_fill(~wrong_label[i], -1.0).argmax())
        out.append(
            {
                "row": i,
                "index": int(saved.indices[i]),
                "name": saved.names[i] if i < len(saved.names) else str(int(saved.indices[i])),
                "true": [(class_names[k], float(p[i, k])) for k in y[i].nonzero().flatten().tolist()],
                "pred": [(class_names[k], float(p[i, k])) for k in decided[i].nonzero().flatten().tolist()],
                "worst": class_names[worst],
                "worst_class": worst,
                "worst_kind": "missed" if bool(y[i, worst]) else "false alarm",
                "p_worst": float(p[i, worst]),
                "bce": float(bce[i].sum()),
            }
        )
    return out


def _multilabel_gallery(
    losses: list[dict] | None, model: nn.Module | None, art: Artifact, samples: Samples | None, method: str = "gradcam"
) -> str:
    if losses is None:
        return '<p class="note">No saved validation predictions (retrain, or the file was removed).</p>'
    if not losses:
        return '<p class="note">No wrong label set on the validation split.</p>'

    def labels(pairs: list[tuple[str, float]]) -> str:
        return ", ".join(f"{html.escape(n)} {100 * q:.0f}%" for n, q in pairs) if pairs else "(none)"

    items = []
    for t in losses:
        cap = (
            f'<b class="bad">{html.escape(t["worst"])} {100 * t["p_worst"]:.1f}% ({t["worst_kind"]})</b><br>'
            f"true: {labels(t['true'])}<br>predicted: {labels(t['pred'])}<br>"
            f'<span class="note">BCE {t["bce"]:.2f} · {html.escape(Path(t["name"]).name[:40])}</span>'
        )
        pic = _cam_picture(model, art, samples, t["index"], t["worst_class"], t["name"], method)
        items.append(f"<figure>{pic}<figcaption>{cap}</figcaption></figure>")
    return (
        '<p class="note">Validation images with a wrong predicted label set and the highest binary cross-entropy '
        f"of their calibrated label probabilities, with {method} for their most wrong label (bold: a missed "
        "label or a false alarm).</p>" + f'<div class="gallery">{"".join(items)}</div>'
    )
