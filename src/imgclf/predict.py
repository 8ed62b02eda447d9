"""Predictions of a saved run for images, folders and CSVs: the top-k labels of a single-label run, the label
set of a multi-label run (its decision thresholds applied to calibrated probabilities), as a table, CSV or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact import read_artifact
from .data.sources import scan_inputs
from .deploy.runtime import resolve_runtime, runtime_outputs
from .errors import ImgclfError
from .eval.evaluate import class_order
from .eval.inference import check_inputs, infer_run, run_decode_policy
from .eval.ood import FEATURE_SCORES
from .eval.trust import Trust, with_priors


@dataclass
class Predictions:
    """One row per decoded input (in input order) plus the inputs that could not be read."""

    rows: list[dict[str, Any]]  # {"path": str, "top": [{"label": str, "prob": float}, ...]}
    skipped: dict[str, str] = field(default_factory=dict)
    multi_label: bool = False  # rows also hold "labels": the decided label set (possibly empty)


def predict_run(
    run_dir: str | Path,
    inputs: list[str],
    *,
    top_k: int = 5,
    tta: str | None = None,
    tta_merge: str = "mean_logits",
    ensemble: list[str] | None = None,
    ood_score: str | None = None,
    reject: bool = True,
    runtime: str = "torch",
    priors: str | None = None,
    **run_opts: Any,
) -> Predictions:
    """Batched top-k labels with calibrated probabilities, and an ``unknown`` flag, for every readable input.

    The run's temperature scales the logits; its OOD threshold (``ood_score``, default the run's
    ``trust.ood_score``) marks inputs below it as ``unknown`` (``reject=False`` only reports the score).
    ``ensemble`` adds runs whose calibrated probabilities are averaged with this one's; an ensemble
    answers ``unknown`` when at least half of its members with OOD thresholds do.
    ``runtime``: ``torch`` (the run's PyTorch model, any device, TTA), ``auto`` (the fastest installed
    runtime; PyTorch where only it can run the job) or a name from ``deploy.runtime.RUNTIMES``.
    Multi-label runs add ``labels`` to every row: the decided label set (``[{"label", "prob"}]``, most probable
    first; the empty set is a valid answer), empty when the input is ``unknown``; they cannot be ensembled yet.
    ``run_opts``: batch_size, num_workers, device, strict_images, progress, max_pixels, max_aspect (see
    ``infer_run``). Members of an ensemble may list the same classes in another order (aligned by name).
    ``priors``: deployment class priors for this call instead of each run's own (``eval.priors``).
    """
    if top_k < 1:
        raise ImgclfError(f"--top-k must be >= 1 (got {top_k})")
    runs = [run_dir, *(ensemble or [])]
    probs, flags, names, ref, first = [], [], None, None, None
    trusts = []
    for run in runs:
        art = read_artifact(run)  # the one read of the run's imgclf.json; everything below is handed ``art``
        if art.multi_label and len(runs) > 1:
            raise ImgclfError(f"{run}: a multi-label run; ensembles of multi-label runs are not supported yet")
        trust = with_priors(Trust.load(run, art), art, priors)
        trusts.append(trust)
        score = ood_score or trust.ood_score
        feats = score in FEATURE_SCORES and trust.stats is not None
        out, art, samples, skips = _outputs(art, inputs, runtime, feats, tta, tta_merge, run_opts)
        order = class_order(art.class_names, names or art.class_names, run, run_dir)  # ensembles align by name
        if ref is not None and not torch.equal(out.indices, ref):
            raise ImgclfError(f"{run}: read a different set of inputs; cannot ensemble")
        names, ref = names or art.class_names, out.indices
        first = first or (samples, skips)
        probs.append(trust.probs(out.logits)[:, order])
        if ood_score and reject and ood_score not in trust.thresholds:
            raise ImgclfError(f"{run}: no threshold for OOD score '{ood_score}' (fitted: "
                              f"{', '.join(trust.thresholds) or 'none; retrain with trust.ood true'})")  # fmt: skip
        flags.append(trust.unknown(out.ood_logits, out.features, score))
    samples, skips = first
    p = torch.stack(probs).mean(0)
    k = min(top_k, len(names))
    top_p, top_i = p.topk(k, dim=-1)
    judged = [f for f in flags if f is not None]
    votes = torch.stack([f[1] for f in judged]).float().mean(0) >= 0.5 if judged else None
    multi = trusts[0].multi_label
    decided = trusts[0].decide(p) if multi else None  # (N, K) bool label sets
    rows = []
    for n, (i, pr, ix) in enumerate(zip(out.indices, top_p, top_i)):
        row: dict[str, Any] = {
            "path": samples.describe(int(i)),
            "top": [{"label": names[int(c)], "prob": round(float(q), 6)} for q, c in zip(pr, ix)],
        }
        if decided is not None:
            on = decided[n].nonzero().flatten().tolist()
            on.sort(key=lambda c: -float(p[n, c]))
            row["labels"] = [{"label": names[c], "prob": round(float(p[n, c]), 6)} for c in on]
        if votes is not None:
            unknown = bool(votes[n]) and reject
            if multi:
                row.update(labels=[] if unknown else row["labels"], unknown=unknown)
            else:
                row.update(label="unknown" if unknown else row["top"][0]["label"], unknown=unknown)
            if len(judged) == 1:
                row.update(ood_score=round(float(judged[0][0][n]), 6))
        rows.append(row)
    return Predictions(rows, dict(skips.items), multi)


def _outputs(art, inputs: list[str], runtime: str, feats: bool, tta: str | None, tta_merge: str, run_opts: dict):
    """(Outputs, artifact, samples, skips) of one run through PyTorch or an exported runtime."""
    desc = f"predict {art.run_dir.name}"
    rt = resolve_runtime(runtime, art, tta=tta, device=run_opts.get("device", "auto"))
    if rt == "torch":
        return infer_run(art, lambda a, decode: scan_inputs(inputs, decode), desc=desc, features=feats, tta=tta,
                         tta_merge=tta_merge, **run_opts)  # fmt: skip
    if tta:
        raise ImgclfError(f"--tta runs on PyTorch only (got --runtime {rt})")
    if run_opts.get("device", "auto") not in ("auto", "cpu"):
        raise ImgclfError(f"--runtime {rt} runs on the CPU; use --runtime torch with --device {run_opts['device']}")
    limits = {k: run_opts[k] for k in ("max_pixels", "max_aspect") if k in run_opts}
    samples = scan_inputs(inputs, run_decode_policy(art, **limits))
    check_inputs(samples, run_opts.get("progress", False))
    opts = {k: v for k, v in run_opts.items() if k not in ("device", "max_pixels", "max_aspect")}
    out, art, skips = runtime_outputs(art, samples, runtime, desc=desc, **opts)  # auto: PyTorch if export fails
    return out, art, samples, skips
