"""Batched training augmentation on the device: random-resized-crop, flips, affine, grayscale, normalisation and
random erasing of a whole uint8 batch at once, each image with its own random parameters.

The counterpart of the PIL pipeline (``data.transforms.train_transform``: timm's RandomResizedCrop + flips,
torchvision's RandomAffine, RandomGrayscale, normalisation, timm's RandomErasing) for the fast data path
(``data.fastpath``). Parameters are drawn as those transforms draw them (timm's ten-attempt crop sampling with
its centre-crop fallback, integer crop boxes and translations, the same ranges), for every image of the batch in
one tensor op, from one ``torch.Generator`` on the batch's device. torchvision v2 transforms applied to a batched
tensor would draw one parameter set for the whole batch, and kornia is not a dependency, so the ops are ours:

- the crop-and-resize is Pillow's own resampling written as two matrices per image, ``out = Ry @ img @ Rx^T``
  (``resample_matrix``: Pillow's filter kernels, support widened when shrinking, so it antialiases like
  ``Image.resize``), with the flips folded in as reversed rows; two batched matmuls, clipped and rounded like
  Pillow's two passes, reproduce the PIL path's pixels to one grey level for every filter (a test checks).
  ``affine_grid``/``grid_sample`` would be one call too, but its cubic kernel is not Pillow's (a = -0.75, not
  -0.5) and it does not antialias: up to 29 grey levels off on a noisy 28 px image;
- RandomAffine (rotation, translation, x-shear, black fill) is one ``grid_sample`` of the resized batch, as the PIL
  path applies it to the resized crop: bilinear with edge clamping inside the image, fill outside, as Pillow's
  ``Image.transform`` does.

Example:
    >>> aug = BatchAugment((8, 8), mean=(0.5,), std=(0.5,), hflip=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    >>> x = torch.arange(8, dtype=torch.uint8).mul(30).expand(2, 1, 8, 8)  # a horizontal ramp
    >>> y = aug(x, torch.Generator().manual_seed(0))
    >>> y.shape, bool((y[:, :, :, 0] > y[:, :, :, -1]).all())  # flipped: bright on the left
    (torch.Size([2, 1, 8, 8]), True)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a, x = -0.5, x.abs()  # Pillow's cubic (a = -0.5; PyTorch's is -0.75)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 3, torch.sinc(x) * torch.sinc(x / 3), torch.zeros_like(x))


def _hamming(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    h = torch.sinc(x) * (0.54 + 0.46 * torch.cos(math.pi * x))
    return torch.where(x < 1, h, torch.zeros_like(x))


#: Pillow's resampling filters (``libImaging/Resample.c``): name -> (support, kernel); nearest is special-cased
FILTERS = {
    "box": (0.5, lambda x: ((x > -0.5) & (x <= 0.5)).to(x.dtype)),
    "bilinear": (1.0, lambda x: (1 - x.abs()).clamp_min(0)),
    "hamming": (1.0, _hamming),
    "bicubic": (2.0, _bicubic),
    "lanczos": (3.0, _lanczos),
}
CROP_ATTEMPTS = 10  # timm's RandomResizedCropAndInterpolation.get_params and RandomErasing try ten times
ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing defaults (min_area, max_area, min_aspect 0.3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # Pillow's convert("L") (ITU-R 601-2), what RandomGrayscale uses


@dataclass(frozen=True)
class BatchAugment:
    """Augment (B, c, h, w) uint8 images into a (B, C, H, W) float32 normalised batch on their device.

    Args:
        size: (H, W) output size (the model's input size).
        mean, std: per-output-channel normalisation of [0, 1] pixels (C values each); a 1-channel input is
            repeated to C channels.
        interpolation: the resize filter, one of Pillow's (``FILTERS``) or ``nearest``.
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        hflip, vflip: flip probabilities.
        rotation: degrees (+/-); translate: fraction of the size; shear: x-shear degrees (+/-) (RandomAffine).
        grayscale: RandomGrayscale probability; re_prob: RandomErasing probability (timm's ``const`` mode).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rotation: float = 0.0
    translate: float = 0.0
    shear: float = 0.0
    grayscale: float = 0.0
    re_prob: float = 0.0

    @classmethod
    def from_config(cls, pre: Any, aug: Any) -> BatchAugment:
        """From a ``Preprocess`` (size, mean/std, interpolation) and an ``AugmentConfig``."""
        return cls(pre.size, pre.mean, pre.std, pre.interpolation, tuple(aug.scale), tuple(aug.ratio), aug.hflip,
                   aug.vflip, aug.rotation, aug.translate, aug.shear, aug.grayscale, aug.re_prob)  # fmt: skip

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, c, h, w) uint8 (c = 1 or 3) -> (B, C, H, W) float32; ``g`` lives on ``images.device``."""
        b, c, h, w = images.shape
        dev, (oh, ow) = images.device, self.size
        top, left, ch, cw = crop_boxes(b, h, w, self.scale, self.ratio, g, dev).unbind(1)
        u = torch.rand(b, 2, generator=g, device=dev)  # Python scalars only below: no host-to-device copy per batch
        hflip, vflip = u[:, 0] < self.hflip, u[:, 1] < self.vflip
        ry = resample_matrix(top, ch, h, oh, self.interpolation, vflip)  # (B, H, h)
        rx = resample_matrix(left, cw, w, ow, self.interpolation, hflip)  # (B, W, w)
        # Pillow's two passes, horizontal first, each clipped and rounded to uint8 (cubic filters overshoot)
        x = (images.float() @ rx.transpose(1, 2).unsqueeze(1)).clamp_(0, 255).round_()  # (B, c, h, W)
        x = (ry.unsqueeze(1) @ x).clamp_(0, 255).round_()  # (B, c, H, W)
        if self.rotation or self.translate or self.shear:
            theta = affine_theta(b, self.size, self.rotation, self.translate, self.shear, g, dev)
            grid = F.affine_grid(theta, [b, c, oh, ow], align_corners=False)
            # Pillow's affine: a source point outside the image is fill (0), one inside is bilinear with the
            # neighbours clamped to the edge (not blended with the fill, as zero padding would)
            inside = ((grid >= -1) & (grid < 1)).all(-1, keepdim=True).permute(0, 3, 1, 2)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).round_() * inside
        if self.grayscale and c == 3:
            wr, wg, wb = GREY_WEIGHTS
            grey = (wr * x[:, :1] + wg * x[:, 1:2] + wb * x[:, 2:]).round_()
            pick = torch.rand(b, generator=g, device=dev) < self.grayscale
            x = torch.where(pick.view(b, 1, 1, 1), grey.expand_as(x), x)
        mean, std = _per_channel(self.mean, dev), _per_channel(self.std, dev)
        x = (x.expand(-1, len(self.mean), -1, -1) / 255 - mean) / std  # torchvision's ToTensor + Normalize order
        if self.re_prob:
            x = x.masked_fill(erase_masks(b, self.size, self.re_prob, g, dev)[:, None], 0.0)
        return x


@functools.lru_cache(maxsize=16)
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) float32 ``values`` on ``device``, made once per device (not copied to it every batch)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, size: int, out: int, filter: str,
                    flip: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(n, out, size) float32 matrices that resize the span [start, start + length) of a ``size``-pixel axis to
    ``out`` pixels as Pillow's ``Image.crop(...).resize(...)`` does (``Resample.c``: ``precompute_coeffs``): output
    pixel i is centred at (i + 0.5) * length / out in the crop; the filter is stretched by the shrink factor
    when shrinking (antialiasing); taps outside the crop are dropped and each row sums to 1. ``start``, ``length``:
    (n,) integer-valued float tensors; ``flip`` (n,) bool reverses the output. Only the few taps of each output
    pixel are evaluated (then scattered into the matrix), not the whole (out, size) grid."""
    dev, n = start.device, len(start)
    scale = (length / out).view(n, 1)
    i = torch.arange(out, device=dev, dtype=torch.float32).view(1, out).expand(n, out)
    if flip is not None:
        i = torch.where(flip.view(n, 1), out - 1 - i, i)  # a flipped output reads its rows in reverse
    centre = (i + 0.5) * scale  # (n, out), in crop pixels
    m = torch.zeros(n, out, size, device=dev)
    if filter == "nearest":  # Pillow: the pixel under the centre
        col = torch.minimum(torch.floor(centre), length.view(n, 1) - 1) + start.view(n, 1)
        return m.scatter_(2, col.long().unsqueeze(-1), 1.0)
    support, kernel = FILTERS[filter]
    fs = scale.clamp_min(1.0).unsqueeze(-1)  # (n, 1, 1)
    taps = math.ceil(2 * support * max(size / out, 1.0)) + 2  # enough for the widest stretch (a whole-axis crop)
    lo = torch.floor(centre - support * fs[..., 0] + 0.5).clamp_min(0)  # Pillow's xmin
    hi = torch.minimum(torch.floor(centre + support * fs[..., 0] + 0.5), length.view(n, 1))  # Pillow's xmax
    pos = lo.unsqueeze(-1) + torch.arange(taps, device=dev, dtype=torch.float32)  # (n, out, taps) in the crop
    wts = kernel((pos - centre.unsqueeze(-1) + 0.5) / fs) * (pos < hi.unsqueeze(-1))
    wts = wts / wts.sum(-1, keepdim=True).clamp_min(1e-12)
    col = (pos + start.view(n, 1, 1)).clamp_(0, size - 1).long()  # the dropped taps have weight 0
    return m.scatter_add_(2, col, wts)


def crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
               g: torch.Generator, device: torch.device) -> torch.Tensor:  # fmt: skip
    """(n, 4) float (top, left, height, width) integer-valued crop boxes in an h x w image, drawn as timm's
    ``RandomResizedCropAndInterpolation.get_params``: up to ten (area, log-ratio) draws, the first whose rounded
    box fits; else the centre crop with the ratio clamped to ``ratio``; then a uniform integer position."""
    u = torch.rand(n, CROP_ATTEMPTS, 2, generator=g, device=device)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    cw, ch = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    ok = (cw <= w) & (ch <= h)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits (argmax: first maximum)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = w / h  # the fallback: the whole image, or its centre at the nearest allowed ratio
    fw, fh = (w, round(w / ratio[0])) if in_ratio < ratio[0] else ((round(h * ratio[1]), h) if in_ratio > ratio[1]
                                                                     else (w, h))  # fmt: skip
    found = ok.any(1)
    cw = torch.where(found, cw, torch.full_like(cw, fw)).clamp_(1, w)
    ch = torch.where(found, ch, torch.full_like(ch, fh)).clamp_(1, h)
    pos = torch.rand(n, 2, generator=g, device=device)
    top = torch.where(found, torch.floor(pos[:, 0] * (h - ch + 1)), torch.div(h - ch, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(pos[:, 1] * (w - cw + 1)), torch.div(w - cw, 2, rounding_mode="floor"))
    return torch.stack([top, left, ch, cw], 1).float()


def affine_theta(n: int, size: tuple[int, int], rotation: float, translate: float, shear: float,
                 g: torch.Generator, device: torch.device) -> torch.Tensor:  # fmt: skip
    """(n, 2, 3) ``affine_grid`` matrices (normalised output -> input coordinates, align_corners False) of
    torchvision ``RandomAffine`` about the image centre: angle uniform in +/-``rotation`` degrees, x-shear in
    +/-``shear``, translation in +/-``translate`` x size rounded to pixels (``v2.RandomAffine.make_params``).
    An output pixel p (pixels from the centre) shows the input point m (p - t), m the inverse of rotation @
    shear (torchvision's ``_get_inverse_affine_matrix`` with scale 1, no y-shear)."""
    oh, ow = size
    u = torch.rand(n, 4, generator=g, device=device) * 2 - 1
    rot, sx = torch.deg2rad(u[:, 0] * rotation), torch.deg2rad(u[:, 1] * shear)
    t = torch.stack([u[:, 2] * (translate * ow), u[:, 3] * (translate * oh)], 1).round()
    a, b = torch.cos(rot), -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    c, d = torch.sin(rot), -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    m = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1)  # (n, 2, 2)
    mt = (m @ t.unsqueeze(-1)).squeeze(-1)
    # in normalised coordinates (x: pixels / (W/2), y: pixels / (H/2)); Python scalars: no host-to-device copy
    row0 = torch.stack([d, -b * (oh / ow), -mt[:, 0] / (ow / 2)], 1)
    row1 = torch.stack([-c * (ow / oh), a, -mt[:, 1] / (oh / 2)], 1)
    return torch.stack([row0, row1], 1)


def erase_masks(n: int, size: tuple[int, int], p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, H, W) bool rectangles to erase, drawn as timm's ``RandomErasing`` (one box, probability ``p``, area
    2-33 % of the image, aspect 0.3-3.3, up to ten attempts at a box smaller than the image, integer position)."""
    oh, ow = size
    u = torch.rand(n, CROP_ATTEMPTS, 2, generator=g, device=device)
    area = oh * ow * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[..., 0])
    aspect = torch.exp(ERASE_LOG_ASPECT[0] + (ERASE_LOG_ASPECT[1] - ERASE_LOG_ASPECT[0]) * u[..., 1])
    eh, ew = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    ok = (ew < ow) & (eh < oh)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]
    v = torch.rand(n, 3, generator=g, device=device)
    on = (v[:, 0] < p) & ok.any(1)
    top, left = torch.floor(v[:, 1] * (oh - eh + 1)), torch.floor(v[:, 2] * (ow - ew + 1))
    rows = torch.arange(oh, device=device).view(1, oh, 1)
    cols = torch.arange(ow, device=device).view(1, 1, ow)
    r = (rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
    c = (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
    return r & c & on.view(n, 1, 1)
