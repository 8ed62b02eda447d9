"""Metrics of saved runs on labelled data: single runs (optionally with TTA and OOD data), ensembles,
and re-fitting the calibration temperature and OOD thresholds on other held-out data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..artifact import read_artifact, require, update_artifact
from ..data.sources import open_source, open_unlabelled
from ..errors import ImgclfError
from ..train.metrics import compute_metrics
from .calibration import calibration_metrics, fit_temperature
from .drift import reference_stats
from .inference import infer_run, run_label_format
from .ood import ood_report, threshold_for_tpr
from .trust import Trust, calibration_report, fit_trust, task_metrics, with_priors


def _labelled(data: str, split: str):
    return lambda art, decode: open_source(data, split, decode, run_label_format(art)).remap_to(art.class_names)


def evaluate_run(
    run_dir: str | Path,
    data: str,
    *,
    split: str = "test",
    tta: str | None = None,
    tta_merge: str = "mean_logits",
    ood_data: str | None = None,
    ood_split: str = "test",
    priors: str | None = None,
    **run_opts: Any,
) -> dict[str, Any]:
    """Load ``run_dir``, run it on ``data`` (folder, CSV, .npz, builtin) and return metrics.

    Class names are matched by name (test data may hold a subset of classes). Adds calibration metrics
    (before/after the run's temperature) and, with ``ood_data``, AUROC/AUPR/FPR@95%TPR of every OOD
    score (``data`` in-distribution, ``ood_data`` out). ``priors``: deployment class priors for this call
    instead of the run's (``eval.priors.parse_priors``; ``none``: no shift). ``run_opts``: batch_size,
    num_workers, device, strict_images, progress (see ``imgclf.eval.inference.infer_run``).
    """
    feats = ood_data is not None
    out, art, samples, skips = infer_run(run_dir, _labelled(data, split), desc="eval", features=feats, tta=tta,
                                         tta_merge=tta_merge, **run_opts)  # fmt: skip
    trust = with_priors(Trust.load(run_dir, art), art, priors)
    metrics = task_metrics(trust, out, art.class_names, _run_k(art))
    metrics["data"] = samples.name
    if trust.priors is not None:
        metrics["priors"] = trust.priors
    if tta:
        metrics["tta"] = {"mode": tta, "merge": tta_merge}
    if len(out.labels):
        metrics["calibration"] = {"temperature": trust.temperature, **calibration_report(trust, out.logits, out.labels)}
    if ood_data is not None:
        o, _, ood_samples, ood_skips = infer_run(run_dir, lambda a, d: open_unlabelled(ood_data, ood_split, d),
                                                 desc="ood", features=True, tta=tta, tta_merge=tta_merge,
                                                 **run_opts)  # fmt: skip
        skips.items.update(ood_skips.items)
        if len(o.indices) == 0:
            raise ImgclfError(f"{ood_samples.name}: no readable OOD images")
        id_s, ood_s = trust.scores(out.ood_logits, out.features), trust.scores(o.ood_logits, o.features)
        metrics["ood"] = {
            "data": ood_samples.name,
            "n": len(o.logits),
            "metrics": ood_report(id_s, ood_s),
            "rejected": {
                k: {"in": float((id_s[k] < t).float().mean()), "ood": float((ood_s[k] < t).float().mean())}
                for k, t in trust.thresholds.items()
                if k in id_s
            },  # fmt: skip
            "_scores": {k: (id_s[k], ood_s[k]) for k in id_s},  # for plots; dropped from JSON output
        }
    if skips.items:
        metrics["skipped_files"] = skips.items
    return metrics


def _run_k(art: Any) -> int | None:
    """The top-k alternative of a multi-label run: its validation label cardinality (None: single-label)."""
    if not art.multi_label:
        return None
    card = (art.metrics.get("val") or {}).get("label_cardinality", {}).get("true")
    return max(1, round(card)) if card else 1


def evaluate_ensemble(run_dirs: list[str | Path], data: str, *, split: str = "test", **opts: Any) -> dict[str, Any]:
    """Average the calibrated probabilities of several runs (same classes) and compare with each member.

    Returns ``{"ensemble": metrics, "members": {run: metrics}, "gain": {...}}``; the gain is measured
    against the best member (top-1 up, NLL down). Single-label runs only (ImgclfError otherwise).
    """
    probs, labels, members = [], None, {}
    names = read_artifact(run_dirs[0]).class_names  # members align to the first run's class order, by name
    for run in run_dirs:
        if read_artifact(run).multi_label:
            raise ImgclfError(f"{run}: a multi-label run; ensembles of multi-label runs are not supported yet")
        out, art, _, _ = infer_run(run, lambda a, d: open_source(data, split, d, run_label_format(a)).remap_to(names),
                                   desc=f"eval {Path(run).name}", **opts)  # fmt: skip
        order = class_order(art.class_names, names, run, run_dirs[0])
        if labels is not None and not torch.equal(out.labels, labels):
            raise ImgclfError(f"{run}: read a different set of images (unreadable files?); cannot ensemble")
        labels = out.labels
        p = Trust.load(run, art).probs(out.logits)[:, order]
        probs.append(p)
        members[str(run)] = _prob_metrics(p, labels, names)
    ens = _prob_metrics(torch.stack(probs).mean(0), labels, names)
    best_top1 = max(m["top1"] for m in members.values())
    best_nll = min(m["calibration"]["nll"] for m in members.values())
    gain = {
        "top1_points": round(100 * (ens["top1"] - best_top1), 3),
        "nll": round(best_nll - ens["calibration"]["nll"], 5),
    }
    return {"ensemble": ens, "members": members, "gain": gain, "data": data}


def class_order(member: list[str], reference: list[str], run: Any, first: Any) -> list[int]:
    """Column indices that put a member's classes in the reference order (ensembles align by name);
    ImgclfError when the two runs do not have the same set of classes."""
    if sorted(member) != sorted(reference):
        only = sorted(set(member) ^ set(reference))
        raise ImgclfError(f"{run}: its classes differ from {first} ({', '.join(only[:5])}); an ensemble needs the "
                          "same classes")  # fmt: skip
    index = {c: i for i, c in enumerate(member)}
    return [index[c] for c in reference]


def _prob_metrics(probs: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    logp = probs.clamp_min(1e-12).log()
    m = compute_metrics(logp, labels, names)
    m["calibration"] = calibration_metrics(logp, labels)
    return m


def calibrate_run(run_dir: str | Path, data: str | None, *, split: str = "val", priors: str | None = None,
                  **run_opts: Any) -> dict[str, Any]:  # fmt: skip
    """Re-fit the temperature, the OOD thresholds and the drift reference of a run on held-out labelled data
    (``data``; None: the run's own validation split again); save them. ``priors``: store the prior shift to
    these deployment class priors (``eval.priors``; ``none`` removes it; None keeps the run's)."""
    from ..data.splits import run_split
    from .priors import prior_shift

    opener = _labelled(data, split) if data else lambda a, d: run_split(a, "val", "--data")
    art = read_artifact(run_dir)
    require(art, "calibrate")
    prior_shift(art, priors)  # a bad --priors fails before the pass over the data
    out, art, samples, _ = infer_run(art, opener, desc="calibrate", features=True, **run_opts)
    if len(out.labels) < 10:
        raise ImgclfError(f"{samples.name}: {len(out.labels)} readable images; calibration needs at least 10")
    before = Trust.load(run_dir, art)
    if before.multi_label:
        return _recalibrate_multilabel(art, before, out, samples, data)
    t = fit_temperature(out.logits, out.labels)
    after = with_priors(dataclasses.replace(before, temperature=t, thresholds={}), art, priors)  # task, OOD stats
    report = {
        "temperature": t,
        "previous_temperature": before.temperature,
        "data": samples.name,
        "n": len(out.labels),
        "before": calibration_metrics(out.logits, out.labels, before.temperature),
        "after": calibration_metrics(out.logits, out.labels, t),
    }
    cal = {k: v for k, v in art.calibration.items() if k not in ("bias", "priors")}
    if after.bias is not None:
        cal.update(bias=after.bias, priors=after.priors)
        report["priors"] = after.priors
        report["decisions"] = {
            name: {k: m[k] for k in ("top1", "balanced_accuracy", "macro_f1")}
            for name, m in (("without_priors", compute_metrics(out.logits, out.labels, art.class_names)),
                            ("with_priors", compute_metrics(out.logits, out.labels, art.class_names,
                                                            scores=after.probs(out.logits))))
        }  # fmt: skip
    art.calibration = {**cal, "temperature": t, "refit": report}
    _refit_ood_and_drift(art, after, out, samples, data)
    update_artifact(art)
    return report


def _refit_ood_and_drift(art: Any, after: Trust, out: Any, samples: Any, data: str | None) -> None:
    """OOD thresholds and the drift reference of ``art`` from held-out outputs under the re-fitted ``after``."""
    if art.ood:
        scores = after.scores(out.logits, out.features)
        art.ood = {**art.ood, "thresholds": {k: threshold_for_tpr(v, after.tpr) for k, v in scores.items()},
                   "thresholds_data": samples.name}  # fmt: skip
    art.drift = {
        "data": samples.name if data else f"{samples.name} (the run's validation split)",
        **reference_stats(after.probs(out.logits).numpy(), out.features.numpy(), after),
    }


def _recalibrate_multilabel(art: Any, before: Trust, out: Any, samples: Any, data: str | None) -> dict[str, Any]:
    """Re-fit a multi-label run's per-class calibration and decision thresholds (by its own ``trust`` settings)."""
    from ..config import TrustConfig

    saved = art.config.get("trust", {})
    cfg = TrustConfig(**{k: v for k, v in saved.items() if k in TrustConfig.__dataclass_fields__})
    after, rep = fit_trust(out.logits, out.labels, None, None, None, art.num_classes, cfg, before.task,
                           art.class_names)  # fmt: skip
    after.stats, after.ood_score, after.tpr = before.stats, before.ood_score, before.tpr
    report = {
        "method": rep["method"], "temperature": after.temperature, "bias": after.bias,
        "previous_temperature": before.temperature, "data": samples.name, "n": len(out.labels),
        "before": calibration_report(before, out.logits, out.labels)["after"],
        "after": rep["val"]["after"], "thresholds": rep.get("thresholds"),
    }  # fmt: skip
    art.calibration = {**art.calibration, "method": rep["method"], "temperature": after.temperature,
                       "bias": after.bias, "refit": {k: v for k, v in report.items() if k != "thresholds"}}  # fmt: skip
    art.decision = after.decision.to_json() if after.decision is not None else None
    _refit_ood_and_drift(art, after, out, samples, data)
    update_artifact(art)
    return report
