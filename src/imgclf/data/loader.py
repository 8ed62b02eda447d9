"""Datasets and loaders that never crash on a bad file: bad items are skipped, counted and reported.

A bad image becomes a ``Skipped`` record instead of a sample; ``collate`` drops it from the batch and
hands it to the caller, which lists it at the end (or stops, with ``strict_images``). The training
sampler is a ``DistributedSampler`` (one replica when not distributed) so shuffling is a pure function
of (seed, epoch): the seam for torchrun and for exact resume.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..dist import shard
from ..errors import ImgclfError
from .images import BadImage
from .sources import Samples


class Skipped(NamedTuple):
    """A sample that could not be decoded."""

    index: int
    source: str
    reason: str


class Batch(NamedTuple):
    """A collated batch; ``images`` is None when every item in it was skipped."""

    images: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped]


class ImageDataset(Dataset):
    """``Samples`` + a transform; ``__getitem__`` returns ``(tensor, label, index)`` or a ``Skipped``.

    ``label`` is an int (single-label) or the image's (K,) uint8 0/1 row (multi-label). Images of the classes in
    ``strong_classes`` go through ``strong`` instead of ``transform`` (``aug.oversampled``: the classes a
    class-aware sampler repeats get a stronger augmentation)."""

    def __init__(self, samples: Samples, transform: Callable, strong: Callable | None = None,
                 strong_classes: frozenset[int] = frozenset()):  # fmt: skip
        self.samples = samples
        self.transform = transform
        self.strong, self.strong_classes = strong, strong_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            img = self.samples.load(i)
            label = self.samples.labels[i]
            if self.samples.multi_label:
                return self.transform(img), label, i
            tf = self.strong if self.strong is not None and int(label) in self.strong_classes else self.transform
            return tf(img), int(label), i
        except BadImage as e:
            return Skipped(i, self.samples.describe(i), e.reason)
        except Exception as e:  # noqa: BLE001 - one odd file must never end an epoch
            return Skipped(i, self.samples.describe(i), f"could not be processed ({type(e).__name__}: {e})")


def collate(batch: list) -> Batch:
    """Stack the decodable items; labels are int64 (B,) class indices, or float32 (B, K) 0/1 targets when the
    items carry multi-label rows (an all-skipped batch has empty int64 labels). Items whose image is a list of
    views (self-supervised multi-view transforms) give a list of (B, C, H, W) tensors, one per view."""
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b for b in batch if isinstance(b, Skipped)]
    if good and isinstance(good[0][0], list | tuple):
        images = [torch.stack([b[0][v] for b in good]) for v in range(len(good[0][0]))]
    else:
        images = torch.stack([b[0] for b in good]) if good else None
    if good and isinstance(good[0][1], np.ndarray):
        labels = torch.from_numpy(np.stack([b[1] for b in good]).astype(np.float32))
    else:
        labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return Batch(images, labels, indices, skipped)


@dataclass
class SkipLog:
    """Bad inputs met so far, keyed by source; ``strict`` turns the first one into an error."""

    strict: bool = False
    items: dict[str, str] = field(default_factory=dict)

    def add(self, skipped: list[Skipped]) -> None:
        for s in skipped:
            if self.strict:
                raise ImgclfError(f"{s.source}: {s.reason} (drop --strict-images to skip bad files instead)")
            self.items.setdefault(s.source, s.reason)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or SLURM's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers(requested: int) -> int:
    """-1 means: one worker per spare core of this process's share (at most 8): the cores divided among the
    processes of this node (torchrun's ``LOCAL_WORLD_SIZE``), minus one for the process itself; 0 when that
    leaves none (one core per rank)."""
    if requested >= 0:
        return requested
    per_rank = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_rank - 1))


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank ``rank``'s share of ``n`` evaluation inputs in order: positions ``rank, rank + world, ...``. No padding
    (``DistributedSampler`` repeats inputs to even the shares, which would count them twice in metrics); the
    shares differ by at most one and ``models.inference.infer`` gathers them back in input order."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def train_sampler(n: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, repeats: int = 1,
                  sampler: Any = None) -> Any:  # fmt: skip
    """The training order over ``n`` items: ``sampler`` (a ``samplers.ClassBalancedSampler``) when given, else
    timm's ``RepeatAugSampler`` for ``repeats > 1`` (each image that many times in a row, differently augmented;
    DeiT), else PyTorch's seeded ``DistributedSampler`` (one replica when not distributed). Shared by the loader
    and the fast path (``data.fastpath``), so both see the same order for a (seed, epoch)."""
    if sampler is not None:
        return sampler
    if repeats > 1:
        return RepeatAugSampler(range(n), world_size, rank, shuffle=True, num_repeats=repeats, selected_round=0)
    return DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


def drops_last(n: int, batch_size: int, world_size: int = 1) -> bool:
    """Training drops the last partial batch unless a rank's share would not fill one batch."""
    return n // world_size > batch_size


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    repeats: int = 1,
    sampler: Any = None,
) -> DataLoader:
    """A loader for training (seeded per-epoch shuffling, drop_last) or evaluation (in order).

    Training shards over ``rank``/``world_size`` (``train_sampler``; ``DistributedSampler``: global batch ``i``
    holds the same images whatever the world size). Evaluation shards over the torchrun ranks of ``dist.shard()``
    with a ``ShardSampler`` (``infer`` gathers the shares back). ``repeats > 1`` uses timm's ``RepeatAugSampler``:
    each image appears that many times in a row, differently augmented (repeated augmentation, DeiT); an epoch keeps
    its usual length. ``sampler`` (a ``samplers.ClassBalancedSampler``) replaces the training sampler.
    """
    workers = auto_workers(num_workers)
    if getattr(dataset.samples.store, "streaming", False):  # a streamed WebDataset: no indices to sample
        from .wds import stream_loader

        kw = {"seed": seed, "rank": rank, "world_size": world_size, "pin_memory": pin_memory, "repeats": repeats}
        return stream_loader(dataset, batch_size, train=train, num_workers=workers, sampler=sampler, **kw)
    if train:
        sampler = train_sampler(len(dataset), seed=seed, rank=rank, world_size=world_size, repeats=repeats,
                                sampler=sampler)  # fmt: skip
    elif sampler is None and shard()[1] > 1:
        sampler = ShardSampler(len(dataset), *shard())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=train and drops_last(len(dataset), batch_size, world_size),
        persistent_workers=workers > 0 and not train,  # train workers are re-seeded each epoch (exact resume)
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def seed_sampler(sampler: Any, seed: int, epoch: int) -> None:
    """Make a training sampler's order of ``epoch`` depend only on (seed, epoch)."""
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RepeatAugSampler):
        sampler.set_epoch(seed * 100_003 + epoch)  # it seeds its shuffle with the epoch alone
    elif hasattr(sampler, "set_epoch"):  # ClassBalancedSampler: seeded by (its seed, epoch)
        sampler.set_epoch(epoch)


def set_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Make shuffling and augmentation of ``epoch`` depend only on (seed, epoch); ``loader`` is a ``DataLoader``
    of ``make_loader`` or an in-memory batch iterable with its own ``set_epoch(epoch)`` (``data.fastpath``)."""
    if not isinstance(loader, DataLoader):
        loader.set_epoch(epoch)
        return
    seed_sampler(loader.sampler, seed, epoch)
    if hasattr(loader.dataset, "set_epoch"):  # a streamed WebDataset (wds.ShardStream): shard order and buffer
        loader.dataset.set_epoch(epoch)
    if loader.generator is not None:  # worker seeds: rank 0 as in a single process, other ranks their own stream
        loader.generator.manual_seed(seed * 1000 + epoch + 1_000_003 * getattr(loader.sampler, "rank", 0))
