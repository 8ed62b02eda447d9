"""Pooled backbone features (timm's ``forward_head(pre_logits=True)``), for probes, k-NN and OOD statistics."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data.loader import SkipLog
from .inference import infer


class Features(NamedTuple):
    features: torch.Tensor  # (N, D) float32 on CPU
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) positions in the data source


def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    skips: SkipLog | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> Features:
    """Features of every decodable sample of ``loader`` (model in eval mode); bad samples go to ``skips``."""
    out = infer(model, loader, device, skips=skips, amp_dtype=amp_dtype, channels_last=channels_last, logits=False,
                features=True, progress=progress, desc=desc)  # fmt: skip
    return Features(out.features, out.labels, out.indices)
