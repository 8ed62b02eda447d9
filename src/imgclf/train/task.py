"""The classification task: the model plus its loss, as one module (timm ``task/classification.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassificationTask(nn.Module):
    """``forward(images, labels) -> (loss, logits)`` with label-smoothed cross-entropy."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)  # (B, K)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, logits
