"""Embed a labelled data source with any timm backbone: L2-normalised pooled features
(``forward_head(pre_logits=True)``) under the backbone's own eval preprocessing, for few-shot k-NN indexes
and episodes (``train.knn_index``, ``eval.fewshot``)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DataConfig, ModelConfig
from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.preprocess import Preprocess
from ..data.sources import open_source
from ..dist import resolve_device
from ..errors import ImgclfError
from .factory import architecture_of, create_model
from .inference import extract_features

DEFAULT_MODEL = "tf_efficientnet_lite0"

# --------------------------------------------------------------------------- embedding data


class Embeddings(NamedTuple):
    """A data source embedded by one backbone."""

    features: torch.Tensor  # (N, D) L2-normalised float32 on CPU
    labels: torch.Tensor  # (N,) indices into class_names
    class_names: list[str]  # only classes with at least one embedded image
    preprocessing: Preprocess
    arch: str
    weights_source: str
    skipped: dict[str, str]  # unreadable file -> reason


def backbone(
    model_name: str, weights: str, input_size: int | None, crop_pct: float | None, interpolation: str | None
) -> tuple[nn.Module, str, str, Preprocess]:
    """(headless model, weights source, timm arch, preprocessing with the overrides applied)."""
    overrides = DataConfig(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation)
    model, source = create_model(ModelConfig(name=model_name, weights=weights), num_classes=0)
    return model.eval(), source, architecture_of(model, model_name), Preprocess.from_model(model, overrides)


def open_labelled(data: str | Path, split: str, per_class: int | None, seed: int, pre: Preprocess):
    """The labelled ``Samples`` of ``data`` decoded per ``pre``, at most ``per_class`` per class (seeded)."""
    samples = open_source(data, split, pre.decoder())
    if per_class is None:
        return samples
    if per_class < 1:
        raise ImgclfError(f"per_class must be >= 1 (got {per_class})")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(samples.labels == c))[:per_class] for c in np.unique(samples.labels)]
    return samples.subset(np.sort(np.concatenate(keep)))


def embed_samples(
    model: nn.Module,
    samples,
    pre: Preprocess,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    strict_images: bool,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(N, D) normalised embeddings, (N,) labels of ``samples`` and the unreadable files."""
    loader = make_loader(ImageDataset(samples, pre.eval()), batch_size, train=False,
                         num_workers=num_workers, pin_memory=device.type == "cuda")  # fmt: skip
    skips = SkipLog(strict=strict_images)
    model = model.to(device, memory_format=torch.channels_last)  # measured ~3x faster on a busy 2-core CPU
    feats = extract_features(model, loader, device, skips=skips, channels_last=True, progress=progress, desc="embed")
    return F.normalize(feats.features, dim=-1), feats.labels, dict(skips.items)


def present_classes(labels: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Drop classes without embedded images (empty in the source or all unreadable); relabel densely."""
    present = sorted(set(labels.tolist()))
    lut = torch.full((len(class_names),), -1, dtype=torch.long)
    lut[present] = torch.arange(len(present))
    return lut[labels], [class_names[i] for i in present]


def embed_source(
    data: str | Path, model_name: str, weights: str, *, split: str, per_class: int | None, seed: int,
    input_size: int | None, crop_pct: float | None, interpolation: str | None, device: str,
    batch_size: int, num_workers: int, strict_images: bool, progress: bool,
) -> tuple[Embeddings, nn.Module]:  # fmt: skip
    dev = resolve_device(device)
    model, source, arch, pre = backbone(model_name, weights, input_size, crop_pct, interpolation)
    samples = open_labelled(data, split, per_class, seed, pre)
    feats, labels, skipped = embed_samples(
        model, samples, pre, dev, batch_size=batch_size, num_workers=num_workers,
        strict_images=strict_images, progress=progress,
    )  # fmt: skip
    if len(labels) == 0:
        raise ImgclfError(f"{samples.name}: no readable images to embed")
    labels, names = present_classes(labels, samples.class_names)
    return Embeddings(feats, labels, names, pre, arch, source, skipped), model


def embed(
    data: str | Path,
    model_name: str = DEFAULT_MODEL,
    weights: str = "auto",
    *,
    split: str = "train",
    per_class: int | None = None,
    seed: int = 0,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = -1,
    strict_images: bool = False,
    progress: bool = True,
) -> Embeddings:
    """L2-normalised pooled embeddings of a labelled data source, with the backbone's eval preprocessing.

    Args:
        data: folder, CSV, .npz or ``builtin:NAME[:split]``.
        model_name: timm architecture.
        weights: ``auto``, ``packaged``, ``hub``, ``none`` or a weights file (see ``imgclf models``).
        split: split of a multi-split .npz / built-in set.
        per_class: embed at most this many images per class (seeded random choice); None = all.
        seed: seed of that choice.
        input_size, crop_pct, interpolation: preprocessing overrides (default: the model's pretrained config).
        device: ``auto``, ``cpu``, ``cuda``, ...
        batch_size, num_workers, strict_images, progress: loader and reporting options.

    Returns:
        ``Embeddings`` (features (N, D), labels (N,), class names, preprocessing, arch, weights source, skipped).

    Example:
        >>> e = embed("builtin:fashion-mnist", weights="packaged", per_class=20, input_size=64)  # doctest: +SKIP
        >>> e.features.shape  # doctest: +SKIP
        torch.Size([200, 1280])
    """
    return embed_source(
        data, model_name, weights, split=split, per_class=per_class, seed=seed, input_size=input_size,
        crop_pct=crop_pct, interpolation=interpolation, device=device, batch_size=batch_size,
        num_workers=num_workers, strict_images=strict_images, progress=progress,
    )[0]  # fmt: skip
