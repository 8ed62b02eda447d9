"""Run a model over a loader and collect logits and/or pooled features, labels and sample indices.

One loop for evaluation, prediction, feature extraction and test-time augmentation: a batch of
(B, V, C, H, W) view stacks (from ``imgclf.eval.tta``) is run as B*V images and merged back.
Unreadable files are skipped into a ``SkipLog``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..artifact import Artifact, load_artifact
from ..data.images import MAX_ASPECT, PILLOW_MAX_PIXELS, DecodePolicy
from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.sources import Samples
from ..data.transforms import eval_transform
from ..dist import autocast, resolve_device
from .tta import merge_views, tta_transform

log = logging.getLogger("imgclf")


def run_decode_policy(art: Artifact, max_pixels: int | None = PILLOW_MAX_PIXELS,
                      max_aspect: float | None = MAX_ASPECT) -> DecodePolicy:  # fmt: skip
    """How a run decodes its inputs (as in training: stored in the artifact) with this command's limits."""
    return DecodePolicy.from_preprocessing(art.preprocessing, max_pixels=max_pixels or None,
                                           max_aspect=max_aspect or None)  # fmt: skip


def check_inputs(samples: Samples, progress: bool = False) -> None:
    """Read the inputs' headers (``Samples.check_files``: non-images and images over the limits are known
    before decoding) and say once what discovery noticed (hidden files ignored, animations read as one frame)."""
    samples.check_files(progress=progress)
    for note in samples.notes:
        log.warning(note)


class Outputs(NamedTuple):
    logits: torch.Tensor  # (N, K) float32 on CPU (empty (N, 0) when not requested)
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) positions in the data source
    features: torch.Tensor | None = None  # (N, D) pooled pre-logits features when requested
    score_logits: torch.Tensor | None = None  # TTA with mean_probs: the views' mean logits, for OOD scores

    @property
    def ood_logits(self) -> torch.Tensor:
        """The logits OOD scores are computed from (mean logits under TTA)."""
        return self.logits if self.score_logits is None else self.score_logits


def forward_both(model: nn.Module, x: torch.Tensor, logits: bool, features: bool):
    """Logits and/or pooled features through timm's contract, sharing one ``forward_features``."""
    fmap = model.forward_features(x)
    feats = model.forward_head(fmap, pre_logits=True) if features else None
    out = model.forward_head(fmap) if logits else None
    return out, feats


@torch.no_grad()  # not inference_mode: outputs feed autograd later (temperature, probes)
def infer(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    skips: SkipLog | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    logits: bool = True,
    features: bool = False,
    tta_merge: str = "mean_logits",
    temperature: float = 1.0,
    progress: bool = False,
    desc: str = "eval",
) -> Outputs:
    """Logits (and/or features) for every decodable sample of ``loader``; bad samples go to ``skips``."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "indices": [], "features": [], "score": []}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        if skips is not None:
            skips.add(batch.skipped)
        if batch.images is None:
            continue
        x = batch.images.to(device, non_blocking=True)
        views = x.shape[1] if x.ndim == 5 else 0  # (B, V, C, H, W) from test-time augmentation
        x = (x.flatten(0, 1) if views else x).contiguous(memory_format=fmt)
        with autocast(device, amp_dtype):
            out, feats = forward_both(model, x, logits, features)
        if out is not None:
            out = out.float()
            per_view = out.unflatten(0, (-1, views)) if views else None
            outs["logits"].append((merge_views(per_view, tta_merge, temperature) if views else out).cpu())
            if views and tta_merge != "mean_logits":
                outs["score"].append(per_view.mean(1).cpu())
        if feats is not None:
            feats = feats.float()
            outs["features"].append((feats.unflatten(0, (-1, views)).mean(1) if views else feats).cpu())
        outs["labels"].append(batch.labels)
        outs["indices"].append(batch.indices)
    n = sum(len(t) for t in outs["labels"])
    k, d = getattr(model, "num_classes", 0), getattr(model, "num_features", 0)
    empty = {"logits": torch.empty(0, k) if logits else torch.empty(n, 0), "features": torch.empty(0, d),
             "labels": torch.empty(0, dtype=torch.long), "indices": torch.empty(0, dtype=torch.long),
             "score": torch.empty(0, k)}  # fmt: skip
    cat = {key: torch.cat(v) if v else empty[key] for key, v in outs.items()}
    return Outputs(cat["logits"], cat["labels"], cat["indices"], cat["features"] if features else None,
                   cat["score"] if outs["score"] else None)  # fmt: skip


def infer_run(
    run: str | Path | Artifact,
    open_samples: Callable[[Artifact, DecodePolicy], Samples],
    *,
    batch_size: int = 64,
    num_workers: int = -1,
    device: str = "auto",
    strict_images: bool = False,
    progress: bool = True,
    features: bool = False,
    tta: str | None = None,
    tta_merge: str = "mean_logits",
    desc: str = "infer",
    max_pixels: int | None = PILLOW_MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
) -> tuple[Outputs, Artifact, Samples, SkipLog]:
    """Load a saved run and run it over ``open_samples(artifact, decode_policy)`` with the artifact's decoding
    (bit depth, background; within ``max_pixels``/``max_aspect``) and eval preprocessing (or its TTA views)."""
    dev = resolve_device(device)
    model, art = load_artifact(run, dev)
    samples = open_samples(art, run_decode_policy(art, max_pixels, max_aspect))
    check_inputs(samples, progress)
    transform = tta_transform(art.preprocessing, tta) if tta else eval_transform(art.preprocessing)
    loader = make_loader(ImageDataset(samples, transform), batch_size, train=False, num_workers=num_workers,
                         pin_memory=dev.type == "cuda")  # fmt: skip
    skips = SkipLog(strict=strict_images)
    temperature = float((art.extra.get("calibration") or {}).get("temperature", 1.0))
    out = infer(model, loader, dev, skips=skips, progress=progress, desc=desc, features=features, tta_merge=tta_merge,
                temperature=temperature, channels_last=dev.type != "mps")  # fmt: skip
    return out, art, samples, skips
