"""Decode one image into RGB the same way for training, evaluation, prediction and serving."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(Exception):
    """An input that is not a decodable image; ``reason`` is a short human-readable cause.

    ``too_large``: refused for its pixel count (a decompression bomb or over the caller's limit).
    """

    def __init__(self, source: str, reason: str, too_large: bool = False):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.too_large = too_large


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert grey, palette, CMYK and alpha images to 3-channel RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB, or raise ``BadImage`` naming the cause."""
    return _decode(path, str(path), max_pixels)


def decode_image(data: bytes, source: str = "upload", max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes (an upload) as RGB, or raise ``BadImage`` naming ``source`` and the cause.

    ``max_pixels``: refuse images with more pixels (checked from the header, before decoding).
    """
    return _decode(io.BytesIO(data), source, max_pixels)


def _decode(fp: str | Path | io.BytesIO, path: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImage(path, f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels}", too_large=True)
                img.load()
                return to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except (PermissionError, IsADirectoryError) as e:
        raise BadImage(path, f"cannot read ({e.strerror or e})") from None
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(path, f"too many pixels ({e})", too_large=True) from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, ValueError, EOFError, struct.error, ...
        raise BadImage(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def array_to_image(arr: np.ndarray) -> Image.Image:
    """A HW, HWC (C = 1, 3, 4) uint8 array as an RGB PIL image."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
