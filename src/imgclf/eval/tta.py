"""Test-time augmentation: several views of each image through the same model, merged.

Views are built from the artifact's preprocessing (timm/torchvision ops only): ``flip`` (the image
and its mirror), ``five_crop`` / ``ten_crop`` (torchvision FiveCrop/TenCrop of the resized image),
``multiscale`` (centre crops at three zoom levels, each resized to the input size, so it works for
ViTs too), and ``flip_multiscale`` (both). Merging averages logits (``mean_logits``) or the views'
calibrated probabilities (``mean_probs``, returned as ``T * log(mean p)`` so that the usual
``softmax(logits / T)`` downstream gives exactly that mean). OOD scores under TTA use the views'
mean logits and mean features (the thresholds were fitted on single views, so rejection rates can
shift slightly).

Example:
    >>> t = tta_transform(PRE, "flip")  # doctest: +SKIP
    >>> t(img).shape                     # doctest: +SKIP
    torch.Size([2, 3, 224, 224])
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from ..data.preprocess import Preprocess
from ..errors import ImgclfError
from ..models.inference import MERGES, merge_views  # noqa: F401 - part of the TTA API

MODES = ("flip", "five_crop", "ten_crop", "multiscale", "flip_multiscale")
ZOOMS = (0.9, 1.0, 1.1)  # multiscale: crop fractions relative to the model's crop_pct (capped at 1)


def _interp(name: str) -> v2.InterpolationMode:
    """The run's interpolation, exactly as its eval transform uses it (timm's table; ``Preprocess`` refuses a
    name outside it, so there is no silent substitute)."""
    from timm.data.transforms import str_to_interp_mode

    return str_to_interp_mode(name)


def tta_transform(pre: Preprocess, mode: str):
    """A transform from a PIL image to a (V, C, H, W) stack of views."""
    if mode not in MODES:
        raise ImgclfError(f"--tta must be one of {', '.join(MODES)} (got {mode!r})")
    size = pre.size
    if mode in ("five_crop", "ten_crop"):
        resize = v2.Resize(math.floor(size[0] / pre.crop_pct), interpolation=_interp(pre.interpolation))
        crops = v2.FiveCrop(size) if mode == "five_crop" else v2.TenCrop(size)
        to_t, norm = v2.PILToTensor(), pre.normalize()  # the eval transform's own normalisation
        return lambda img: torch.stack([norm(to_t(c)) for c in crops(resize(img))])
    zooms = [pre.crop_pct * z for z in (ZOOMS if "multiscale" in mode else (1.0,))]
    zooms = [z / max(1.0, max(zooms)) for z in zooms]  # a crop cannot exceed the image: shift the zooms down
    views = [pre.with_crop(z).eval() for z in zooms]
    flip = "flip" in mode

    def apply(img):
        out = [v(img) for v in views]
        if flip:
            out += [o.flip(-1) for o in out]
        return torch.stack(out)

    return apply
