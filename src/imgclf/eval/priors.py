"""Post-hoc logit adjustment: answers for the class frequencies of deployment, not of the training data.

A single-label run's calibrated probabilities estimate ``p_s(y | x)`` under the class prior ``pi_s`` its logits
learned. When the classes occur with prior ``pi_t`` where the model is used, Bayes' rule gives
``p_t(y | x) ∝ p_s(y | x) pi_t(y) / pi_s(y)`` (Saerens et al. 2002, "Adjusting the outputs of a classifier to new
a priori probabilities"), i.e. an offset ``b = log pi_t - log pi_s`` added to the calibrated logits ``z / T``.
With uniform ``pi_t`` this is the post-hoc logit adjustment of Menon et al. 2021 ("Long-tail learning via logit
adjustment", tau = 1), which maximises balanced accuracy.

``pi_s`` is not always the training class frequencies: it is the prior the training objective made the logits
reflect (``logit_prior``): the sampling distribution (``data.sampler``) times the class weights
(``train.class_weights``), divided by ``class_prior ** la_tau`` for the logit-adjusted losses (balanced softmax:
tau 1) -- the minimiser of each expected loss -- and uniform after cRT. A tau-normalised head has no known
prior, so no shift is offered for it. Focal loss and label smoothing are taken as not changing the prior
(approximately true).

The shift is stored in the run (``imgclf calibrate RUN --priors ...``: ``calibration["bias"]`` and
``calibration["priors"]``) and applied by eval, predict, export (in the graph) and serve; ``--priors`` on eval and
predict applies one for a single call. OOD scores stay those of the unshifted calibrated logits (a prior shift
changes which class wins, not how familiar an image is).

Example:
    >>> import numpy as np
    >>> np.round(shift([0.5, 0.5], [0.9, 0.1]), 3).tolist()
    [-0.588, 1.609]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImgclfError

#: prior specs with a meaning of their own
NAMED = ("uniform", "train", "none")


def logit_prior(task: Any, counts: Any, sampler: str = "instance", epoch: int = 1, epochs: int = 1) -> list[float]:
    """(K,) the class prior a single-label ``task`` (``train.tasks.SingleLabelTask``) trained on ``counts``
    (K,) images per class with ``sampler`` (``data.sampler``; ``progressive`` at ``epoch`` of ``epochs``) leaves in
    its logits; see the module docstring. Sums to 1."""
    from ..data.samplers import class_probs

    n = np.asarray(counts, dtype=np.float64)
    q = class_probs(n, sampler, epoch, epochs)
    if task.class_weight is not None:
        q = q * np.asarray(task.class_weight)
    if task.loss in ("logit_adjusted", "balanced_softmax"):
        tau = 1.0 if task.loss == "balanced_softmax" else task.la_tau
        q = q * np.asarray(task.class_prior, dtype=np.float64) ** -tau
    q = np.where(n > 0, q, 0.0)
    return [round(float(x), 8) for x in q / q.sum()]


def shift(target: Any, source: Any) -> np.ndarray:
    """(K,) ``log target - log source`` for two (K,) priors; classes absent from either get 0 (no change)."""
    t, s = np.asarray(target, dtype=np.float64), np.asarray(source, dtype=np.float64)
    ok = (t > 0) & (s > 0)
    return np.where(ok, np.log(np.where(ok, t, 1)) - np.log(np.where(ok, s, 1)), 0.0)


def parse_priors(spec: str, class_names: list[str], train_prior: list[float] | None = None) -> list[float]:
    """(K,) deployment priors, summing to 1, from ``spec``:

    - ``uniform``: every class equally likely;
    - ``train``: the training class frequencies (``train_prior``);
    - ``0.5,0.3,0.2``: one positive number per class in the run's class order (normalised);
    - ``cat=0.7,dog=0.3``: a number for every class by name;
    - a ``.json`` file ``{"cat": 0.7, "dog": 0.3}`` or a ``.csv`` file with ``class,prior`` rows.

    Raises:
        ImgclfError: a wrong count, an unknown or missing class, a value that is not a positive number, an
            unreadable file.
    """
    k = len(class_names)
    if spec == "uniform":
        return [1.0 / k] * k
    if spec == "train":
        if train_prior is None:
            raise ImgclfError("--priors train: the run does not record its training class counts (retrain it)")
        return list(train_prior)
    path = Path(spec)
    if spec.endswith((".json", ".csv")):
        if not path.is_file():
            raise ImgclfError(f"--priors: file {spec} not found")
        try:
            text = path.read_text(encoding="utf-8")
            if spec.endswith(".json"):
                pairs = json.loads(text)
                if not isinstance(pairs, dict):
                    raise ValueError("not an object of class: prior")
            else:
                rows = [r.split(",") for r in text.splitlines() if r.strip()]
                if rows and rows[0][0].strip().lower() in ("class", "label", "name"):
                    rows = rows[1:]
                pairs = {r[0].strip(): r[1].strip() if len(r) > 1 else "" for r in rows}
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ImgclfError(f"--priors: cannot read {spec} ({e})") from None
        return _by_name(pairs, class_names, spec)
    parts = [p.strip() for p in spec.split(",")]
    if any("=" in p for p in parts):
        return _by_name(dict(p.split("=", 1) for p in parts), class_names, "--priors")
    if len(parts) != k:
        raise ImgclfError(f"--priors has {len(parts)} values for {k} classes (give one per class in the run's "
                          "order, name=value pairs, a .json/.csv file, uniform or train)")  # fmt: skip
    return _normalised([_positive(p, f"value {i + 1}") for i, p in enumerate(parts)])


def _by_name(pairs: dict[str, Any], class_names: list[str], where: str) -> list[float]:
    pairs = {str(k).strip(): v for k, v in pairs.items()}
    unknown = sorted(set(pairs) - set(class_names))
    if unknown:
        raise ImgclfError(f"{where}: unknown class {unknown[0]!r} (classes: {', '.join(class_names)})")
    missing = [c for c in class_names if c not in pairs]
    if missing:
        raise ImgclfError(f"{where}: no prior for class {missing[0]!r} (give every class a value)")
    return _normalised([_positive(pairs[c], f"class {c!r}") for c in class_names])


def _positive(v: Any, what: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if not (math.isfinite(x) and x > 0):
        raise ImgclfError(f"--priors: {what} must be a positive number (got {v!r})")
    return x


def _normalised(v: list[float]) -> list[float]:
    s = sum(v)
    return [x / s for x in v]


def prior_shift(art: Any, spec: str | None) -> tuple[list[float] | None, dict[str, Any] | None]:
    """The per-class offset (K,) for deployment priors ``spec`` on run ``art`` and its record for ``imgclf.json``
    (``calibration["priors"]``); ``(None, None)`` for ``spec`` None or ``none`` (no shift).

    Raises:
        ImgclfError: a multi-label run, a run without a known logit prior (tau-normalised heads, runs saved before
            priors were recorded), or a bad ``spec`` (``parse_priors``).
    """
    if spec is None:
        return None, None
    if art.multi_label:
        raise ImgclfError("--priors applies to single-label runs (multi-label runs decide each label by its "
                          "tuned threshold: re-tune them with imgclf calibrate --data on data of the deployment "
                          "mix)")  # fmt: skip
    if spec == "none":
        return None, None
    source = art.data.get("logit_prior")
    if source is None:
        why = ("its head was tau-normalised, which leaves no known training prior" if art.data.get("rebalance")
               == "tau_norm" else "it does not record the class prior its logits learned (saved by an older "
               "imgclf: retrain it, or imgclf rebalance it with --method crt)")  # fmt: skip
        raise ImgclfError(f"--priors: cannot shift {art.run_dir or 'this run'}: {why}")
    counts = np.asarray(art.data.get("class_counts") or source, dtype=np.float64)
    target = parse_priors(spec, art.class_names, [float(x) for x in counts / counts.sum()])
    b = [round(float(x), 6) for x in shift(target, source)]
    return b, {"spec": spec, "target": [round(x, 8) for x in target], "logit_prior": source}
