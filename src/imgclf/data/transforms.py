"""Preprocessing derived from the model's pretrained config, defined once and stored in the artifact.

``resolve_preprocessing`` reads timm's data config for the model (input size, interpolation,
crop_pct, mean/std) and applies the user's explicit overrides; ``eval_transform`` and
``train_transform`` build timm's transform pipelines from that one dict, so training, evaluation,
prediction and serving can never disagree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import timm.data
import torch
import torch.nn as nn
from torchvision.transforms import v2

from ..config import AugmentConfig, DataConfig
from .images import policy_from_config


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
        pre["decode"] = policy_from_config(data).to_json()  # bit-depth window and alpha background
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


def view_transform(pre: dict[str, Any]):
    """The model's view of an image as a [0, 1] float CHW tensor (``pixel_transform`` / 255)."""
    pixels = pixel_transform(pre)
    return lambda img: pixels(img).float() / 255.0


def pixel_transform(pre: dict[str, Any]):
    """The model's view as uint8 CHW pixels: the input of graphs with preprocessing inside (export)."""
    hwc = pixel_array_transform(pre)
    return lambda img: torch.from_numpy(hwc(img).copy()).permute(2, 0, 1)


def pixel_array_transform(pre: dict[str, Any]):
    """The model's view as a uint8 HWC numpy array: the resize and crop of ``eval_transform`` on the PIL
    image, without the float round trip (``ToTensor`` divides by 255, so the pixels are the same)."""
    ops = []
    for t in eval_transform(pre).transforms:
        if type(t).__name__ in ("MaybeToTensor", "ToTensor", "PILToTensor", "ToImage"):
            break  # the tensor conversion and normalisation follow: the float part
        ops.append(t)  # PIL in, PIL out: resize, crop (timm's ResizeKeepRatio, CenterCropOrPad, ...)

    def run(img):
        for t in ops:
            img = t(img)
        return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1)

    return run


def train_transform(pre: dict[str, Any], aug: AugmentConfig):
    """timm's training pipeline on the same normalisation, plus torchvision v2 geometric ops.

    Order: RandomResizedCrop + flips (timm) -> affine / perspective / TrivialAugmentWide (torchvision)
    -> RandAugment / AugMix / AutoAugment / colour jitter / grayscale (timm) -> tensor, normalise,
    RandomErasing (timm).
    """
    aa = None if aug.auto_augment == "trivialaugment" else aug.auto_augment
    primary, secondary, final = timm.data.create_transform(
        input_size=tuple(pre["input_size"]),
        is_training=True,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter,
        grayscale_prob=aug.grayscale,
        auto_augment=aa,
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        re_prob=aug.re_prob,
        separate=True,
    )
    extra: list = []
    if aug.rotation or aug.translate or aug.shear:
        extra.append(
            v2.RandomAffine(
                degrees=aug.rotation,
                translate=(aug.translate, aug.translate) if aug.translate else None,
                shear=aug.shear or None,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if aug.perspective:
        extra.append(v2.RandomPerspective(distortion_scale=aug.perspective, p=0.5))
    if aug.auto_augment == "trivialaugment":
        extra.append(v2.TrivialAugmentWide())
    return v2.Compose([*primary.transforms, *extra, *secondary.transforms, *final.transforms])
