"""Training augmentation on a run's ``Preprocess`` (``data.preprocess``): timm's pipeline plus torchvision v2
geometric ops, normalised exactly as the eval transform."""

from __future__ import annotations

from typing import TYPE_CHECKING

import timm.data
from torchvision.transforms import v2

from ..config import AugmentConfig

if TYPE_CHECKING:
    from .preprocess import Preprocess


def train_transform(pre: Preprocess, aug: AugmentConfig):
    """timm's training pipeline on the same normalisation, plus torchvision v2 geometric ops.

    Order: RandomResizedCrop + flips (timm) -> affine / perspective / TrivialAugmentWide (torchvision)
    -> RandAugment / AugMix / AutoAugment / colour jitter / grayscale (timm) -> tensor, normalise,
    RandomErasing (timm).
    """
    aa = None if aug.auto_augment == "trivialaugment" else aug.auto_augment
    primary, secondary, final = timm.data.create_transform(
        input_size=pre.input_size,
        is_training=True,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter,
        grayscale_prob=aug.grayscale,
        auto_augment=aa,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
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
