"""Preprocessing derived from the model's pretrained config, defined once and stored in the artifact.

``resolve_preprocessing`` reads timm's data config for the model (input size, interpolation,
crop_pct, mean/std) and applies the user's explicit overrides; ``eval_transform`` and
``train_transform`` build timm's transform pipelines from that one dict, so training, evaluation,
prediction and serving can never disagree.
"""

from __future__ import annotations

from typing import Any

import timm.data
import torch.nn as nn

from ..config import AugmentConfig, DataConfig


def resolve_preprocessing(model: nn.Module, data: DataConfig | None = None) -> dict[str, Any]:
    """The model's preprocessing as a JSON-ready dict, with the ``data`` overrides applied."""
    cfg = timm.data.resolve_model_data_config(model)
    pre = {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    if data is not None:
        if data.input_size is not None:
            pre["input_size"] = [pre["input_size"][0], data.input_size, data.input_size]
        if data.crop_pct is not None:
            pre["crop_pct"] = data.crop_pct
        if data.interpolation is not None:
            pre["interpolation"] = data.interpolation
    return pre


def eval_transform(pre: dict[str, Any]):
    """Resize, centre crop, to tensor, normalise: the only transform used by eval, predict and export."""
    return timm.data.create_transform(
        input_size=tuple(pre["input_size"]),
        is_training=False,
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        crop_pct=pre["crop_pct"],
        crop_mode=pre["crop_mode"],
    )


def train_transform(pre: dict[str, Any], aug: AugmentConfig):
    """timm's training pipeline (RandomResizedCrop, flips, jitter, auto-augment, erasing), same normalisation."""
    return timm.data.create_transform(
        input_size=tuple(pre["input_size"]),
        is_training=True,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        re_prob=aug.re_prob,
    )
