"""Decoupled classifier rebalancing (Kang et al. 2020, "Decoupling representation and classifier for long-tailed
recognition"): keep a trained network's representation, fix its classifier's bias towards frequent classes.

- ``crt`` (classifier re-training): a new linear head on the frozen features, trained with class-balanced
  sampling. Here the head is fitted by full-batch L-BFGS on the class-balanced objective -- cross-entropy with
  each image weighted ``1 / n_c``, exactly the expectation of the loss under class-balanced sampling, without
  its sampling noise -- for each L2 strength of ``probe.wd_grid``, the best by validation balanced accuracy
  (``train.probe.fit_lbfgs``).
- ``tau_norm``: rescale each class's weight vector ``w_c <- w_c / ||w_c||^tau`` and drop the bias (frequent
  classes grow larger weight norms; the bias learned on imbalanced data carries the training prior); ``tau`` from
  ``TAUS`` by validation balanced accuracy. No training: seconds.

Both take features as the network's classifier sees them (timm ``forward_head(pre_logits=True)``), so the new head
is folded back into the network's own ``nn.Linear`` classifier.

Example:
    >>> import torch
    >>> w, b, info = tau_norm_head(torch.tensor([[2.0, 1.2], [0.0, 1.0]]),  # class 0's larger norm
    ...                            torch.eye(2), torch.tensor([0, 1]), taus=(0.0, 1.0))  # steals class 1
    >>> [round(x, 4) for x in w.norm(dim=1).tolist()], info["tau"]
    ([1.0, 1.0], 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ImgclfError
from .losses import class_weights
from .tasks import SingleLabelTask

METHODS = ("crt", "tau_norm")
#: the tau grid of tau-normalisation (Kang et al. search [0, 2])
TAUS = tuple(round(0.1 * i, 1) for i in range(21))
METRIC = "balanced_accuracy"


def _balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    from .metrics import compute_metrics

    return compute_metrics(logits, labels, [str(c) for c in range(k)])["balanced_accuracy"]


def crt_head(
    xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, k: int, wd_grid: list[float],
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
    """cRT: a linear head (weight (K, D), bias (K,)) fitted on (N, D) training features ``xtr`` with (N,) labels
    ``ytr`` under the class-balanced objective, picked by balanced accuracy on ``xva``/``yva``.

    Returns the head and ``{"wd": the chosen L2 strength, "grid": one row per strength}``.

    Raises:
        ImgclfError: a class without training features.
    """
    from .probe import fit_lbfgs

    counts = np.bincount(ytr.numpy(), minlength=k)
    if (counts == 0).any():
        missing = int(np.flatnonzero(counts == 0)[0])
        raise ImgclfError(f"cRT needs training images of every class (class index {missing} has none)")
    task = SingleLabelTask("ce", class_weight=tuple(class_weights(counts, "inverse")))
    weight, bias, rows = fit_lbfgs(xtr, ytr, xva, yva, k, wd_grid, max_iter, METRIC, task)
    best = max(rows, key=lambda r: (r["score"], -r["val_loss"]))
    return weight, bias, {"wd": best["wd"], "grid": rows}


def tau_norm_head(
    weight: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, taus: tuple[float, ...] = TAUS
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """tau-normalisation of a head (weight (K, D)): ``w_c / ||w_c||^tau``, zero bias, ``tau`` by balanced accuracy
    on validation features ``xva`` (N, D) / labels ``yva`` (N,) (ties: the smallest tau); the old bias is dropped
    (see the module docstring). Returns the head and ``{"tau": chosen, "grid": [{"tau", "val_balanced_accuracy"}]}``."""
    k = weight.shape[0]
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows, best = [], None
    for tau in taus:
        w = weight / norms**tau
        score = _balanced_accuracy(xva @ w.T, yva, k)
        rows.append({"tau": tau, f"val_{METRIC}": score})
        if best is None or score > best[0]:
            best = (score, tau, w)
    _, tau, w = best
    return w.clone(), torch.zeros(k, dtype=weight.dtype), {"tau": tau, "grid": rows}
