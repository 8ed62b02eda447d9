"""The large-image data path: JPEG draft decoding for training, and a decoded-and-resized uint8 image cache.

``large_image_samples(samples, pre, data, aug)`` is what the trainer's loaders ask for; it returns ``Samples``
whose ``load(i)`` gives the same kind of PIL image, made cheaper:

- **Draft** (``data.jpeg_draft``, training only): JPEGs at least twice ``Preprocess.needed_side(aug)`` (the
  side that keeps even the smallest random crop at full resolution) are decoded by libjpeg at 1/2, 1/4 or 1/8
  scale. Evaluation always decodes in full, so the metrics a run reports are those ``imgclf eval`` gives.
- **Cache** (``data.cache``: ``memory`` | ``disk``): every image is decoded once and kept as uint8 RGB. The
  *training view* is resized (never enlarged) to ``data.cache_side`` on its shorter side (default: the
  lossless ``needed_side(aug)``, so images smaller than that are cached as decoded and their training
  tensors are exactly the uncached ones); the *eval view* is the output of the eval transform's resize
  (full decode, no draft), which the eval transform then leaves as it is (a resize to its own size is a
  copy), so cached evaluation is bit-identical to uncached evaluation.

A disk cache lives in ``data.cache_dir`` (default ``$XDG_CACHE_HOME/imgclf/decoded``) under a key made of the
files (path, size, mtime), the decode policy's look, the view (resize, side, draft) and the Pillow and
torchvision versions, as the feature cache is keyed (``train.probe``): one flat ``pixels.u8`` file read
through a memory map, an ``index.npy`` (offset, height, width per image; no pickle) and ``meta.json``. It is
built by one process at a time (a file lock: DDP ranks and concurrent runs wait and then share it) into a
temporary directory renamed when complete, so a killed build leaves no half cache. A ``memory`` cache is built
the same way into one shared-memory tensor (loader workers read it without copies, forked or spawned) and is
gone with the process. Building decodes with all cores; a cache that would not fit (free disk space, or
available memory) is refused before any decoding, with its estimated size.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ImgclfError
from .images import BadImage, DecodePolicy, file_facts
from .preprocess import Preprocess, _pil_ops
from .sources import Samples

log = logging.getLogger("imgclf")
CACHE_FORMAT = 1
CACHE_MODES = ("none", "memory", "disk")
#: never fill more than this share of the available memory or free disk space
SPACE_SHARE = 0.8


def cache_root(data: Any) -> Path:
    """``data.cache_dir`` or ``$XDG_CACHE_HOME/imgclf/decoded`` (default ``~/.cache/imgclf/decoded``)."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "imgclf" / "decoded"


def files_identity(samples: Samples, h: Any = None) -> Any:
    """A sha256 (``hashlib`` object, updated in place when given) of what the images are: the content of in-memory
    arrays, or every file's path, size and modification time (a rewritten file changes the key)."""
    h = h or hashlib.sha256()
    if samples.arrays is not None:
        h.update(np.ascontiguousarray(samples.arrays[np.asarray(samples.items)]).tobytes())
        return h
    if getattr(samples, "store", None) is not None:  # tar shards, dataset rows: the store's identity and positions
        h.update(f"{samples.store.identity()}|{samples.items}".encode())
        return h
    for p in samples.items:
        st = os.stat(p) if os.path.exists(p) else None
        h.update(f"{p}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h


def data_identity(samples: Samples) -> str:
    """The key of a split's content for caches keyed by content (cached features, decoded pixels): what the images
    are (``files_identity``) plus the labels."""
    h = hashlib.sha256(np.ascontiguousarray(samples.labels).tobytes())
    if samples.labels.ndim == 2:  # label sets: their shape is part of what the bytes mean
        h.update(f"multi-label {samples.labels.shape}".encode())
    return files_identity(samples, h).hexdigest()


def large_image_samples(samples: Samples, pre: Preprocess, data: Any, aug: Any = None) -> Samples:
    """``samples`` for a training (``aug``: its ``AugmentConfig``) or evaluation (``aug`` None) loader with
    ``data.jpeg_draft`` and ``data.cache`` applied (see the module docstring); unchanged when both are off.

    Raises:
        ImgclfError: the cache would not fit in the available memory / free disk space (names the size and fix).
        ImgclfError: a streamed source (URL shards) with a cache: it cannot be read at random.
    """
    if data.cache == "none" or getattr(samples, "arrays", None) is not None:  # arrays: decoded already (and small)
        return _View.of(pre, data, aug, cached=False).draft_samples(samples)
    if getattr(samples.store, "streaming", False):
        raise ImgclfError(f"data.cache {data.cache}: {samples.name} is streamed (read once per epoch, in shard order);"
                          " convert it to local tar shards (imgclf convert) or use data.cache none")  # fmt: skip
    return CachedSamples(samples, build_or_load(samples, _View.of(pre, data, aug), data))


@dataclasses.dataclass(frozen=True)
class _View:
    """What one cached picture is: the training view (``side`` > 0: shorter side resized down to it, drafted
    when ``draft``) or the eval view (``side`` 0: the eval transform's resize of the full decode)."""

    pre: Preprocess
    side: int
    draft: bool

    @classmethod
    def of(cls, pre: Preprocess, data: Any, aug: Any, cached: bool = True) -> _View:
        """The view of a loader; ``data.cache_side`` applies to a cache only (uncached drafts keep the lossless
        side)."""
        if aug is None:
            return cls(pre, 0, False)
        need = pre.needed_side(aug)
        return cls(pre, (data.cache_side or need) if cached else need, bool(data.jpeg_draft))

    def draft_samples(self, samples: Samples) -> Samples:
        """``samples`` whose JPEGs decode at a reduced scale keeping ``side`` (training view with draft on); other
        kinds of sources (without a ``DecodePolicy`` field) are returned as they are."""
        decode = getattr(samples, "decode", None)
        if not self.draft or not self.side or not isinstance(decode, DecodePolicy):
            return samples
        return dataclasses.replace(samples, decode=dataclasses.replace(decode, draft=(self.side, self.side)))

    def resize(self) -> Callable[[Image.Image], Image.Image]:
        if self.side:
            return _ShorterSide(self.side, self.pre.interpolation)
        return _pil_ops(self.pre)[0]  # timm's eval Resize / ResizeKeepRatio (the crop follows it)

    def key(self, samples: Samples) -> str:
        import PIL
        import torchvision

        parts = {"format": CACHE_FORMAT, "decode": samples.decode.to_json(), "resize": repr(self.resize()),
                 "draft": self.draft, "pillow": PIL.__version__, "torchvision": torchvision.__version__}  # fmt: skip
        h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
        return files_identity(samples, h).hexdigest()[:40]

    def estimate(self, samples: Samples) -> int:
        """Bytes of the cached pictures, from the file headers (no pixels decoded); 0 for unreadable files."""
        total = 0
        for p in samples.items:
            try:
                w, h = file_facts(p)["size"]
            except BadImage:
                continue
            target = self.side or self.pre.needed_side()
            r = min(1.0, target / min(w, h)) if self.side else target / min(w, h)
            total += (round(w * r) + 1) * (round(h * r) + 1) * 3
        return total


class _ShorterSide:
    """PIL image -> the same image with its shorter side resized down to ``side`` (never enlarged), with the
    run's interpolation (torchvision's antialiased PIL resize, as timm's training crop uses)."""

    def __init__(self, side: int, interpolation: str):
        self.side, self.interpolation = side, interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        if min(img.size) <= self.side:
            return img
        from timm.data.transforms import str_to_interp_mode
        from torchvision.transforms import functional as F

        return F.resize(img, self.side, interpolation=str_to_interp_mode(self.interpolation))

    def __repr__(self) -> str:
        return f"ShorterSide({self.side}, {self.interpolation})"


class _Decode(torch.utils.data.Dataset):
    """Item ``i`` -> (i, HWC uint8 tensor of the cached view) or (i, the reason it could not be read)."""

    def __init__(self, samples: Samples, view: _View):
        self.samples, self.resize, self.eval = view.draft_samples(samples), view.resize(), not view.side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            full = self.samples.load(i)
            img = self.resize(full)
            if self.eval and self.resize(img).size != img.size:  # the eval transform would resize it again:
                img = full  # keep the full decode, so that evaluation stays bit-identical
            return i, torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))  # a tensor: shared memory
        except BadImage as e:
            return i, e.reason
        except Exception as e:  # noqa: BLE001 - as ImageDataset: one odd file is skipped, not fatal
            return i, f"could not be processed ({type(e).__name__}: {e})"


class DecodedCache:
    """Cached pictures: ``pixels`` (one flat uint8 buffer: a memory-mapped file or a shared-memory tensor),
    ``index`` (N, 3) int64 rows (offset, height, width; height -1 for an unreadable item) and ``bad`` reasons."""

    def __init__(self, index: np.ndarray, bad: dict[int, str], path: Path | None = None, pixels: Any = None):
        self.index, self.bad, self.path, self._pixels = index, bad, path, pixels

    @property
    def nbytes(self) -> int:
        return int((self.index[:, 1].clip(0) * self.index[:, 2] * 3).sum())

    def array(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 view of picture ``i`` (a readable one: see ``bad``)."""
        if self._pixels is None:  # a disk cache: mapped lazily in each process (loader workers included)
            self._pixels = np.memmap(self.path / "pixels.u8", dtype=np.uint8, mode="r")
        off, h, w = (int(v) for v in self.index[i])
        flat = self._pixels[off : off + h * w * 3]
        return (flat.numpy() if isinstance(flat, torch.Tensor) else flat).reshape(h, w, 3)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_pixels"] = None  # not the mapping: each worker maps the file itself
        return state


class CachedSamples:
    """``Samples`` whose ``load(i)`` returns the cached picture as a PIL RGB image (``BadImage`` as the original
    would); every other attribute is the wrapped ``Samples``'."""

    def __init__(self, samples: Samples, cache: DecodedCache):
        self._samples, self.cache = samples, cache

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_samples", "cache"):
            raise AttributeError(name)
        return getattr(self._samples, name)

    def __len__(self) -> int:
        return len(self._samples)

    def load(self, i: int) -> Image.Image:
        if i in self.cache.bad:
            raise BadImage(self._samples.describe(i), self.cache.bad[i])
        return Image.fromarray(self.cache.array(i), "RGB")


def build_or_load(samples: Samples, view: _View, data: Any) -> DecodedCache:
    """The cache of ``samples`` in ``view``: read from disk when its key exists, else built (see the module
    docstring); ``data.cache`` ``memory`` always builds, in this process."""
    t0, what = time.perf_counter(), "eval view" if not view.side else f"training view, shorter side <= {view.side}"
    if data.cache == "memory":
        _check_space(view.estimate(samples), _available_memory(), "memory", data)
        cache = _build(samples, view, None)
    else:
        root = cache_root(data)
        root.mkdir(parents=True, exist_ok=True)
        final = root / view.key(samples)
        with _locked(root / f"{final.name}.lock"):
            if not (final / "meta.json").is_file():
                _check_space(view.estimate(samples), shutil.disk_usage(root).free, f"disk ({root})", data)
                tmp = root / f"{final.name}.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                _build(samples, view, tmp)
                os.replace(tmp, final)
            else:
                what += ", found"
        cache = _open(final)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.DEBUG  # once per job under torchrun
    log.log(level, "decoded cache (%s): %d images, %.0f MB, %.1f s%s", what, len(samples), cache.nbytes / 2**20,
            time.perf_counter() - t0, f" ({cache.path})" if cache.path else " (memory)")  # fmt: skip
    return cache


def _check_space(need: int, free: int, where: str, data: Any) -> None:
    if need > SPACE_SHARE * free:
        raise ImgclfError(f"data.cache {data.cache}: the decoded images need about {need / 2**30:.1f} GiB, more "
                          f"than {SPACE_SHARE:.0%} of the {free / 2**30:.1f} GiB free in {where}; use a smaller "
                          "--data.cache_side (the shorter side of cached training images), --data.cache disk with "
                          "another --data.cache_dir, or --data.cache none")  # fmt: skip


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (fcntl): one builder at a time, released when the process dies."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(samples: Samples, view: _View, out: Path | None) -> DecodedCache:
    """Decode every item with all cores (a ``DataLoader``, in order) into ``out`` (a directory) or memory."""
    from .loader import usable_cores

    workers = min(8, usable_cores())  # nothing else runs meanwhile (other ranks wait): every core decodes
    # its own generator: drawing the workers' seeds from the global one would change the run's augmentation
    loader = torch.utils.data.DataLoader(_Decode(samples, view), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is, generator=torch.Generator())  # fmt: skip
    index, bad, arrays, offset = np.full((len(samples), 3), -1, dtype=np.int64), {}, [], 0
    sink = None
    if out is not None:
        out.mkdir(parents=True)
        sink = open(out / "pixels.u8", "wb")  # noqa: SIM115 - closed below, also on errors
    try:
        for i, item in loader:
            if isinstance(item, str):
                bad[i] = item
                index[i] = (offset, -1, 0)
                continue
            item = item.numpy()
            index[i] = (offset, item.shape[0], item.shape[1])
            offset += item.nbytes
            if sink is not None:
                sink.write(item.tobytes())
            else:
                arrays.append(item)
    finally:
        if sink is not None:
            sink.close()
    if out is None:
        return DecodedCache(index, bad, pixels=_shared(arrays, offset))
    np.save(out / "index.npy", index, allow_pickle=False)
    meta = {"format": CACHE_FORMAT, "images": len(samples), "bytes": offset, "bad": {str(k): v for k, v in bad.items()},
            "view": repr(view.resize()), "source": samples.name}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return DecodedCache(index, bad, path=out)


def _shared(arrays: list[np.ndarray], total: int) -> torch.Tensor:
    """One shared-memory uint8 tensor holding ``arrays`` back to back (each freed once copied)."""
    flat = torch.empty(total, dtype=torch.uint8).share_memory_()
    at = 0
    for k, a in enumerate(arrays):
        flat[at : at + a.nbytes] = torch.from_numpy(a.reshape(-1))
        at += a.nbytes
        arrays[k] = None  # type: ignore[call-overload] - freed as it is copied: the peak stays ~1x
    return flat


def _as_is(item: Any) -> Any:
    return item


def _open(path: Path) -> DecodedCache:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ImgclfError(f"{path}: a decoded cache of another format; delete it to rebuild")
    index = np.load(path / "index.npy", allow_pickle=False)
    return DecodedCache(index, {int(k): v for k, v in meta["bad"].items()}, path=path)
