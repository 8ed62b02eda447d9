"""The classification task: the model plus its loss, as one module (timm ``task/classification.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy


class ClassificationTask(nn.Module):
    """``forward(images, targets) -> (loss, logits)``.

    Integer targets use label-smoothed cross-entropy; soft (B, K) targets from MixUp/CutMix use
    timm's ``SoftTargetCrossEntropy`` (the smoothing is already inside the mixed targets).
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.soft_loss = SoftTargetCrossEntropy()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)  # (B, K)
        if targets.ndim == 2:  # (B, K) soft targets
            return self.soft_loss(logits.float(), targets), logits
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing), logits
