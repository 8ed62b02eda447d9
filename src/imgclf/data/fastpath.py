"""The fast data path for small images: the training split decoded once into one uint8 tensor on the training
device, augmented there a whole batch at a time (``data.device_aug``): no per-image PIL work in the loop and no
loader worker processes competing with the model for the cores.

``data.fast_path`` (``plan``): ``auto`` (the default) takes it when the augmentation can be done batched (not
``aug.auto_augment``, ``aug.oversampled``, ``aug.perspective`` or ``aug.color_jitter``: those stay per-image PIL
ops), the images are at most ``SLACK`` x the input size (larger ones go through the PIL path, which crops them
at full resolution) and the decoded split fits ``data.fast_path_budget`` GiB; ``on`` insists (an error names
what it cannot do); ``off`` keeps the PIL loader. One log line says which path and why.

Decoding (``decode_split``) goes through ``Samples.load`` (the run's decode policy: what a person sees) in
threads; in-memory uint8 arrays are taken as they are (the same pixels, checked by a test). Images of one size
up to ``SLACK`` x the input size are stored as they are, so random crops see every native pixel as the PIL path
does; otherwise (mixed sizes, or larger images under ``on``) each is stored as its eval view at crop_pct 1.0 at
the input size. A split whose images are all grey is stored with one channel. A slow decode (over
``CACHE_AFTER_SECONDS``) is cached on disk under a key of the data's content, the decode policy and the storage
size (``data.cache.data_identity``, like the probe's feature cache).

The order is the loader's: the same sampler objects (``loader.train_sampler``: ``DistributedSampler``,
``RepeatAugSampler``, ``ClassBalancedSampler``) seeded by (seed, epoch), the same batch size and drop_last, and
unreadable images dropped from their batch and reported with it; augmentation draws from a generator on the
device seeded by (seed, epoch, rank). So exact resume and DDP sharding work as with the loader, and a run's
batches are a pure function of (seed, epoch, rank).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import ImgclfError
from ..io import save_safetensors
from .cache import data_identity
from .device_aug import BatchAugment
from .images import BadImage
from .loader import Batch, Skipped, drops_last, seed_sampler, train_sampler
from .sizing import native_sides
from .sources import Samples

log = logging.getLogger("imgclf")
SLACK = 2.0  # images up to this x the input size are stored natively (a crop then never shrinks more than 2x)
CACHE_AFTER_SECONDS = 10.0  # a decode that took longer is cached on disk
CACHE_FORMAT = 1
MODES = ("auto", "on", "off")
#: augmentation the batched ops do not do: per-image PIL policies, a non-affine warp, per-image colour order
UNSUPPORTED = {"auto_augment": "aug.auto_augment", "oversampled": "aug.oversampled",
               "perspective": "aug.perspective", "color_jitter": "aug.color_jitter"}  # fmt: skip


class Plan(NamedTuple):
    """Whether training uses the fast path (``use``), the log line saying why (``reason``), the storage side
    (``side``: None stores images as they are, else their eval view at ``side`` px) and the estimated bytes."""

    use: bool
    reason: str
    side: int | None
    nbytes: int


def unsupported(pre: Any, aug: Any) -> list[str]:
    """The ``aug`` fields (and model facts) that keep a run on the PIL path."""
    out = [name for key, name in UNSUPPORTED.items() if getattr(aug, key) not in (None, 0, 0.0)]
    return out + ([f"a {pre.channels}-channel model"] if pre.channels != 3 else [])


def plan(samples: Samples, pre: Any, aug: Any, mode: str = "auto", budget_gb: float = 2.0) -> Plan:
    """Decide the training data path for ``samples`` at ``pre``'s input size with ``aug`` (an ``AugmentConfig``);
    see the module docstring. Raises ``ImgclfError`` under ``mode`` on when the fast path cannot apply."""
    if mode not in MODES:
        raise ImgclfError(f"data.fast_path must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "off":
        return Plan(False, "data path: PIL loader (data.fast_path off)", None, 0)
    refuse = _refuser(mode)
    if getattr(samples.store, "streaming", False):
        return refuse("a streamed source is read once per epoch, in shard order")
    if bad := unsupported(pre, aug):
        return refuse(f"{', '.join(bad)} {'needs' if len(bad) == 1 else 'need'} per-image PIL ops")
    sides = native_sides(samples)
    if not len(sides):
        return refuse("no readable image to size")
    t = max(pre.size)
    h, w = (int(v) for v in np.median(sides, 0))
    uniform = bool((sides == sides[0]).all())
    large = min(h, w) > SLACK * t
    side = None if uniform and not large else t
    arrays = samples.arrays
    grey = arrays is not None and (arrays.ndim == 3 or arrays.shape[-1] == 1)
    nbytes = len(samples) * (1 if grey else 3) * (h * w if side is None else t * t)
    if large and mode == "auto":
        return refuse(f"images of {h}x{w} px are over {SLACK:g}x the input size {t}: the PIL path crops them at "
                      "full resolution")  # fmt: skip
    if nbytes > budget_gb * 2**30:
        return refuse(f"the decoded split would take {nbytes / 2**30:.1f} GiB, over data.fast_path_budget "
                      f"{budget_gb:g} GiB")  # fmt: skip
    what = f"{h}x{w}" if uniform else "mixed sizes"
    stored = f"{h}x{w}" if side is None else f"{side}x{side} (eval view of {what})"
    size = _mib(nbytes) if grey or arrays is not None else f"up to {_mib(nbytes)}"
    return Plan(True, f"data path: fast ({mode}): {len(samples):,} images stored as uint8 {stored}, {size}; "
                      "batched augmentation on the device, no loader workers", side, nbytes)  # fmt: skip


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 10 * 2**20 else f"{nbytes / 2**20:,.0f} MiB"


def _refuser(mode: str):
    """The fall-back of ``plan`` for ``mode``: a PIL-path ``Plan`` under auto, an ``ImgclfError`` under on."""

    def refuse(why: str) -> Plan:
        if mode == "on":
            raise ImgclfError(f"data.fast_path on: {why}; set --data.fast_path auto or off")
        return Plan(False, f"data path: PIL loader (fast path not taken: {why})", None, 0)

    return refuse


# ---------------------------------------------------------------------------------------------- decoding


def decode_split(samples: Samples, pre: Any, side: int | None = None,
                 threads: int | None = None) -> tuple[torch.Tensor, dict[int, Skipped]]:  # fmt: skip
    """Every image of ``samples`` as one (N, c, h, w) uint8 tensor (c = 1 when every image is grey, else 3) and
    the unreadable ones (index -> ``Skipped``; their slot stays black).

    ``side`` None keeps the images as they are (all must share one size, or they are all stored as in the next
    case); else each becomes its eval view (``pre``'s resize at crop_pct 1.0, centre crop) at ``side`` px.
    Decoded by ``Samples.load`` in ``threads`` threads (default: the usable cores, at most 8); plain uint8
    arrays (N, H, W[, 1 | 3]) are taken directly, which gives the same pixels."""
    a = samples.arrays
    plain = a is not None and a.dtype == np.uint8 and (a.ndim == 3 or a.shape[-1] in (1, 3))
    if plain and side is None and not samples.bad:
        x = a[np.asarray(samples.items, dtype=np.int64)]
        x = x[..., None] if x.ndim == 3 else x
        if x.shape[-1] == 3 and (x[..., :1] == x[..., 1:]).all():
            x = x[..., :1]  # RGB arrays that are grey: one channel
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous(), {}
    view = _view(pre, side) if side is not None else None

    def one(i: int) -> np.ndarray | Skipped:
        try:
            img = samples.load(i)
            arr = view(img) if view is not None else np.asarray(img, dtype=np.uint8)
        except BadImage as e:
            return Skipped(i, samples.describe(i), e.reason)
        except Exception as e:  # noqa: BLE001 - one odd file must never end the run (as in the loader)
            return Skipped(i, samples.describe(i), f"could not be processed ({type(e).__name__}: {e})")
        return arr[..., :1] if (arr[..., :1] == arr[..., 1:]).all() else arr  # grey: keep one channel

    n = threads or max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(max_workers=n) as pool:
        got = list(pool.map(one, range(len(samples)), chunksize=64))
    skipped = {r.index: r for r in got if isinstance(r, Skipped)}
    arrays = [r for r in got if not isinstance(r, Skipped)]
    if not arrays:
        raise ImgclfError(f"{samples.name}: no training image could be read; see the skipped files")
    if len({r.shape[:2] for r in arrays}) > 1:  # mixed sizes: every image as its eval view at the input size
        return decode_split(samples, pre, max(pre.size), threads)
    c = 1 if all(r.shape[-1] == 1 for r in arrays) else 3
    out = torch.zeros(len(samples), c, *arrays[0].shape[:2], dtype=torch.uint8)
    for i, r in enumerate(got):
        if not isinstance(r, Skipped):
            out[i] = torch.from_numpy(np.array(r)).permute(2, 0, 1)  # (a writable copy); a grey image broadcasts to c
    return out, skipped


def _view(pre: Any, side: int):
    """PIL image -> (side, side, 3) uint8: the eval view at crop_pct 1.0 (``Preprocess.pixels``)."""
    return dataclasses.replace(pre, input_size=(pre.channels, side, side), crop_pct=1.0, crop_mode="center").pixels()


def cached_decode(samples: Samples, pre: Any, side: int | None, cache: Path | None,
                  write: bool = True) -> tuple[torch.Tensor, dict[int, Skipped]]:  # fmt: skip
    """``decode_split``, read from ``cache`` (a directory; None: no cache) when a previous decode of the same
    content, decode policy and storage was slow enough to be written there (``write``: this process may)."""
    direct = samples.arrays is not None and side is None  # arrays decode in moments: nothing to cache
    path = None
    if cache is not None and not direct:
        key = {"data": data_identity(samples), "decode": samples.decode.to_json(), "format": CACHE_FORMAT,
               "side": side, "interpolation": pre.interpolation if side is not None else None}  # fmt: skip
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
        path = cache / f"decoded-{digest}.safetensors"
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                skipped = {i: Skipped(i, src, why) for i, src, why in json.loads(f.metadata()["skipped"])}
                log.info("decoded images: cache hit (%s)", path)
                return f.get_tensor("images"), skipped
    t0 = time.perf_counter()
    images, skipped = decode_split(samples, pre, side)
    secs = time.perf_counter() - t0
    if write:  # one line per run, not per rank
        log.info("decoded %d images in %.1fs: uint8 %s, %s", len(samples), secs, tuple(images.shape),
                 _mib(images.numel()))  # fmt: skip
    if path is not None and write and secs >= CACHE_AFTER_SECONDS:
        save_safetensors(path, {"images": images}, {"skipped": json.dumps([list(s) for s in skipped.values()])})
    return images, skipped


# ---------------------------------------------------------------------------------------------- batches


class DeviceBatches:
    """Training batches (``loader.Batch``) of a decoded split, augmented on ``device``: what ``train_one_epoch``
    takes in place of a ``DataLoader`` (``__len__``, ``__iter__``, ``set_epoch``, ``sampler``).

    Args:
        images: (N, c, h, w) uint8 (``decode_split``); moved to ``device`` once.
        labels: (N,) int64 class indices or (N, K) 0/1 rows (multi-label: float32 targets, as ``collate`` makes).
        skipped: unreadable images (index -> ``Skipped``): dropped from their batch and reported with it.
        augment: the batched augmentation; sampler: the training order (``loader.train_sampler``).
        batch_size, drop_last, seed, rank: as the loader's; ``rank`` also seeds the augmentation.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, skipped: dict[int, Skipped],
                 augment: BatchAugment, sampler: Any, batch_size: int, drop_last: bool, seed: int, rank: int,
                 device: torch.device):  # fmt: skip
        self.device = torch.device(device)
        self.images = images.to(self.device)
        y = torch.from_numpy(np.asarray(labels))
        self.labels = (y.float() if y.ndim == 2 else y.long()).to(self.device)
        self.skipped, self.augment, self.sampler = skipped, augment, sampler
        self.batch_size, self.drop_last, self.seed, self.rank, self.epoch = batch_size, drop_last, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentation of ``epoch`` from (seed, epoch) (and the rank) only."""
        self.epoch = epoch
        seed_sampler(self.sampler, self.seed, epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def generator(self) -> torch.Generator:
        """The augmentation's generator of the current epoch, on the device."""
        mix = hashlib.sha256(f"fastpath/{self.seed}/{self.epoch}/{self.rank}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(mix[:8], "little") >> 1)

    def __iter__(self) -> Iterator[Batch]:
        order = list(iter(self.sampler))
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)][: len(self)]
        keep = [[i for i in c if i not in self.skipped] for c in chunks]
        index = torch.tensor([i for k in keep for i in k], dtype=torch.long)
        on_device = index.to(self.device)  # one copy per epoch, then slices: no host-to-device copy per step
        g, start = self.generator(), 0
        for chunk, k in zip(chunks, keep):
            bad = [self.skipped[i] for i in chunk if i in self.skipped]
            if not k:
                yield Batch(None, self.labels[:0].cpu(), torch.zeros(0, dtype=torch.long), bad)
                continue
            idx = on_device[start : start + len(k)]
            x = self.augment(self.images.index_select(0, idx), g)
            yield Batch(x, self.labels.index_select(0, idx), index[start : start + len(k)], bad)
            start += len(k)


def device_batches(samples: Samples, pre: Any, aug: Any, plan_: Plan, *, batch_size: int, device: torch.device,
                   seed: int = 0, rank: int = 0, world_size: int = 1, repeats: int = 1, sampler: Any = None,
                   cache: Path | None = None) -> DeviceBatches:  # fmt: skip
    """The fast path's training batches for ``samples`` per ``plan_`` (``plan``): decoded (or read from
    ``cache``), on ``device``, in the loader's order (``loader.train_sampler`` with ``seed``, ``rank``,
    ``world_size``, ``repeats``, ``sampler``), augmented per ``aug`` (an ``AugmentConfig``) at ``pre``'s size."""
    images, skipped = cached_decode(samples, pre, plan_.side, cache, write=rank == 0)
    order = train_sampler(len(samples), seed=seed, rank=rank, world_size=world_size, repeats=repeats, sampler=sampler)
    return DeviceBatches(images, samples.labels, skipped, BatchAugment.from_config(pre, aug), order, batch_size,
                         drops_last(len(samples), batch_size, world_size), seed, rank, device)  # fmt: skip
