"""Calibration: expected calibration error (equal-width and equal-mass bins), NLL, Brier score,
reliability curves and temperature scaling fitted by minimising NLL.

Equal-width top-label ECE is torchmetrics' ``MulticlassCalibrationError``; torchmetrics has no
equal-mass ECE or multiclass Brier score, so those two are written here (a few lines each, checked
against scikit-learn in the tests).

Example:
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]); y = torch.tensor([0, 1, 1])
    >>> t = fit_temperature(logits, y)
    >>> t > 1  # overconfident logits get a temperature above one
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError


def ece_equal_width(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width confidence bins (torchmetrics)."""
    return float(MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")(probs, targets))


def ece_equal_mass(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` bins holding (nearly) equal numbers of samples, sorted by confidence."""
    conf, pred = probs.max(1)
    order = conf.argsort()
    err = 0.0
    for chunk in order.tensor_split(min(n_bins, len(order))):
        if len(chunk):
            err += len(chunk) * abs(float(conf[chunk].mean()) - float((pred[chunk] == targets[chunk]).float().mean()))
    return err / max(len(order), 1)


def brier(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Multiclass Brier score: mean over samples of the squared distance to the one-hot target."""
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width bin: mean confidence, accuracy and count (for the reliability diagram)."""
    conf, pred = probs.max(1)
    return _binned(conf, (pred == targets).float(), n_bins)


def _binned(conf: torch.Tensor, hit: torch.Tensor, n_bins: int) -> dict[str, list[float]]:
    """Per equal-width bin of ``conf`` (M,): its edges, mean ``conf``, mean ``hit`` (M,) and count."""
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    out: dict[str, list[float]] = {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "confidence": [],
                                   "accuracy": [], "count": []}  # fmt: skip
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[m].mean()) if n else float("nan"))
        out["accuracy"].append(float(hit[m].mean()) if n else float("nan"))
    return out


def calibration_metrics(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> dict[str, Any]:
    """ECE (both binnings), NLL and Brier of ``softmax(logits / temperature)``."""
    logits = logits.float() / temperature
    probs = logits.softmax(1)
    return {
        "ece": ece_equal_width(probs, targets),
        "ece_equal_mass": ece_equal_mass(probs, targets),
        "nll": float(F.cross_entropy(logits, targets)),
        "brier": brier(probs, targets),
    }


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (L-BFGS on log T)."""
    logits = logits.detach().float().clone()  # a normal tensor: inference-mode tensors cannot enter autograd
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


# --- multi-label: one sigmoid per class ---------------------------------------------------------------------------


def fit_per_class(logits: torch.Tensor, targets: torch.Tensor, method: str = "temperature", max_iter: int = 200
                  ) -> tuple[list[float], list[float] | None]:  # fmt: skip
    """Per-class calibration of sigmoid outputs, minimising each class's binary cross-entropy on (N, K) ``logits``
    against (N, K) 0/1 ``targets`` (L-BFGS; the K problems are independent, so one joint solve is K solves).

    ``temperature``: ``sigmoid(z / T_k)`` (temperature scaling per class, Guo et al. 2017); ``platt``:
    ``sigmoid(z / T_k + b_k)`` (Platt 1999 scaling, parameterised by a temperature and a bias). Both fit Platt's
    regularised targets, ``(N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for negatives (Platt 1999,
    section 2.2), so a class that validation separates perfectly does not get an infinitely sharp, saturated
    sigmoid. Returns the K temperatures (clamped to [0.05, 20]) and the K biases (None for ``temperature``;
    clamped to [-20, 20]). A class whose validation images are all positive or all negative keeps T = 1, b = 0
    (nothing to fit).
    """
    if method not in ("temperature", "platt"):
        raise ValueError(f"calibration method must be temperature or platt (got {method!r})")
    z, y = logits.detach().float().cpu().clone(), targets.detach().float().cpu().clone()
    k = z.shape[1]
    pos = y.sum(0)
    fit = (pos > 0) & (pos < len(y))  # (K,) classes with both outcomes
    y = torch.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (len(y) - pos + 2))  # Platt's targets, per class
    log_t = torch.zeros(k, requires_grad=True)
    bias = torch.zeros(k, requires_grad=method == "platt")
    params = [log_t] + ([bias] if method == "platt" else [])
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z[:, fit] / log_t[fit].exp() + bias[fit], y[:, fit],
                                                  reduction="sum") / max(len(y), 1)  # fmt: skip
        loss.backward()
        return loss

    if fit.any():
        opt.step(closure)
    t = torch.where(fit, log_t.detach().exp().clamp(0.05, 20.0), torch.ones(k))
    b = torch.where(fit, bias.detach().clamp(-20.0, 20.0), torch.zeros(k))
    return t.tolist(), (b.tolist() if method == "platt" else None)


def binary_ece(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of binary probabilities ``probs`` (M,) against 0/1 ``targets`` (M,) with equal-width bins
    (torchmetrics ``BinaryCalibrationError``)."""
    from torchmetrics.functional.classification import binary_calibration_error

    if len(probs) == 0:
        return float("nan")
    return float(binary_calibration_error(probs.float(), targets.long(), n_bins=n_bins, norm="l1"))


def multilabel_calibration_metrics(
    logits: torch.Tensor, targets: torch.Tensor, temperature: Any = 1.0, bias: Any = None, n_bins: int = 15
) -> dict[str, Any]:
    """Calibration of ``sigmoid(logits / T + b)`` (``T``, ``b``: one value or (K,)) against (N, K) 0/1 targets:
    ``ece`` over all N x K label probabilities pooled, ``ece_classwise`` (the mean of the per-class ECEs,
    Kull et al. 2019), ``ece_per_class`` (K,), ``nll`` (binary cross-entropy per label) and ``brier`` (mean
    squared error per label)."""
    logits, targets = logits.float().cpu(), targets.cpu()
    t = torch.as_tensor(temperature, dtype=torch.float32)
    z = logits / t + (torch.as_tensor(bias, dtype=torch.float32) if bias is not None else 0.0)
    p, y = z.sigmoid(), targets.float()
    per = [binary_ece(p[:, k].contiguous(), y[:, k].contiguous(), n_bins) for k in range(p.shape[1])]
    return {
        "ece": binary_ece(p.flatten(), y.flatten(), n_bins),
        "ece_classwise": float(sum(per) / max(len(per), 1)),
        "ece_per_class": per,
        "nll": float(F.binary_cross_entropy_with_logits(z, y)),
        "brier": float(((p - y) ** 2).mean()),
    }


def multilabel_reliability(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """``reliability`` of the pooled label probabilities: per bin the mean probability, the share of positives
    (``accuracy``) and the count."""
    return _binned(probs.float().flatten(), targets.float().flatten(), n_bins)
