"""Decode one image into RGB the same way for training, evaluation, prediction and serving."""

from __future__ import annotations

import io
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


#: formats accepted from the network (never PostScript/EPS, which Pillow hands to Ghostscript)
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "MPO")


def decode_image(
    data: bytes, source: str = "upload", max_pixels: int | None = None, max_aspect: float | None = None
) -> Image.Image:
    """Decode encoded image bytes (an upload) as RGB, or raise ``BadImage`` naming ``source`` and the cause.

    ``max_pixels`` / ``max_aspect``: refuse images with more pixels or a more extreme aspect ratio (checked
    from the header, before decoding; a 4,000,000 x 10 strip would otherwise be resized to gigabytes).
    """
    return _decode(io.BytesIO(data), source, max_pixels, max_aspect, UPLOAD_FORMATS)


def _decode(
    fp: str | Path | io.BytesIO,
    path: str,
    max_pixels: int | None,
    max_aspect: float | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    caps = [c for c in (max_pixels, Image.MAX_IMAGE_PIXELS) if c]  # Pillow's own bomb limit applies too
    limit = min(caps) if caps else None
    try:
        # (Image.open warns above MAX_IMAGE_PIXELS and raises above twice that; the check below refuses
        # both without touching the process-wide warning filters, which decode threads share)
        with Image.open(fp, formats=formats) as img:
            w, h = img.size
            if limit is not None and w * h > limit:
                raise BadImage(path, f"{w}x{h} = {w * h} pixels, over the limit of {limit}", too_large=True)
            if max_aspect is not None and max(w, h) > max_aspect * max(min(w, h), 1):
                raise BadImage(path, f"{w}x{h}: aspect ratio beyond {max_aspect:g}:1")
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
    except Image.DecompressionBombError as e:
        raise BadImage(path, f"too many pixels ({e})", too_large=True) from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, ValueError, EOFError, struct.error, ...
        raise BadImage(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def array_to_image(arr: np.ndarray) -> Image.Image:
    """A HW, HWC (C = 1, 3, 4) uint8 array as an RGB PIL image."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
