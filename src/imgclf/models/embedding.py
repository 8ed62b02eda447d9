"""Embed a labelled data source with any timm backbone: L2-normalised pooled features
(``forward_head(pre_logits=True)``) under the backbone's own eval preprocessing, for few-shot k-NN indexes
and episodes (``train.knn_index``, ``eval.fewshot``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EmbedConfig, InferConfig, ModelConfig, split_fields
from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.preprocess import Preprocess
from ..data.sources import open_source
from ..dist import resolve_device
from ..errors import ImgclfError
from .factory import architecture_of, create_model
from .inference import extract_features
from .weights import run_dir_weights, run_meta

DEFAULT_MODEL = EmbedConfig.model

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


def backbone(cfg: EmbedConfig, infer: InferConfig | None = None) -> tuple[nn.Module, str, str, Preprocess]:
    """(headless model, weights source, timm arch, preprocessing with ``cfg``'s overrides and ``infer``'s image
    limits applied). A run directory as ``cfg.weights`` (``--weights RUN``) sets the input size, crop and
    interpolation the overrides leave open to the run's own."""
    run = run_dir_weights(cfg.weights)
    if run is not None:
        pre = run_meta(run)["preprocessing"]
        cfg = dataclasses.replace(cfg, input_size=cfg.input_size or int(max(pre["input_size"][1:])),
                                  crop_pct=cfg.crop_pct if cfg.crop_pct is not None else pre.get("crop_pct"),
                                  interpolation=cfg.interpolation or pre.get("interpolation"))  # fmt: skip
    model, source = create_model(ModelConfig(name=cfg.model, weights=cfg.weights), 0, cfg.input_size)
    pre = Preprocess.from_model(model, cfg.data_config(infer))
    return model.eval(), source, architecture_of(model, cfg.model), pre


def open_labelled(data: str | Path, cfg: EmbedConfig, pre: Preprocess, infer: InferConfig):
    """The labelled ``Samples`` of ``data`` (``cfg.split``) decoded per ``pre`` under ``infer``'s image limits,
    at most ``cfg.per_class`` per class (seeded by ``cfg.seed``)."""
    samples = open_source(data, cfg.split, pre.decoder(infer.max_pixels, infer.max_aspect))
    if samples.multi_label:
        raise ImgclfError(f"{samples.name}: label sets (multi-label data); k-NN indexes and few-shot episodes need "
                          "one class per image")  # fmt: skip
    if cfg.per_class is None:
        return samples
    rng = np.random.default_rng(cfg.seed)
    keep = [rng.permutation(np.flatnonzero(samples.labels == c))[: cfg.per_class] for c in np.unique(samples.labels)]
    return samples.subset(np.sort(np.concatenate(keep)))


def embed_samples(
    model: nn.Module, samples, pre: Preprocess, infer: InferConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(N, D) normalised embeddings, (N,) labels of ``samples`` and the unreadable files, on ``infer.device``."""
    device = resolve_device(infer.device)
    loader = make_loader(ImageDataset(samples, pre.eval()), infer.batch_size, train=False,
                         num_workers=infer.workers, pin_memory=device.type == "cuda")  # fmt: skip
    skips = SkipLog(strict=infer.strict_images)
    model = model.to(device, memory_format=torch.channels_last)  # measured ~3x faster on a busy 2-core CPU
    feats = extract_features(model, loader, device, skips=skips, channels_last=True, progress=infer.progress,
                             desc="embed")  # fmt: skip
    return F.normalize(feats.features, dim=-1), feats.labels, dict(skips.items)


def present_classes(labels: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Drop classes without embedded images (empty in the source or all unreadable); relabel densely."""
    present = sorted(set(labels.tolist()))
    lut = torch.full((len(class_names),), -1, dtype=torch.long)
    lut[present] = torch.arange(len(present))
    return lut[labels], [class_names[i] for i in present]


def embed_source(data: str | Path, cfg: EmbedConfig, infer: InferConfig) -> tuple[Embeddings, nn.Module]:
    """``embed``, also returning the backbone (on ``infer.device``)."""
    model, source, arch, pre = backbone(cfg, infer)
    samples = open_labelled(data, cfg, pre, infer)
    feats, labels, skipped = embed_samples(model, samples, pre, infer)
    if len(labels) == 0:
        raise ImgclfError(f"{samples.name}: no readable images to embed")
    labels, names = present_classes(labels, samples.class_names)
    return Embeddings(feats, labels, names, pre, arch, source, skipped), model


def embed_configs(
    cfg: EmbedConfig | None, infer: InferConfig | None, fields: dict[str, Any]
) -> tuple[EmbedConfig, InferConfig]:
    """The two configs of the few-shot functions with ``fields`` applied by name (``config.split_fields``).

    Raises:
        TypeError: ``cfg`` / ``infer`` of another type (an old-style positional model name, ``embed(d,
            "resnet18")``: pass ``model="resnet18"``), or a keyword that is no field of either config."""
    for value, cls, name in ((cfg, EmbedConfig, "cfg"), (infer, InferConfig, "infer")):
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{name} must be an {cls.__name__}, got {value!r}; give fields by name, e.g. model=...")
    return tuple(split_fields(fields, cfg or EmbedConfig(), infer or InferConfig()))  # type: ignore[return-value]


def embed(
    data: str | Path, cfg: EmbedConfig | None = None, infer: InferConfig | None = None, **fields: Any
) -> Embeddings:
    """L2-normalised pooled embeddings of a labelled data source, with the backbone's eval preprocessing.

    Args:
        data: folder, CSV, .npz or ``builtin:NAME[:split]``.
        cfg: backbone (``model``, ``weights``: ``auto``, ``packaged``, ``hub``, ``none`` or a file), which
            images (``split``, ``per_class`` with ``seed``) and preprocessing overrides (``input_size``,
            ``crop_pct``, ``interpolation``, ``pixel_range``, ``background``); default ``EmbedConfig()``.
        infer: device, batch size, loader workers, ``strict_images``, progress and the image limits
            (``max_pixels``, ``max_aspect``); default ``InferConfig()``.
        **fields: any field of either config by name, applied on top (``embed(d, per_class=5, workers=0)``).

    Returns:
        ``Embeddings`` (features (N, D), labels (N,), class names, preprocessing, arch, weights source, skipped).

    Raises:
        TypeError: a keyword that is no field of either config. ImgclfError: unreadable data, unknown model,
        or no readable image.

    Example:
        >>> e = embed("builtin:fashion-mnist", weights="packaged", per_class=20, input_size=64)  # doctest: +SKIP
        >>> e.features.shape  # doctest: +SKIP
        torch.Size([200, 1280])
    """
    cfg, infer = embed_configs(cfg, infer, fields)
    return embed_source(data, cfg, infer)[0]
