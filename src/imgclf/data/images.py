"""Decode one image into the RGB picture a person sees, the same way for training, evaluation, prediction,
k-NN, explanations and serving.

One ``DecodePolicy`` says how (its look part is stored in the artifact, so serving decodes as training did):

- **Bit depth.** 8-bit images are read as they are. 16-bit (Pillow modes ``I;16*``), 32-bit integer (``I``)
  and float (``F``) images are windowed into 0-255 by ``pixel_range``: ``auto`` (default) scales integers
  by the range of their type (16-bit / 257; 32-bit integers whose values fit in 16 bits as 16-bit) and
  floats by the range found in the data ([0, 1] or [0, 255], else a ``BadImage`` asking for a range);
  ``minmax`` stretches each image from its own minimum to maximum; ``(lo, hi)`` maps lo..hi to 0..255 and
  clips. Pillow's own conversion clips instead of scaling (a 16-bit picture turns white, a [0, 1] float
  one black), hence this module.
- **Transparency** (RGBA, LA, PA, palette or colour-key transparency) is composited over ``background``
  (white by default), not dropped: hidden pixels' colours never reach the model.
- **EXIF orientation** is applied; CMYK, palette and 1-bit images become RGB.
- **Limits**: ``max_pixels`` (read from the header, before any pixel is decoded) and ``max_aspect`` (the
  eval resize of a 1 x 300,000 strip would allocate gigabytes) refuse an image with ``BadImage``. The
  limit is the caller's, per call: Pillow's process-wide ``MAX_IMAGE_PIXELS`` does not apply inside
  these functions (and is left untouched for everyone else).
- **Animations** (GIF, APNG, WebP) use their first frame; ``image_notes`` says so.
- **JPEG draft** (``draft``, never stored): a consumer that will shrink the picture anyway (the training crop, the
  decoded cache) may let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale (its DCT scaling) as long as the
  result keeps at least ``draft`` = (width, height) pixels as displayed; smaller JPEGs and other formats decode
  in full. Measured (libjpeg-turbo): 1/2, 1/4, 1/8 take 56, 45, 39 % of the full decode's time on 1600-2400 px
  JPEGs (42, 34, 26 % at 4032 x 3024), and every later step works on 4-64x fewer pixels.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

#: Pillow's default decompression-bomb limit (its MAX_IMAGE_PIXELS); imgclf's default ``max_pixels``
PILLOW_MAX_PIXELS = 89_478_485
#: longest / shortest side: beyond it the eval resize of a thin strip would allocate gigabytes
MAX_ASPECT = 50.0
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: the decoding of runs trained before the policy was stored (imgclf <= 0.1 of 2026-11-28): Pillow's ``convert``
#: (16-bit clipped, alpha dropped) and float arrays clipped to [0, 1]; only ever read from such an artifact
LEGACY = "legacy"
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(Exception):
    """An input that is not a decodable image; ``reason`` is a short human-readable cause.

    ``too_large``: refused for its pixel count (a decompression bomb or over the caller's limit).
    """

    def __init__(self, source: str, reason: str, too_large: bool = False):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.too_large = too_large


@dataclass(frozen=True)
class DecodePolicy:
    """How a file becomes the RGB picture a person sees, and which files are refused.

    Args:
        pixel_range: ``"auto"``, ``"minmax"`` or ``(lo, hi)``: how 16-bit, 32-bit and float pixels map to
            0-255 (8-bit images are never changed). See the module docstring.
        background: RGB (0-255) that transparent pixels are composited over.
        max_pixels: refuse images with more pixels (width x height); ``None`` = no limit.
        max_aspect: refuse images whose longer side exceeds this multiple of the shorter; ``None`` = no limit.
        draft: (width, height) in pixels as displayed (after EXIF rotation) that a JPEG must keep when it is
            decoded at a reduced DCT scale (1/2, 1/4, 1/8; libjpeg picks the smallest scale that keeps both);
            ``None`` = always decode in full. Only for consumers that resize below this size anyway.

    ``to_json`` keeps the look (pixel_range, background), which the artifact stores; the limits and the draft
    size are each command's own (``--max-pixels``, serve's ``--max-pixels``, the training loader's crop).

    Example:
        >>> p = DecodePolicy(pixel_range=(0, 4095))
        >>> DecodePolicy.from_json(p.to_json()) == p
        True
    """

    pixel_range: str | tuple[float, float] = "auto"
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int | None = PILLOW_MAX_PIXELS
    max_aspect: float | None = MAX_ASPECT
    draft: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.draft is not None:
            w, h = (int(v) for v in self.draft)
            if w < 1 or h < 1:
                raise ValueError(f"draft needs a positive (width, height), got {list(self.draft)}")
            object.__setattr__(self, "draft", (w, h))
        pr = self.pixel_range
        if isinstance(pr, str):
            if pr not in ("auto", "minmax", LEGACY):
                raise ValueError(f"pixel_range must be 'auto', 'minmax' or [lo, hi], got {pr!r}")
        else:
            lo, hi = (float(v) for v in pr)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"pixel_range [lo, hi] needs finite lo < hi, got {list(pr)}")
            object.__setattr__(self, "pixel_range", (lo, hi))
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))

    def to_json(self) -> dict[str, Any]:
        pr = self.pixel_range
        return {"pixel_range": pr if isinstance(pr, str) else list(pr), "background": list(self.background)}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None, **limits: Any) -> DecodePolicy:
        """From ``to_json`` output. ``None``: a run trained before imgclf stored its decoding, which is decoded as
        it was trained (``LEGACY``: Pillow's conversion, alpha dropped), so its answers do not change."""
        if doc is None:
            return cls(LEGACY, **limits)
        pr = doc.get("pixel_range", "auto")
        return cls(pr if isinstance(pr, str) else tuple(pr), tuple(doc.get("background", (255, 255, 255))), **limits)


def parse_color(text: str | tuple | list) -> tuple[int, int, int]:
    """``white``, ``#80ff00``, ``rgb(1,2,3)`` or ``[r, g, b]`` -> an RGB tuple (PIL.ImageColor); ValueError if not."""
    if isinstance(text, (list, tuple)):
        if len(text) != 3 or not all(0 <= int(c) <= 255 for c in text):
            raise ValueError(f"a colour needs 3 values in 0-255, got {list(text)}")
        return tuple(int(c) for c in text)  # type: ignore[return-value]
    return ImageColor.getrgb(str(text))[:3]


# ---------------------------------------------------------------------------------------------------------
# Pillow's decompression-bomb check, per call. Pillow compares every image it opens (and every GIF frame,
# TIFF tile, WebP canvas) with the module global Image.MAX_IMAGE_PIXELS: setting that global from a decode
# thread would change the limit for every other thread, and leaving it would cap a user's larger
# --max-pixels at Pillow's 89 MP (raising above 179 MP). So the check is wrapped once: inside our decode
# calls (a context variable says so) our own limit has already been applied from the header, so Pillow's
# is skipped; everywhere else Pillow's original check runs unchanged.
_OUR_LIMIT: contextvars.ContextVar[bool] = contextvars.ContextVar("imgclf_decode", default=False)
_patch_lock = threading.Lock()


def _install_bomb_check() -> None:
    if getattr(Image._decompression_bomb_check, "_imgclf", False):
        return  # installed: no lock on the hot path (and none held across a fork)
    with _patch_lock:
        original = Image._decompression_bomb_check
        if getattr(original, "_imgclf", False):
            return

        def check(size, *args, **kwargs):
            if _OUR_LIMIT.get():
                return None
            return original(size, *args, **kwargs)

        check._imgclf = True  # type: ignore[attr-defined]
        Image._decompression_bomb_check = check


@contextlib.contextmanager
def _own_limit():
    _install_bomb_check()
    token = _OUR_LIMIT.set(True)
    try:
        yield
    finally:
        _OUR_LIMIT.reset(token)


# ---------------------------------------------------------------------------------------------------------


def open_image(path: str | Path, policy: DecodePolicy | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB per ``policy``, or raise ``BadImage`` naming the cause.

    The file is handed to Pillow as a file object, as uploads are: Pillow 13 opened by path transposes
    uncompressed TIFFs with EXIF orientation 5-8 wrongly, so a path and the same bytes would disagree."""
    with _errors(str(path)), open(path, "rb") as f:
        return _decode(f, str(path), policy or DecodePolicy())


#: formats accepted from the network (never PostScript/EPS, which Pillow hands to Ghostscript)
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "MPO")


def decode_image(data: bytes, source: str = "upload", policy: DecodePolicy | None = None,
                 formats: tuple[str, ...] | None = UPLOAD_FORMATS) -> Image.Image:  # fmt: skip
    """Decode encoded image bytes as RGB, or raise ``BadImage`` naming ``source`` and the cause.

    ``formats``: the Pillow formats accepted (uploads: ``UPLOAD_FORMATS``); ``None`` accepts every format a file
    on disk may have, for the bytes of data-set members (tar shards, HF datasets), so they decode exactly as the
    same image saved as a file."""
    return _decode(io.BytesIO(data), source, policy or DecodePolicy(), formats)


def check_header(path: str | Path, policy: DecodePolicy | None = None, data: bytes | None = None) -> str | None:
    """Read only the header: raise ``BadImage`` for a non-image or an image over the limits; return a note
    (``"animated: N frames, the first is used"``) or None. Cheap: no pixel data is decoded. ``data``: the encoded
    bytes (a data-set member), read instead of the file; ``path`` then only names it."""
    policy = policy or DecodePolicy()
    src = str(path)
    with _errors(src), _own_limit(), _source(path, data) as f, Image.open(f) as img:
        _check_size(img, src, policy)
        return _animation_note(img)


def _source(path: str | Path, data: bytes | None):
    """The file, or ``data`` as a file object when given."""
    return open(path, "rb") if data is None else io.BytesIO(data)


def file_facts(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """What a file's header says, without decoding pixels (for ``imgclf audit``): ``format`` (Pillow's name),
    ``mode``, ``size`` (width, height as stored, before EXIF rotation), ``orientation`` (EXIF tag 274, 1 when
    absent), ``bits16`` (a 16-bit colour file) and ``transparency`` (a palette or colour-key transparency).
    Raises ``BadImage`` like ``open_image`` for a file that is not an image. ``data``: as in ``check_header``."""
    src = str(path)
    with _errors(src), _own_limit(), _source(path, data) as f, Image.open(f) as img:
        rawmodes = " ".join(str(t.args) for t in getattr(img, "tile", []) or [])
        return {"format": img.format, "mode": img.mode, "size": img.size, "orientation": _orientation(img),
                "bits16": img.mode in ("RGB", "RGBA") and ";16" in rawmodes,
                "transparency": img.info.get("transparency") is not None}  # fmt: skip


def _animation_note(img: Image.Image) -> str | None:
    if getattr(img, "is_animated", False):
        n = getattr(img, "n_frames", 0)
        return f"animated ({n} frames): the first frame is used" if n else "animated: the first frame is used"
    return None


def _check_size(img: Image.Image, src: str, policy: DecodePolicy) -> None:
    w, h = img.size
    if policy.max_pixels and w * h > policy.max_pixels:
        raise BadImage(src, f"{w}x{h} = {w * h} pixels, over the limit of {policy.max_pixels} (raise --max-pixels / "
                            "data.max_pixels to read it)", too_large=True)  # fmt: skip
    if policy.max_aspect and max(w, h) > policy.max_aspect * max(min(w, h), 1):
        raise BadImage(src, f"{w}x{h}: aspect ratio beyond {policy.max_aspect:g}:1 (data.max_aspect)")


@contextlib.contextmanager
def _errors(path: str):
    """Turn Pillow's and the OS's exceptions into ``BadImage`` with a short cause."""
    try:
        yield
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except (PermissionError, IsADirectoryError) as e:
        raise BadImage(path, f"cannot read ({e.strerror or e})") from None
    except UnidentifiedImageError:
        if _is_tiff(path):
            raise BadImage(path, "a TIFF that Pillow cannot read (e.g. float64, float16 or several float channels): "
                                 "save it as 8/16-bit or 32-bit float") from None  # fmt: skip
        raise BadImage(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(path, f"too many pixels ({e})", too_large=True) from None
    except MemoryError:
        raise BadImage(path, "too large to decode in the available memory", too_large=True) from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, ValueError, EOFError, struct.error, ...
        raise BadImage(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def _is_tiff(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*")
    except OSError:
        return False


def _decode(fp: Any, path: str, policy: DecodePolicy, formats: tuple[str, ...] | None = None) -> Image.Image:
    with _errors(path), _own_limit(), Image.open(fp, formats=formats) as img:
        _check_size(img, path, policy)
        _check_colour_depth(img, path, policy)
        if policy.draft is not None:
            draft_jpeg(img, policy.draft)
        img.load()
        return to_rgb(img, policy, path)


def draft_jpeg(img: Image.Image, need: tuple[int, int]) -> int:
    """Ask libjpeg to decode ``img`` (opened, not yet loaded) at the smallest DCT scale 1/s (s = 8, 4, 2) that
    keeps at least ``need`` = (width, height) pixels *as displayed*; returns s (1: a full decode: not a JPEG, or
    not 2x larger than ``need`` in both directions).

    A scale is used only when it keeps the geometry exact: the stored width and height are multiples of s, so
    every decoded pixel is one s x s block of the full picture whatever the EXIF orientation (camera photos:
    4032 x 3024, 6000 x 4000, 1920 x 1080 all are), or the picture is not transposed (EXIF orientation 1), where
    only the last, partial column and row cover less than s pixels. (libjpeg rounds a partial block up; after
    an EXIF rotation that partial row could land at the top or left and shift every pixel by up to one decoded
    pixel.) The request is made in stored orientation, before ``to_rgb`` transposes; the colour mode never
    changes (``draft(None, ...)``).

    Example:
        >>> buf = io.BytesIO(); Image.new("RGB", (800, 600), "red").save(buf, "JPEG")
        >>> img = Image.open(buf); draft_jpeg(img, (200, 150)), img.size
        (4, (200, 150))
    """
    if img.format != "JPEG":
        return 1
    w, h = need
    orientation = _orientation(img)
    if orientation in (5, 6, 7, 8):  # transposed on display: the stored width is the displayed height
        w, h = h, w
    W, H = img.size  # noqa: N806 - the full size, as against the needed w, h
    for s in (8, 4, 2):
        exact = W % s == 0 and H % s == 0
        if W // s >= max(w, s) and H // s >= max(h, s) and (exact or orientation == 1):
            got = img.draft(None, (W // s, H // s))  # libjpeg's scale: min(W // (W // s), H // (H // s)) == s
            return 1 if got is None else s  # None: drafted before, or a multi-tile JPEG
    return 1


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image (exif_transpose ignores it too)
        return 1


def _check_colour_depth(img: Image.Image, path: str, policy: DecodePolicy) -> None:
    """16-bit colour files: Pillow keeps their top 8 bits (exactly the type-range scaling of ``auto``), so
    a user's window cannot be applied to them; refuse rather than decode them differently from grey ones."""
    if policy.pixel_range == "auto" or img.mode not in ("RGB", "RGBA"):
        return
    rawmodes = " ".join(str(t.args) for t in getattr(img, "tile", []) or [])
    if ";16" in rawmodes:
        raise BadImage(path, f"16-bit colour image: Pillow reads only its top 8 bits, so pixel_range "
                             f"{_range_text(policy.pixel_range)} cannot apply (use pixel_range auto)")  # fmt: skip


def _range_text(pr: str | tuple[float, float]) -> str:
    return pr if isinstance(pr, str) else f"[{pr[0]:g}, {pr[1]:g}]"


def to_rgb(img: Image.Image, policy: DecodePolicy | None = None, source: str = "image") -> Image.Image:
    """EXIF orientation, bit depth windowing and alpha compositing per ``policy``; 3-channel RGB out.

    Raises ``BadImage`` for float/32-bit pixels whose range ``auto`` cannot tell (or non-finite values).
    """
    policy = policy or DecodePolicy()
    true_type = _tiff_sample_type(img)  # read before exif_transpose, whose copy has no TIFF tags
    img = ImageOps.exif_transpose(img)
    if policy.pixel_range == LEGACY:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img if img.mode == "RGB" else img.convert("RGB")
    arr = None if true_type is None else _as_type(np.asarray(img), true_type)
    if arr is not None or img.mode in _HIGH_DEPTH:
        alpha = _colour_key_alpha(img)
        img = Image.fromarray(window(np.asarray(img) if arr is None else arr, policy.pixel_range, source), "L")
        if alpha is not None:
            img.putalpha(alpha)
    elif img.mode not in _ALPHA and img.info.get("transparency") is not None:
        img = img.convert("RGBA")  # palette or colour-key (tRNS) transparency -> an alpha channel
    if img.mode in _ALPHA:
        bg = Image.new("RGBA", img.size, (*policy.background, 255))
        return Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _tiff_sample_type(img: Image.Image) -> np.dtype | None:
    """The true sample type of single-channel TIFFs that Pillow reads as another: unsigned 32-bit (Pillow's
    mode I is signed: values above 2**31 wrap), signed 8-bit (read as L) and signed 16-bit (read as I, whose
    type range would be wrong). None for every other image."""
    tags = getattr(img, "tag_v2", None)
    if tags is None or img.mode not in ("I", "L"):
        return None
    bits, kind = tags.get(258, (8,)), tags.get(339, (1,))
    bits, kind = (bits[0] if isinstance(bits, tuple) else bits), (kind[0] if isinstance(kind, tuple) else kind)
    return {(32, 1): np.dtype(np.uint32), (8, 2): np.dtype(np.int8), (16, 2): np.dtype(np.int16)}.get((bits, kind))


def _as_type(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Pillow's array reinterpreted (same bits) or converted (same values) as the file's sample type."""
    return a.view(dtype) if a.dtype.itemsize == dtype.itemsize else a.astype(dtype)


def _colour_key_alpha(img: Image.Image) -> Image.Image | None:
    """The tRNS colour key of a 16-bit grey PNG as an 8-bit alpha mask (0 where the pixel equals the key)."""
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return None
    return Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8), "L")


def window(a: np.ndarray, pixel_range: str | tuple[float, float] = "auto", source: str = "image") -> np.ndarray:
    """Map one image's high-bit-depth or float pixels to uint8 0-255 (see ``DecodePolicy``); uint8 passes.

    Exact for data made from 8-bit pictures: ``v * 257`` (16-bit) and ``v / 255`` (float) give back ``v``.
    Raises ``BadImage`` (naming ``source``) when ``auto`` cannot tell a float or 32-bit range, or for NaN/inf.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    lo, hi = _window_bounds(a, pixel_range, source)
    x = (a.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(a.shape)
    return np.floor(np.clip(x, 0, 255) + 0.5).astype(np.uint8)


def _window_bounds(
    a: np.ndarray, pixel_range: str | tuple[float, float], source: str, declared: bool = True
) -> tuple[float, float]:
    """(lo, hi) that map to 0 and 255. ``declared``: the dtype is the file's declared sample type (a PNG's or
    TIFF's bit depth), so integers scale by their type's range; for arrays (``declared=False``: np.array makes
    int64 of anything) the values decide: within 0-255 as 8-bit, within 0-65535 as 16-bit."""
    if not isinstance(pixel_range, str):
        return pixel_range
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise BadImage(source, "float pixels include NaN or infinity")
    if a.size == 0:
        return 0.0, 1.0
    mn, mx = float(a.min()), float(a.max())
    if pixel_range == "minmax":
        return mn, mx
    if a.dtype.kind in "iu":
        bits = a.dtype.itemsize * 8
        if not declared and mn >= 0 and mx <= 255:
            return 0.0, 255.0
        if declared and bits <= 16:
            top = float(2 ** (bits - (a.dtype.kind == "i")) - 1)
            return (0.0, top) if a.dtype.kind == "u" or mn >= 0 else (-top - 1, top)
        if mn >= 0 and mx <= 65535:  # 32-bit (Pillow's mode I) holding 16-bit data, or arrays of 16-bit values
            return 0.0, 65535.0
        what = f"{bits}-bit integer pixels in [{mn:g}, {mx:g}]"
    else:
        if mn >= -0.05 and mx <= 1.05:  # [0, 1], with 5 % of overshoot (resampling) clipped
            return 0.0, 1.0
        if mn >= -0.5 and 2 <= mx <= 255.5:
            return 0.0, 255.0
        what = f"float pixels in [{mn:g}, {mx:g}]"
    raise BadImage(source, f"{what}: the scale is ambiguous; set data.pixel_range (minmax, or [lo, hi]) when "
                           "training")  # fmt: skip


def window_stack(a: np.ndarray, pixel_range: str | tuple[float, float] = "auto", source: str = "array") -> np.ndarray:
    """``window`` over a stack of images (N, ...): one range for the whole stack (``auto`` looks at all of
    it, so every image is scaled alike), per image for ``minmax``; in chunks, so memory stays ~2x uint8."""
    if a.dtype == np.uint8:
        return a
    if pixel_range == LEGACY:  # as runs trained before the policy read arrays
        if a.dtype.kind != "f":
            raise BadImage(source, f"{a.dtype} pixels: this run reads uint8 or float in [0, 1] (retrain to read more)")
        return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    if pixel_range == "minmax":
        if not len(a):
            return a.astype(np.uint8)
        return np.stack([window(x, "minmax", f"{source}[{i}]") for i, x in enumerate(a)])
    fixed = a.dtype == np.bool_ or not isinstance(pixel_range, str)
    bounds = pixel_range if fixed else _window_bounds(a, pixel_range, source, declared=False)
    out = np.empty(a.shape, dtype=np.uint8)
    for i in range(0, len(a), 1024):
        out[i : i + 1024] = window(a[i : i + 1024], bounds, source)
    return out


def array_to_image(arr: np.ndarray, policy: DecodePolicy | None = None, source: str = "array") -> Image.Image:
    """A HW, HWC (C = 1, 3, 4; 4 = RGBA, composited) uint8 array as an RGB PIL image."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)), policy, source)


def policy_from_config(data) -> DecodePolicy:
    """The decode policy of a ``config.DataConfig`` (pixel_range, background, max_pixels, max_aspect)."""
    pr = data.pixel_range
    return DecodePolicy(pr if isinstance(pr, str) else tuple(pr), parse_color(data.background),
                        data.max_pixels or None, data.max_aspect or None)  # fmt: skip
