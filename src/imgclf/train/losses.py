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
    smoothing is already inside the mixed targets: timm ``SoftTargetCrossEntropy``)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:  # (B, K) soft targets
            return self.soft(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)


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


#: loss name (``train.loss``) -> factory taking the task's settings
LOSSES = {
    "ce": lambda t: CrossEntropyLoss(t.label_smoothing),
    "focal": lambda t: FocalLoss(t.focal_gamma, t.focal_alpha, t.label_smoothing),
}
