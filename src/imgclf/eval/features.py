"""Pooled backbone features (timm's ``forward_head(pre_logits=True)``), for probes, k-NN and drift."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.loader import SkipLog
from ..dist import autocast


class Features(NamedTuple):
    features: torch.Tensor  # (N, D) float32 on CPU
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) positions in the data source


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D) pre-logits features through timm's model contract."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.inference_mode()
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
    model.eval()
    feats, labels, indices = [], [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        if skips is not None:
            skips.add(batch.skipped)
        if batch.images is None:
            continue
        x = batch.images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, amp_dtype):
            f = pooled_features(model, x)
        feats.append(f.float().cpu())
        labels.append(batch.labels)
        indices.append(batch.indices)
    if not feats:
        d = getattr(model, "num_features", 0)
        return Features(torch.empty(0, d), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    return Features(torch.cat(feats), torch.cat(labels), torch.cat(indices))
