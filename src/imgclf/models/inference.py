"""Run a model over a loader and collect logits and/or pooled features, labels and sample indices: the one
loop for validation during training, evaluation, prediction, feature extraction (probes, k-NN, OOD
statistics) and test-time augmentation. A batch of (B, V, C, H, W) view stacks (``imgclf.eval.tta``) is
run as B*V images and merged back; unreadable files are skipped into a ``SkipLog``.

It sits below ``train`` (which validates with it) and ``eval`` (which loads runs around it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.loader import ShardSampler, SkipLog
from ..dist import autocast, current, gather_cat, gather_objects
from ..errors import ImgclfError

log = logging.getLogger("imgclf")

MERGES = ("mean_logits", "mean_probs")


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


def embedding_dim(model: nn.Module) -> int:
    """Width D of ``forward_head(pre_logits=True)``: timm's ``head_hidden_size`` (models with a hidden head
    layer, e.g. MobileNetV3 1280 vs 960 ``num_features``, MambaOut, GhostNet), else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or getattr(model, "num_features", 0))


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
    temperature: float | list[float] = 1.0,
    bias: list[float] | None = None,
    multi_label: bool = False,
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
            merged = merge_views(per_view, tta_merge, temperature, bias, multi_label) if views else out
            outs["logits"].append(merged.cpu())
            if views and tta_merge != "mean_logits":
                outs["score"].append(per_view.mean(1).cpu())
        if feats is not None:
            feats = feats.float()
            outs["features"].append((feats.unflatten(0, (-1, views)).mean(1) if views else feats).cpu())
        outs["labels"].append(batch.labels)
        outs["indices"].append(batch.indices)
    n = sum(len(t) for t in outs["labels"])
    k, d = getattr(model, "num_classes", 0), embedding_dim(model)
    empty = {"logits": torch.empty(0, k) if logits else torch.empty(n, 0), "features": torch.empty(0, d),
             "labels": torch.empty(0, dtype=torch.long), "indices": torch.empty(0, dtype=torch.long),
             "score": torch.empty(0, k)}  # fmt: skip
    cat = {key: torch.cat(v) if v else empty[key] for key, v in outs.items()}
    if isinstance(loader.sampler, ShardSampler):
        cat = gather_shards(cat, skips)
    return Outputs(cat["logits"], cat["labels"], cat["indices"], cat["features"] if features else None,
                   cat["score"] if outs["score"] else None)  # fmt: skip


def gather_shards(cat: dict[str, torch.Tensor], skips: SkipLog | None) -> dict[str, torch.Tensor]:
    """Every rank's outputs of a sharded loader (``dist.shard``), in input order, on every rank; the ranks'
    unreadable files are merged into ``skips``. Requested outputs are never empty on a rank whose share had inputs,
    so an output is gathered when any rank has rows of it (collectives run in the same order on every rank)."""
    d = current()
    spec = {k: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) if v.numel() else None for k, v in cat.items()}
    specs = gather_objects((spec, dict(skips.items) if skips is not None else {}), d)
    out = {}
    for k, v in cat.items():
        seen = next((s[0][k] for s in specs if s[0][k] is not None), None)
        if seen is None:  # no rank has values: (0, K) / (N, 0) placeholders stay as they are
            out[k] = v
            continue
        if not v.numel():  # this rank's share was unreadable: an empty block of the others' shape and type
            v = torch.empty((0, *seen[0]), dtype=getattr(torch, seen[1]))
        out[k] = gather_cat(v, d)
    for _, items in specs if skips is not None else ():
        for src, why in items.items():
            skips.items.setdefault(src, why)
    order = torch.argsort(out["indices"])
    for k, v in out.items():
        if len(v) == len(order):
            out[k] = v[order]
        elif v.ndim == 2 and v.shape[1] == 0:  # logits not requested: (N, 0)
            out[k] = v.new_empty((len(order), 0))
    return out


def merge_views(
    logits: torch.Tensor, merge: str = "mean_logits", temperature: Any = 1.0, bias: Any = None,
    multi_label: bool = False,
) -> torch.Tensor:  # fmt: skip
    """(B, V, K) per-view logits -> (B, K): mean logits, or the logits whose calibrated probabilities are the mean
    of the views' calibrated probabilities (``T * log`` of the mean softmax; multi-label, per class:
    ``T (logit(mean sigmoid(z / T + b)) - b)``)."""
    if merge == "mean_probs" and multi_label:
        t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
        b = torch.as_tensor(0.0 if bias is None else bias, dtype=torch.float32, device=logits.device)
        p = (logits.float() / t + b).sigmoid().mean(1).clamp(1e-7, 1 - 1e-7)
        return t * (torch.logit(p) - b)
    if merge == "mean_probs":
        return temperature * (logits.float() / temperature).softmax(-1).mean(1).clamp_min(1e-12).log()
    if merge == "mean_logits":
        return logits.float().mean(1)
    raise ImgclfError(f"--tta-merge must be one of {', '.join(MERGES)} (got {merge!r})")


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


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """No TF32 convolutions / matmuls on CUDA (PyTorch allows TF32 convolutions by default: ~1e-3 relative
    error on Ampere and newer, which would fail a 1e-4 comparison between two exact-equivalent models)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


#: methods by which timm modules turn their training form into the inference form
_FUSE_METHODS = ("fuse", "reparameterize", "switch_to_deploy")
#: a fused model must give the unfused logits within this relative error
REPARAM_RTOL = 1e-4


def reparameterized(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """The inference form of a structurally reparameterizable model (MobileOne, FastViT, RepViT, RepGhost,
    RepVGG, ...: parallel conv/BN branches folded into one conv; ``timm.utils.reparameterize_model`` on a
    copy), checked against the unfused model on two random images of ``input_size`` (C, H, W): the largest
    logit difference must stay within ``REPARAM_RTOL`` of the largest logit. ``model`` itself (in eval mode)
    when nothing fuses, or with a warning when the check fails.

    Example:
        >>> import timm
        >>> m = timm.create_model("mobileone_s0", num_classes=3)
        >>> type(reparameterized(m, (3, 64, 64)).stem.reparam_conv).__name__
        'Conv2d'
    """
    model = model.eval()
    if not any(hasattr(m, name) for m in model.modules() for name in _FUSE_METHODS):
        return model
    from timm.utils import reparameterize_model

    fused = reparameterize_model(model).eval()  # a deep copy: the caller's model stays trainable
    p = next(model.parameters())
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    with torch.no_grad(), _full_precision(p.device):
        ref, got = model(x).float(), fused(x).float()
    rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if not rel <= REPARAM_RTOL:
        log.warning("%s: the reparameterized model differs from the trained one (relative %.1e > %.0e); "
                    "using the unfused model", type(model).__name__, rel, REPARAM_RTOL)  # fmt: skip
        return model
    log.info("%s: reparameterized for inference (relative logit difference %.1e)", type(model).__name__, rel)
    return fused
