"""What a model sees: one typed, frozen ``Preprocess`` derived once from the model and stored in the artifact.

``Preprocess.from_model`` reads timm's pretrained data config (input size, interpolation, crop_pct and
crop mode, mean/std) and applies the user's ``data`` overrides and decode policy; every stage then asks the
same object: ``eval()`` (eval, predict, calibration, reports, CAMs), ``train(aug)``, ``pixels()`` (the
uint8 view exported graphs and runtimes take), ``view()`` (overlays) and ``normalize()`` (the one
normalisation shared by the eval transform, TTA, exported graphs and runtimes), so training, evaluation,
prediction, export and serving can never disagree. Modelled on open_clip's ``PreprocessCfg`` and
torchvision's ``Weights.transforms()``; the resize and crop are timm's own (``create_transform``).

Example:
    >>> p = Preprocess((3, 32, 32), "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875)
    >>> Preprocess.from_json(p.to_json()) == p
    True
    >>> p.with_crop(1.0).crop_pct, p.channels
    (1.0, 3)
    >>> Preprocess((3, 32, 32), "cubic", (0.5,) * 3, (0.25,) * 3, 0.875)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    imgclf.errors.ImgclfError: preprocessing.interpolation: 'cubic' is not a known resize (bilinear, ...)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import INTERPOLATIONS
from ..errors import ImgclfError
from .images import MAX_ASPECT, PILLOW_MAX_PIXELS, DecodePolicy, policy_from_config

CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes


def _look(policy: DecodePolicy) -> DecodePolicy:
    """The stored part of a decode policy (pixel range, background) with the default limits: limits are each
    command's own (``Preprocess.decoder``)."""
    return DecodePolicy.from_json(policy.to_json())


@dataclass(frozen=True)
class Preprocess:
    """A model's preprocessing: decode, resize + crop, normalise.

    Args:
        input_size: (C, H, W) the model takes.
        interpolation: resize filter, one of ``INTERPOLATIONS`` (an unknown one is an error, never a substitute).
        mean, std: per-channel normalisation of [0, 1] pixels (C values each).
        crop_pct: eval centre-crop fraction (resize the shorter side to H / crop_pct, then crop H x W).
        crop_mode: timm's ``center`` | ``squash`` | ``border``.
        decode: how files become RGB pictures (``DecodePolicy``; its look part is stored, runs saved before
            imgclf stored it decode as they were trained: ``legacy``).

    Raises ``ImgclfError`` (naming the field) for inconsistent values.
    """

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str = "center"
    decode: DecodePolicy = field(default_factory=DecodePolicy)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        try:
            set_("input_size", tuple(int(v) for v in self.input_size))
            set_("mean", tuple(float(v) for v in self.mean))
            set_("std", tuple(float(v) for v in self.std))
            set_("crop_pct", float(self.crop_pct))
        except (TypeError, ValueError) as e:
            raise ImgclfError(f"preprocessing: {e}") from None
        set_("decode", _look(self.decode))
        checks = [
            ("input_size", len(self.input_size) == 3 and min(self.input_size) > 0, "needs positive (C, H, W)"),
            ("interpolation", self.interpolation in INTERPOLATIONS,
             f"is not a known resize ({', '.join(INTERPOLATIONS)})"),
            ("crop_mode", self.crop_mode in CROP_MODES, f"must be one of {', '.join(CROP_MODES)}"),
            ("crop_pct", 0 < self.crop_pct <= 2, "must be in (0, 2]"),
            ("mean", len(self.mean) == self.input_size[0], f"needs one value per channel ({self.input_size[0]})"),
            ("std", len(self.std) == self.input_size[0] and min(self.std) > 0,
             f"needs one positive value per channel ({self.input_size[0]})"),
        ]  # fmt: skip
        for name, ok, why in checks:
            if not ok:
                raise ImgclfError(f"preprocessing.{name}: {getattr(self, name)!r} {why}")

    # ---------------------------------------------------------------- construction and storage

    @classmethod
    def from_model(cls, model: nn.Module, data: Any = None) -> Preprocess:
        """timm's pretrained data config of ``model`` with a ``config.DataConfig``'s overrides (input_size,
        crop_pct, interpolation) and decode policy applied. An input_size of ``auto`` reads as the model's own:
        training resolves it from the data before (``data.sizing``)."""
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        c, h, w = cfg["input_size"]
        pre = cls((c, h, w), cfg["interpolation"], cfg["mean"], cfg["std"], cfg["crop_pct"],
                  cfg.get("crop_mode", "center"))  # fmt: skip
        if data is None:
            return pre
        return dataclasses.replace(
            pre,
            input_size=(c, size, size) if isinstance(size := data.input_size, int) else pre.input_size,
            crop_pct=data.crop_pct if data.crop_pct is not None else pre.crop_pct,
            interpolation=data.interpolation or pre.interpolation,
            decode=policy_from_config(data),
        )

    def to_json(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "decode": self.decode.to_json()}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str = "preprocessing") -> Preprocess:
        """From ``to_json`` output (``imgclf.json``'s ``preprocessing``); ImgclfError naming ``where`` and the
        field for a missing or bad one. A document without ``decode`` decodes as ``legacy``."""
        if isinstance(doc, Preprocess):
            return doc
        if not isinstance(doc, dict):
            raise ImgclfError(f"{where}: expected an object, got {type(doc).__name__}")
        missing = [k for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k not in doc]
        if missing:
            raise ImgclfError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            decode = DecodePolicy.from_json(doc.get("decode"))
            return cls(doc["input_size"], doc["interpolation"], doc["mean"], doc["std"], doc["crop_pct"],
                       doc.get("crop_mode", "center"), decode)  # fmt: skip
        except (ImgclfError, ValueError, TypeError) as e:
            raise ImgclfError(f"{where}: {str(e).removeprefix('preprocessing')}") from None

    def with_crop(self, crop_pct: float) -> Preprocess:
        return dataclasses.replace(self, crop_pct=crop_pct)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return self.input_size[1], self.input_size[2]

    def needed_side(self, aug: Any = None) -> int:
        """The shorter side (pixels) an image needs so that the eval resize (``aug`` None) or the training crop
        (``aug``: a ``config.AugmentConfig``) never has fewer pixels than it outputs: decoding or caching an
        image down to this side loses nothing the model would see at full resolution.

        Eval: timm's resize target, ``floor(size / crop_pct)`` (at least the input size). Training: the
        smallest random-resized crop spans ``sqrt(scale_min * ratio)`` x the shorter side in width and
        ``sqrt(scale_min / ratio)`` in height, so the side is ``size / (sqrt(scale_min) * min(sqrt(ratio_min),
        1 / sqrt(ratio_max)))``: 915 px for 224 px crops at timm's default scale (0.08, 1) and ratio (3/4, 4/3),
        366 px at scale (0.5, 1).

        Example:
            >>> p = Preprocess((3, 224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
            >>> from types import SimpleNamespace as A
            >>> p.needed_side(), p.needed_side(A(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)))
            (256, 915)
        """
        size = max(self.size)
        side = max(size, math.floor(size / self.crop_pct))
        if aug is None:
            return side
        (lo, _), (r0, r1) = aug.scale, aug.ratio
        return max(side, math.ceil(size / (math.sqrt(lo) * min(math.sqrt(r0), 1 / math.sqrt(r1)))))

    def decoder(self, max_pixels: int | None = PILLOW_MAX_PIXELS,
                max_aspect: float | None = MAX_ASPECT) -> DecodePolicy:  # fmt: skip
        """The stored decode policy with this command's limits (``None`` or 0: no limit)."""
        return dataclasses.replace(self.decode, max_pixels=max_pixels or None, max_aspect=max_aspect or None)

    # ---------------------------------------------------------------- transforms

    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def pixels(self) -> PixelsHWC:
        """PIL image -> (H, W, C) uint8 numpy array: timm's eval resize and crop, no float round trip."""
        return PixelsHWC(self)

    def chw_pixels(self) -> PixelsCHW:
        """PIL image -> (C, H, W) uint8 tensor: the input of graphs with preprocessing inside."""
        return PixelsCHW(self)

    def view(self) -> View:
        """PIL image -> (C, H, W) float [0, 1]: the model's view before normalisation (CAM overlays)."""
        return View(self)

    def eval(self) -> EvalTransform:
        """PIL image -> (C, H, W) float32 normalised: the only eval transform (eval, predict, calibrate,
        report, explain). Bit-identical to timm's ``create_transform(is_training=False)``."""
        return EvalTransform(self)

    def train(self, aug: Any):
        """The training augmentation pipeline on this preprocessing (``data.transforms.train_transform``)."""
        from .transforms import train_transform

        return train_transform(self, aug)


class Normalize(nn.Module):
    """(…, C, H, W) pixels -> normalised float32: uint8 input is divided by 255 first, float input is taken as
    [0, 1]. The same arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (divide, subtract, divide), so
    the eval transform, TTA, exported graphs and runtimes agree to the last bit."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            x = x.to(torch.float32).div(255)
        return (x - self.mean) / self.std


@functools.lru_cache(maxsize=32)
def _pil_ops(pre: Preprocess) -> tuple:
    """The PIL part of timm's eval transform (resize, crop) for ``pre`` (built once per preprocessing)."""
    import timm.data

    t = timm.data.create_transform(input_size=pre.input_size, is_training=False, interpolation=pre.interpolation,
                                   mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct,
                                   crop_mode=pre.crop_mode)  # fmt: skip
    ops = []
    for op in t.transforms:
        if type(op).__name__ in ("MaybeToTensor", "ToTensor", "PILToTensor", "ToImage"):
            break  # the tensor conversion and normalisation follow: the float part, which Normalize does
        ops.append(op)  # PIL in, PIL out: ResizeKeepRatio / Resize, CenterCrop / CenterCropOrPad, ...
    return tuple(ops)


class PixelsHWC:
    """Callable (picklable for loader workers): PIL image -> (H, W, C) uint8 array at the input size."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, img) -> np.ndarray:
        for op in _pil_ops(self.pre):
            img = op(img)
        return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1)


class PixelsCHW(PixelsHWC):
    def __call__(self, img) -> torch.Tensor:
        return torch.from_numpy(super().__call__(img).copy()).permute(2, 0, 1).contiguous()


class View(PixelsCHW):
    def __call__(self, img) -> torch.Tensor:
        return super().__call__(img).to(torch.float32).div(255)


class EvalTransform(PixelsCHW):
    def __init__(self, pre: Preprocess):
        super().__init__(pre)
        self.norm = pre.normalize()

    def __call__(self, img) -> torch.Tensor:
        return self.norm(super().__call__(img))
