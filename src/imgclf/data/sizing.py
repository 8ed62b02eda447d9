"""The data's native resolution, and the input size ``data.input_size auto`` picks from it.

A folder of 28 px images trained at a model's default 224 px spends ~64x the compute of 28 px on pixels that
are only interpolated (EfficientNet-Lite0 on a 3,000-image 28 px folder ran at 16 img/s that way). The rule
(``auto_input_size``), measured by ``bench/input_size_fmnist.py`` (README, "Input size on 28 px data"):

- when the images' median shorter side is at most half the model's default input size, train at the smallest
  multiple of ``STRIDE`` (32, the output stride of timm's CNNs) at least ``UPSCALE`` x that side, and evaluate
  the whole image (``crop_pct`` 1.0 unless set: a centre crop would drop an eighth of the few pixels there are);
- otherwise, and for fixed-size architectures (ViT, Swin, ...: resampling their position embeddings to a few
  patches is not measured here), keep the model's default; the log says what a smaller size would save.

Example:
    >>> a = auto_input_size(28, 224)
    >>> a.size, a.crop_pct, a.message[:59]
    (32, 1.0, 'input size 32, crop_pct 1.0 (data 28 px; model default 224)')
    >>> auto_input_size(200, 224).size is None
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .images import BadImage, file_facts
from .sources import Samples

STRIDE = 32  # output stride of timm's CNNs: sizes that are multiples of it waste no padding
#: x the native side. Upsampling pays per epoch but not per unit of compute (bench/input_size_fmnist.py, packaged
#: Lite0 on 2,250 Fashion-MNIST images, 10,000 test images): 3 epochs at 32 / 64 / 96 px gave 81.9 / 85.8 / 88.5 %,
#: but 12 epochs at 32 px (the compute of 3 at 64 px) gave 86.4 %: spend the compute on epochs, or choose a size
UPSCALE = 1.0
MUCH_SMALLER = 0.5  # auto acts when the data's side is at most this fraction of the model's default
PROBE_FILES = 256  # headers read to estimate a folder's native size
AUTO_CROP_PCT = 1.0  # near the native size the eval view is the whole image


class AutoSize(NamedTuple):
    """What ``data.input_size auto`` resolved to: ``size`` (None: the model's default), ``crop_pct`` (None: the
    model's) and the line to log (empty when there is nothing to say)."""

    size: int | None
    crop_pct: float | None
    message: str


def native_sides(samples: Samples, limit: int = PROBE_FILES) -> np.ndarray:
    """(n, 2) int (height, width) of up to ``limit`` images spread evenly over ``samples``: the array's shape for
    in-memory arrays, else file headers (no pixel decoding); unreadable files are left out."""
    if samples.arrays is not None:
        h, w = samples.arrays.shape[1:3]
        return np.array([[h, w]])
    n = len(samples)
    picks = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)) if n else []
    sides = []
    for i in picks:
        item = samples.items[i]
        try:
            if isinstance(item, str):
                w, h = file_facts(item)["size"]
            else:  # a source without files: decode it
                w, h = samples.load(int(i)).size
        except (BadImage, OSError):
            continue
        sides.append((h, w))
    return np.array(sides, dtype=np.int64).reshape(-1, 2)


def median_side(samples: Samples) -> int | None:
    """The median shorter side (pixels) of ``native_sides``, or None when no image could be read."""
    sides = native_sides(samples)
    return int(np.median(sides.min(1))) if len(sides) else None


def auto_input_size(native: int | None, default: int | None, fixed: bool = False,
                    crop_pct: float | None = None) -> AutoSize:  # fmt: skip
    """``AutoSize`` for data of ``native`` px (median shorter side) and a model whose default input is ``default``
    px (``fixed``: a fixed-size architecture); a given ``crop_pct`` is kept. See the module docstring."""
    if native is None or default is None or native > MUCH_SMALLER * default:
        return AutoSize(None, crop_pct, "")
    size = max(STRIDE, math.ceil(native * UPSCALE / STRIDE) * STRIDE)
    saved = (default / size) ** 2
    if fixed:
        return AutoSize(None, crop_pct, f"input size {default} (model default; data {native} px): a fixed-size "
                                    f"architecture keeps its size under data.input_size auto; --input-size {size} "
                                    f"would need ~{saved:.0f}x less compute per image")  # fmt: skip
    crop = f", crop_pct {AUTO_CROP_PCT}" if crop_pct is None else ""
    return AutoSize(size, AUTO_CROP_PCT if crop_pct is None else crop_pct,
                    f"input size {size}{crop} (data {native} px; model default {default}): ~{saved:.0f}x less "
                    "compute per image (data.input_size auto; --input-size N to choose)")  # fmt: skip
