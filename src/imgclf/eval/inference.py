"""Run a model over a loader and collect logits, labels and sample indices (skipping bad files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..artifact import Artifact, load_artifact
from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.sources import Samples
from ..data.transforms import eval_transform
from ..dist import autocast, resolve_device


class Outputs(NamedTuple):
    logits: torch.Tensor  # (N, K) float32 on CPU
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) positions in the data source


@torch.inference_mode()
def infer(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    skips: SkipLog | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> Outputs:
    """Logits for every decodable sample of ``loader``; bad samples go to ``skips``."""
    model.eval()
    logits, labels, indices = [], [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        if skips is not None:
            skips.add(batch.skipped)
        if batch.images is None:
            continue
        x = batch.images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, amp_dtype):
            out = model(x)
        logits.append(out.float().cpu())
        labels.append(batch.labels)
        indices.append(batch.indices)
    if not logits:
        k = getattr(model, "num_classes", 0)
        return Outputs(torch.empty(0, k), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    return Outputs(torch.cat(logits), torch.cat(labels), torch.cat(indices))


def infer_run(
    run_dir: str | Path,
    open_samples: Callable[[Artifact], Samples],
    *,
    batch_size: int = 64,
    num_workers: int = -1,
    device: str = "auto",
    strict_images: bool = False,
    progress: bool = True,
    desc: str = "infer",
) -> tuple[Outputs, Artifact, Samples, SkipLog]:
    """Load a saved run and run it over ``open_samples(artifact)`` with the artifact's eval preprocessing."""
    dev = resolve_device(device)
    model, art = load_artifact(run_dir, dev)
    samples = open_samples(art)
    loader = make_loader(ImageDataset(samples, eval_transform(art.preprocessing)), batch_size, train=False,
                         num_workers=num_workers, pin_memory=dev.type == "cuda")  # fmt: skip
    skips = SkipLog(strict=strict_images)
    out = infer(model, loader, dev, skips=skips, progress=progress, desc=desc)
    return out, art, samples, skips
