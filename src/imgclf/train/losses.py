"""Classification losses, each an ``nn.Module`` ``(logits (B, K), targets) -> scalar``, picked by name.

``targets`` are integer class indices (B,) or soft targets (B, K) (MixUp/CutMix, label smoothing). A new
loss is one class registered in ``LOSSES`` plus its name in ``config.TrainConfig.loss``.

Example:
    >>> import torch
    >>> loss = FocalLoss(gamma=0.0)  # gamma 0 is cross-entropy
    >>> x, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    >>> round(float(loss(x, y)), 4) == round(float(torch.nn.functional.cross_entropy(x, y)), 4)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy


def soft_targets(targets: torch.Tensor, k: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices or (B, K) soft targets -> (B, K) soft targets with ``smoothing`` spread evenly
    (as ``F.cross_entropy(label_smoothing=...)``: y (1 - s) + s / K)."""
    y = F.one_hot(targets, k).float() if targets.ndim == 1 else targets.float()
    return y * (1 - smoothing) + smoothing / k if smoothing else y


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with label smoothing (integer targets) or against soft targets (MixUp/CutMix, whose
    smoothing is already inside the mixed targets: timm ``SoftTargetCrossEntropy``).

    ``weight`` (K,): class-weighted cross-entropy, PyTorch's weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}``
    (soft targets: each target's weight is ``sum_k w_k y_k``). ``logit_offset`` (K,) is added to the logits
    inside the loss only: ``tau * log(prior)`` gives the logit-adjusted loss (Menon et al. 2021, "Long-tail
    learning via logit adjustment") and ``log(n_k)`` the balanced softmax (Ren et al. 2020); the model's
    own logits then estimate the balanced (uniform-prior) posterior.
    """

    def __init__(self, label_smoothing: float = 0.0, weight: Sequence[float] | None = None,
                 logit_offset: Sequence[float] | None = None):  # fmt: skip
        super().__init__()
        self.label_smoothing = label_smoothing
        self.soft = SoftTargetCrossEntropy()
        for name, v in (("weight", weight), ("logit_offset", logit_offset)):
            self.register_buffer(name, None if v is None else torch.as_tensor(v, dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        if self.logit_offset is not None:
            z = z + self.logit_offset.to(z.device)
        w = None if self.weight is None else self.weight.to(z.device)
        if targets.ndim == 2:  # (B, K) soft targets
            if w is None:
                return self.soft(z, targets)
            per = torch.sum(-targets * w * F.log_softmax(z, dim=-1), dim=-1)  # (B,)
            return per.sum() / (targets * w).sum().clamp_min(1e-12)
        return F.cross_entropy(z, targets, weight=w, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", extended to K classes):
    ``-sum_k alpha_k y_k (1 - p_k)^gamma log p_k`` averaged over the batch, ``p = softmax(logits)``.

    ``gamma`` (>= 0) down-weights easy, confident examples (0 = cross-entropy); ``alpha`` is one weight for
    every class (a float) or a weight per class (K values), None = 1. Integer targets are smoothed by
    ``label_smoothing``; soft (B, K) targets are used as they are.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = float(gamma), label_smoothing
        a = torch.as_tensor(1.0 if alpha is None else alpha, dtype=torch.float32)
        self.register_buffer("alpha", a, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, K)
        y = soft_targets(targets, logp.shape[-1], self.label_smoothing if targets.ndim == 1 else 0.0)
        if self.alpha.ndim and self.alpha.numel() != logp.shape[-1]:
            raise ValueError(f"focal alpha has {self.alpha.numel()} values for {logp.shape[-1]} classes")
        weight = self.alpha.to(logp.device) * (1 - logp.exp()).pow(self.gamma)  # (B, K) or broadcast
        return torch.sum(-y * weight * logp, dim=-1).mean()


def class_weights(counts: Sequence[int], scheme: str, beta: float = 0.9999) -> list[float]:
    """Per-class loss weights (K,) from training counts, normalised to sum to K (Cui et al. 2019):

    - ``inverse``: ``1 / n_k``; ``sqrt_inverse``: ``1 / sqrt(n_k)``;
    - ``effective``: ``(1 - beta) / (1 - beta^n_k)``, the inverse effective number of samples (Cui et al.
      2019, "Class-Balanced Loss Based on Effective Number of Samples"; beta -> 1 is ``inverse``, 0 uniform).

    A class without training images gets the largest weight of the others (it only meets smoothed or mixed
    targets). Raises ValueError for an unknown ``scheme``."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if scheme == "inverse":
        w = 1 / n
    elif scheme == "sqrt_inverse":
        w = 1 / n.sqrt()
    elif scheme == "effective":
        w = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    else:
        raise ValueError(f"unknown class weighting {scheme!r} (inverse, sqrt_inverse, effective)")
    present = n > 0
    w = torch.where(present, w, w[present].max() if present.any() else torch.ones(()))
    return (w * len(w) / w.sum()).tolist()


def _offset(t) -> list[float] | None:
    """The logit offset of a task's loss: ``tau * log(prior)`` (logit_adjusted) or ``log(prior)`` (balanced
    softmax, tau = 1; the offsets differ from ``log n_k`` by a constant, which softmax ignores)."""
    if t.loss not in ("logit_adjusted", "balanced_softmax") or t.class_prior is None:
        return None
    tau = t.la_tau if t.loss == "logit_adjusted" else 1.0
    return [tau * float(torch.log(torch.tensor(max(p, 1e-12)))) for p in t.class_prior]


def _focal_alpha(t):
    """Focal alpha composed with the class weights (their product per class)."""
    if t.class_weight is None:
        return t.focal_alpha
    a = torch.as_tensor(1.0 if t.focal_alpha is None else t.focal_alpha, dtype=torch.float32)
    return (a * torch.as_tensor(t.class_weight, dtype=torch.float32)).tolist()


#: loss name (``train.loss``) -> factory taking the task's settings
LOSSES = {
    "ce": lambda t: CrossEntropyLoss(t.label_smoothing, t.class_weight),
    "focal": lambda t: FocalLoss(t.focal_gamma, _focal_alpha(t), t.label_smoothing),
    "logit_adjusted": lambda t: CrossEntropyLoss(t.label_smoothing, t.class_weight, _offset(t)),
    "balanced_softmax": lambda t: CrossEntropyLoss(t.label_smoothing, t.class_weight, _offset(t)),
}


# --- multi-label: one sigmoid per class, dense (B, K) 0/1 (or mixed / smoothed) targets --------------------------
# Every multi-label loss sums over the K classes and averages over the batch (timm's "batchmean", the reduction of
# the ASL paper per image), so the gradient of one class does not shrink as classes are added. Label smoothing
# moves each binary target towards 0.5: y (1 - s) + s / 2 (timm ``smooth_dense``); it is applied to mixed targets
# too (MixUp/CutMix mix the raw multi-hot targets; smoothing is linear, so the order does not matter).


def bce_loss(label_smoothing: float = 0.0, pos_weight: Sequence[float] | None = None) -> nn.Module:
    """Binary cross-entropy with logits per class (timm ``BinaryCrossEntropy``), ``pos_weight`` (K,) scaling the
    positive term of each class (``torch.nn.BCEWithLogitsLoss`` semantics)."""
    from timm.loss import BinaryCrossEntropy

    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
    return BinaryCrossEntropy(smoothing=label_smoothing, sum_classes=True, pos_weight=pw, smooth_dense=True)


def asl_loss(
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    label_smoothing: float = 0.0,
    pos_weight: Sequence[float] | None = None,
    weight: Sequence[float] | None = None,
) -> nn.Module:
    """Asymmetric loss (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification"; timm
    ``AsymmetricLossMultiLabel``): focusing ``gamma_neg`` on negatives, ``gamma_pos`` on positives, and the
    probability margin ``clip`` shifted onto negatives. ``weight`` (K,) scales each class's whole loss."""
    from timm.loss import AsymmetricLossMultiLabel

    def t(v):
        return None if v is None else torch.as_tensor(v, dtype=torch.float32)

    return AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, smoothing=label_smoothing,
                                    reduction="batchmean", pos_weight=t(pos_weight), weight=t(weight))  # fmt: skip


def sigmoid_focal_loss(
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    pos_weight: Sequence[float] | None = None,
) -> nn.Module:
    """Sigmoid focal loss (Lin et al. 2017; ``torchvision.ops.sigmoid_focal_loss``):
    ``-alpha y (1 - p)^gamma log p - (1 - alpha)(1 - y) p^gamma log(1 - p)`` per class.

    It is the asymmetric loss with ``gamma_neg = gamma_pos = gamma`` and no clipping; ``alpha`` (one value or one
    per class, in (0, 1); None = 1 for both terms) becomes ASL's per-class ``weight = 1 - alpha`` and positive
    weight ``alpha / (1 - alpha)``, times ``pos_weight`` when given."""
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
    weight = None
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=torch.float32)
        weight, ratio = 1 - a, a / (1 - a)
        pw = ratio if pw is None else pw * ratio
    return asl_loss(gamma, gamma, 0.0, label_smoothing, pw, weight)


#: multi-label loss name (``train.loss``) -> factory taking the task's settings
MULTILABEL_LOSSES = {
    "bce": lambda t: bce_loss(t.label_smoothing, t.pos_weight),
    "asl": lambda t: asl_loss(t.asl_gamma_neg, t.asl_gamma_pos, t.asl_clip, t.label_smoothing, t.pos_weight),
    "focal": lambda t: sigmoid_focal_loss(t.focal_gamma, t.focal_alpha, t.label_smoothing, t.pos_weight),
}
