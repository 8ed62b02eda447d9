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
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    out: dict[str, list[float]] = {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "confidence": [],
                                   "accuracy": [], "count": []}  # fmt: skip
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[m].mean()) if n else float("nan"))
        out["accuracy"].append(float(correct[m].mean()) if n else float("nan"))
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
