"""``runs/<name>/report.html``: one self-contained page (images embedded) that tells whether to trust a run.

Single-label runs (``SECTIONS``): summary, training curves, per-class table, confusion matrix, most-confused
pairs, calibration (reliability before/after temperature scaling), out-of-distribution detection (when OOD data
is given), top losses with CAM overlays, configuration and versions.

Multi-label runs (``MULTILABEL_SECTIONS``): summary (mAP, F1, exact match, calibration, decision rule), training
curves (val mAP), per-class table (AP, precision, recall, F1, threshold; worst AP first), the decision rule
against a fixed 0.5 threshold and top-k, precision-recall curves with each class's operating point, label
co-occurrence, calibration (pooled reliability before/after per-class scaling, per-class ECE), OOD detection,
the images with the highest binary cross-entropy (CAM of their most wrong label), configuration and versions.
The curves, co-occurrence, reliability and top losses come from the saved validation predictions.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from ..artifact import Artifact
from ..data.sources import Samples
from ..io import write_text
from ..models.inference import Outputs
from ..rundir import REPORT_FILE, VAL_PREDICTIONS, RunDir
from .calibration import reliability
from .predictions import Saved, load_predictions, top_losses
from .trust import Trust

log = logging.getLogger("imgclf")
SECTIONS = (
    "summary",
    "training",
    "per-class",
    "confusion",
    "confused-pairs",
    "calibration",
    "ood",
    "top-losses",
    "config",
)
MULTILABEL_SECTIONS = (
    "summary",
    "training",
    "per-class",
    "thresholds",
    "pr-curves",
    "co-occurrence",
    "calibration",
    "ood",
    "top-losses",
    "config",
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #e3e6ea;font-size:13px;position:sticky;top:0}
nav a{margin-right:14px;color:#2f6fd6;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:8px 32px 40px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;margin:18px 0;padding:14px 20px}
h2{font-size:17px;margin:4px 0 10px}table{border-collapse:collapse;font-size:13px}
td,th{padding:4px 10px;border-bottom:1px solid #eef0f3;text-align:right}td:first-child,th:first-child{text-align:left}
th{color:#5b6472;font-weight:600}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #e3e6ea;border-radius:8px;padding:10px 14px;min-width:130px;margin-bottom:12px}
.card b{display:block;font-size:22px}.card span{color:#5b6472;font-size:12px}
img.plot{max-width:100%}.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:11px;overflow-wrap:anywhere}
figure img{width:170px;height:170px;object-fit:contain;background:#111}
.bad{color:#b3261e}.note{color:#5b6472;font-size:13px}pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:12px}
"""


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _summary(art: Artifact, cal: dict) -> str:
    m = art.metrics
    split = "test" if "test" in m else "val"
    s = m[split]
    after = (cal.get(split) or {}).get("after", {})
    before = (cal.get(split) or {}).get("before", {})
    cards = [
        (f"{split} top-1", _pct(s.get("top1"))),
        ("top-5", _pct(s.get("top5"))),
        ("macro-F1", _pct(s.get("macro_f1"))),
        ("balanced acc.", _pct(s.get("balanced_accuracy"))),
        ("ECE (calibrated)", _pct(after.get("ece"))),
        ("temperature", f"{cal.get('temperature', 1.0):.3f}"),
    ]
    html_cards = "".join(f'<div class="card"><b>{v}</b><span>{html.escape(k)}</span></div>' for k, v in cards)
    rows = []
    for name in ("val", "test"):
        if name in m:
            c = cal.get(name) or {}
            rows.append(
                [
                    name,
                    m[name]["n"],
                    _pct(m[name]["top1"]),
                    _pct(m[name].get("top5")),
                    _pct(m[name]["macro_f1"]),
                    f"{c.get('before', {}).get('nll', float('nan')):.4f}",
                    f"{c.get('after', {}).get('nll', float('nan')):.4f}",
                    _pct(c.get("before", {}).get("ece")),
                    _pct(c.get("after", {}).get("ece")),
                ]
            )
    table = _table(["split", "images", "top-1", "top-5", "macro-F1", "NLL", "NLL (cal.)", "ECE", "ECE (cal.)"], rows)
    note = f'<p class="note">ECE before → after on {split}: {_pct(before.get("ece"))} → {_pct(after.get("ece"))}</p>'
    return f'<div class="cards">{html_cards}</div>' + table + note


def _per_class(metrics: dict, counts: list[int] | None = None) -> str:
    """Per-class table; with the training ``counts`` (K,) also the imbalance ratio and recall against frequency."""
    names = list(metrics["per_class"])
    rows = [
        [n, _pct(d["precision"]), _pct(d["recall"]), _pct(d["f1"]), d["support"]] + ([counts[i]] if counts else [])
        for i, (n, d) in enumerate(metrics["per_class"].items())
    ]
    table = _table(["class", "precision", "recall", "F1", "support"] + (["train images"] if counts else []), rows)
    if not counts or len(counts) != len(names) or min(counts) < 1:
        return table
    from ..plots import recall_vs_frequency

    ratio = max(counts) / min(counts)
    note = (f'<p class="note">Imbalance ratio {ratio:.1f}:1 ({max(counts)} images of the most frequent class, '
            f"{min(counts)} of the rarest).{_LONG_TAIL_HINT if ratio >= 10 else ''}</p>")  # fmt: skip
    recalls = [metrics["per_class"][n]["recall"] for n in names]
    return note + table + _img(recall_vs_frequency(counts, recalls, names), "recall against class frequency")


_LONG_TAIL_HINT = (" Long-tailed: compare <code>imgclf rebalance RUN</code> (cRT), <code>--priors uniform</code>"
                   " and <code>--train.loss logit_adjusted</code> on balanced accuracy.")  # fmt: skip


def confused_pairs(cm: list[list[int]], names: list[str], n: int = 10) -> list[tuple[str, str, int]]:
    """Most frequent (true, predicted) off-diagonal pairs of a confusion matrix."""
    pairs = [(names[i], names[j], c) for i, row in enumerate(cm) for j, c in enumerate(row) if i != j and c]
    return sorted(pairs, key=lambda p: -p[2])[:n]


def _gallery(
    losses: list[dict] | None, model: nn.Module | None, art: Artifact, samples: Samples | None, method: str = "gradcam"
) -> str:
    if losses is None:
        return '<p class="note">No saved validation predictions (retrain, or the file was removed).</p>'
    if not losses:
        return '<p class="note">No wrong predictions on the validation split.</p>'
    items = []
    for t in losses:
        cap = (
            f'<b class="bad">{html.escape(t["pred"])}</b> {100 * t["p_pred"]:.1f}%<br>true: {html.escape(t["true"])} '
            f'{100 * t["p_true"]:.1f}%<br><span class="note">{html.escape(Path(t["name"]).name[:40])}</span>'
        )
        pic = _cam_picture(model, art, samples, t["index"], art.class_names.index(t["pred"]), t["name"], method)
        items.append(f"<figure>{pic}<figcaption>{cap}</figcaption></figure>")
    return f'<p class="note">Most confidently wrong validation images, with {method} for the predicted class.</p>' + (
        f'<div class="gallery">{"".join(items)}</div>'
    )


def _cam_picture(
    model: nn.Module | None, art: Artifact, samples: Samples | None, index: int, cls: int, name: str, method: str
) -> str:
    """Validation image ``index`` with the CAM of class ``cls`` as an embedded <img> ("" when unavailable)."""
    if samples is None or model is None or not hasattr(model, "get_classifier"):
        return ""
    from ..plots import figure, png_bytes
    from .explain import cam_maps, overlay

    try:
        img = samples.load(index)
        x = art.preprocessing.eval()(img)[None]
        cam = cam_maps(model, x, [cls], method)[0]
        fig = figure(2.0, 2.0)
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(overlay(img, art.preprocessing, cam))
        ax.axis("off")
        return _img(png_bytes(fig), name, cls="")
    except Exception as e:  # noqa: BLE001 - a missing or odd image must not lose the report
        log.debug("top-loss image %s: %s", name, e)
        return ""


def write_report(
    run_dir: str | Path,
    *,
    model: nn.Module | None,
    art: Artifact,
    val: tuple[Outputs, Samples] | None = None,
    reliability: dict | None = None,
    ood: dict[str, Any] | None = None,
) -> Path:
    """Build and write ``report.html``; returns its path. ``ood``: ``{"report": metrics, "scores": {...}}``.

    ``reliability``: the validation reliability curves before and after calibration (recomputed from the saved
    validation predictions when None); multi-label runs get their own sections (``MULTILABEL_SECTIONS``)."""
    from ..plots import training_curves

    run_dir = Path(run_dir)
    saved = load_predictions(run_dir / VAL_PREDICTIONS)
    samples = val[1] if val is not None else None
    rows = _history(run_dir)
    training = _section(
        "training",
        "Training curves",
        _img(training_curves(rows), "training curves") if rows else '<p class="note">No per-epoch log.</p>',
    )
    trust = Trust.of(art)  # calibration and decision rule; the OOD statistics are not needed here
    if art.multi_label:
        from .report_multilabel import _multilabel_gallery, _multilabel_parts, multilabel_top_losses

    if art.multi_label:
        parts, sections = _multilabel_parts(art, trust, saved, reliability, training), MULTILABEL_SECTIONS
    else:
        parts, sections = _single_label_parts(art, trust, saved, reliability, training), SECTIONS
    parts.append(_section("ood", "Out-of-distribution detection", _ood_body(art, ood)))
    robust = _robustness_body(run_dir)
    if robust:
        parts.append(_section("robustness", "Robustness to common corruptions", robust))
        sections = (*sections, "robustness")
    if art.metrics.get("teachers"):
        parts.insert(1, _section("distillation", "Student vs teacher", _distill_body(art)))
        sections = (sections[0], "distillation", *sections[1:])
    if art.extra.get("retrain"):
        parts.insert(1, _section("retrain", "Retrained: challenger vs champion", _retrain_body(art.extra["retrain"])))
        sections = (sections[0], "retrain", *sections[1:])
    n_losses = art.config.get("trust", {}).get("top_losses", 12)
    if art.multi_label:
        losses = multilabel_top_losses(saved, art.class_names, n_losses, trust) if saved else None
        parts.append(_section("top-losses", "Top losses", _multilabel_gallery(losses, model, art, samples)))
    else:
        losses = top_losses(saved, art.class_names, n_losses, trust.temperature) if saved else None
        parts.append(_section("top-losses", "Top losses", _gallery(losses, model, art, samples)))
    cfg_text = yaml.safe_dump(art.config, sort_keys=False)
    ver = json.dumps(art.versions, indent=1)
    parts.append(
        _section(
            "config", "Configuration and versions", f"<pre>{html.escape(cfg_text)}</pre><pre>{html.escape(ver)}</pre>"
        )
    )
    out = run_dir / REPORT_FILE
    write_text(out, _page(run_dir.name, art, parts, sections))
    return out


def _robustness_body(run_dir: Path) -> str:
    """The heatmap and summary of ``robustness.json`` (``imgclf eval RUN --shift``), or "" when there is none."""
    from ..plots import robustness_heatmap
    from .shift import ROBUSTNESS_FILE

    path = run_dir / ROBUSTNESS_FILE
    if not path.is_file():
        return ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        png = robustness_heatmap(doc)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'<p class="note">{html.escape(str(path))} could not be read ({html.escape(str(e)[:120])}).</p>'
    c = doc["clean"]
    rows = [[n.replace("_", " "), _pct(p["top1"]), _pct(p.get("ece")), _pct(p.get("rejected"))]
            for n, p in doc["per_corruption"].items()]  # fmt: skip
    return (f"<p>{doc['n']} images of {html.escape(str(doc['data']))}, seed {doc['seed']}: clean top-1 "
            f"{_pct(c['top1'])}, mean corruption accuracy {_pct(doc['mca'])} (relative drop "
            f"{_pct(doc.get('relative_drop'))}), mean ECE under shift {_pct(doc.get('mean_ece'))}; "
            f"<i>rejected</i>: share answered unknown by the {html.escape(str(doc['ood_score']))} threshold.</p>"
            + _img(png, "top-1 per corruption and severity")
            + _table(["corruption", "mean top-1", "ECE", "rejected"], rows))  # fmt: skip


def _retrain_body(doc: dict[str, Any]) -> str:
    """This run (the challenger of ``imgclf retrain``) beside the run it was fine-tuned from, on the held-out set of
    each distribution, and the decision."""
    c, h, d, dec = doc["scores"]["champion"], doc["scores"]["challenger"], doc["data"], doc["decision"]
    rows = [[f"{s}: {d[s]['held_out_from']}", d[s]["held_out"], _pct(c[s]), _pct(h[s]), f"{100 * (h[s] - c[s]):+.2f}"]
            for s in ("new", "old")]  # fmt: skip
    table = _table(["held-out set", "images", f"champion {doc['metric']}", f"challenger {doc['metric']}", "points"],
                   rows)  # fmt: skip
    verdict = "promoted" + (" (forced)" if dec["forced"] else "") if dec["promoted"] else "not promoted"
    return (
        f"<p>Fine-tuned from {html.escape(str(doc['champion']))} on {d['new']['train']} new and "
        f"{d['replay']['images']} replayed old images; {verdict}: {html.escape(dec['reason'])}.</p>" + table
    )


def _distill_body(art: Artifact) -> str:
    """The student (this run) beside each teacher on the same images: main metric per split, parameters."""
    key = "map" if art.multi_label else "top1"
    d = art.extra.get("distill", {})
    splits = [s for s in ("val", "test") if s in art.metrics]
    rows = [[f"teacher {t['run']} ({t['arch']})", f"{t['params'] / 1e6:.2f} M",
             *[_pct((t.get(s) or {}).get(key)) for s in splits]] for t in art.metrics["teachers"]]  # fmt: skip
    rows.append([f"student ({art.arch})", "", *[_pct(art.metrics[s].get(key)) for s in splits]])
    how = (f"terms {d.get('methods')}, temperature {d.get('temperature')}, alpha {d.get('alpha')}; each teacher on "
           "this run's images with its own preprocessing and calibration")  # fmt: skip
    table = _table(["model", "parameters", *[f"{s} {key}" for s in splits]], rows)
    return table + f'<p class="note">{html.escape(how)}</p>'


def _single_label_parts(
    art: Artifact, trust: Trust, saved: Saved | None, reliability: dict | None, training: str
) -> list[str]:
    """The single-label sections from the summary to the calibration."""
    from ..plots import confusion_heatmap, reliability_diagram

    cal = art.calibration
    if reliability is None and saved is not None:
        reliability = _reliability(saved, trust.temperature)
    split = "test" if "test" in art.metrics else "val"
    m = art.metrics[split]
    parts = [_section("summary", "Summary", _summary(art, cal)), training]
    parts.append(_section("per-class", f"Per-class metrics ({split})", _per_class(m, art.data.get("class_counts"))))
    parts.append(
        _section(
            "confusion",
            f"Confusion matrix ({split})",
            _img(confusion_heatmap(m["confusion_matrix"], art.class_names), "confusion matrix"),
        )
    )
    pairs = confused_pairs(m["confusion_matrix"], art.class_names)
    parts.append(
        _section(
            "confused-pairs",
            "Most-confused class pairs",
            _table(["true", "predicted as", "count"], [list(p) for p in pairs])
            if pairs
            else '<p class="note">No confusions.</p>',
        )
    )
    cal_body = (
        _img(reliability_diagram(reliability["before"], reliability["after"], trust.temperature), "reliability")
        if reliability
        else '<p class="note">No calibration data.</p>'
    )
    parts.append(_section("calibration", "Calibration (validation)", cal_body))
    return parts


def _page(name: str, art: Artifact, parts: list[str], sections: tuple[str, ...] = SECTIONS) -> str:
    """The report's HTML page around its sections (``sections``: the ids in the navigation bar)."""
    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in sections)
    title = f"imgclf report: {name}"
    kind = " (multi-label)" if art.multi_label else ""
    sub = (
        f"{art.arch} · {art.weights_source} · {len(art.class_names)} classes{kind} · "
        f"{art.config.get('transfer', {}).get('strategy', '')} · {art.created or time.strftime('%Y-%m-%d')}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1><p>{html.escape(sub)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(parts)}</main></body></html>"
    )


def _history(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics_jsonl
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "train_loss" in r]


def _reliability(saved: Saved, t: float) -> dict:
    return {
        "before": reliability(saved.logits.softmax(1), saved.labels),
        "after": reliability((saved.logits / t).softmax(1), saved.labels),
    }


def _ood_body(art: Artifact, ood: dict[str, Any] | None) -> str:
    from ..plots import ood_histograms

    thresholds = (art.ood or {}).get("thresholds", {})
    if not ood:
        t = _table(["score", "threshold (keeps 95 % of val)"], [[k, f"{v:.4g}"] for k, v in thresholds.items()])
        return (
            '<p class="note">No OOD data given: run <code>imgclf report RUN --ood-data OTHER_DATA</code> '
            "to measure detection.</p>" + (t if thresholds else "")
        )
    rows = [[k, f"{v['auroc']:.4f}", f"{v['aupr']:.4f}", _pct(v["fpr_at_95_tpr"])] for k, v in ood["report"].items()]
    hist = _img(ood_histograms(ood["scores"], thresholds), "OOD score histograms") if ood.get("scores") else ""
    return (
        f'<p class="note">In-distribution: {html.escape(ood.get("id_name", "validation"))}; '
        f"OOD: {html.escape(ood.get('ood_name', ''))}</p>"
        + _table(["score", "AUROC", "AUPR", "FPR@95%TPR"], rows)
        + hist
    )


def report_run(
    run_dir: str | Path,
    *,
    ood_data: str | None = None,
    ood_split: str = "test",
    cams: bool = True,
    device: str = "auto",
) -> Path:
    """Rewrite ``report.html`` of a saved run; with ``ood_data``, measure OOD detection against its validation split.

    The validation split is rebuilt from the run's saved config (its data must still be where it was);
    without it the report keeps every section except the top-loss images and OOD detection.
    """
    from ..artifact import load_artifact, require
    from ..config import build_config
    from ..data.loader import ImageDataset, make_loader
    from ..data.sources import open_unlabelled
    from ..data.splits import prepare_data
    from ..dist import resolve_device
    from ..errors import ImgclfError
    from ..models.inference import infer
    from .inference import check_inputs, run_decode_policy
    from .ood import ood_report

    dev = resolve_device(device)
    model, art = load_artifact(run_dir, dev)
    require(art, "report")
    try:
        val = prepare_data(build_config([art.config], ["the run's config"])).val
    except ImgclfError as e:
        log.warning("report: validation images unavailable (%s); no top-loss images", e)
        val = None
    ood = None
    if ood_data is not None:
        if val is None:
            raise ImgclfError("--ood-data needs the run's validation data (it could not be opened)")
        trust = Trust.load(run_dir, art)

        def run(samples: Samples, desc: str) -> Outputs:
            loader = make_loader(ImageDataset(samples, art.preprocessing.eval()), 128, train=False,
                                 num_workers=-1)  # fmt: skip
            return infer(model, loader, dev, features=True, progress=True, desc=desc)

        ood_samples = open_unlabelled(ood_data, ood_split, run_decode_policy(art))  # decoded as the run decodes
        check_inputs(ood_samples)
        o_in, o_out = run(val, "val"), run(ood_samples, "ood")
        s_in, s_out = trust.scores(o_in.logits, o_in.features), trust.scores(o_out.logits, o_out.features)
        ood = {"report": ood_report(s_in, s_out), "scores": {k: (s_in[k].numpy(), s_out[k].numpy()) for k in s_in},
               "id_name": f"validation split of {val.name}", "ood_name": str(ood_data)}  # fmt: skip
    return write_report(run_dir, model=model if cams else None, art=art, val=(None, val) if val is not None else None,
                        ood=ood)  # fmt: skip
