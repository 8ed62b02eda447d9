"""Class-aware training samplers for long-tailed data (``data.sampler``), deterministic per (seed, epoch).

A class ``c`` with ``n_c`` training images is drawn with probability ``p_c ∝ n_c^q``, then an image of it
uniformly (Kang et al. 2020, "Decoupling Representation and Classifier for Long-Tailed Recognition"):

- ``instance``: q = 1, every image equally likely (plain shuffling; imgclf then uses PyTorch's
  ``DistributedSampler``, without replacement);
- ``sqrt``: q = 1/2, square-root sampling;
- ``balanced``: q = 0, every class equally likely;
- ``progressive``: ``p_c(t) = (1 - t/T) p_c(instance) + (t/T) p_c(balanced)`` over the epochs t = 0 .. T-1,
  from instance-balanced to class-balanced.

An epoch draws as many images as the data set holds, with replacement (rare classes repeat), from one
generator seeded by (seed, epoch), so resume and every rank see the same global draw; under DDP each rank
takes every ``num_replicas``-th draw. Written here: PyTorch's ``WeightedRandomSampler`` is neither
epoch-seeded nor DDP-aware.

Example:
    >>> s = ClassBalancedSampler([0] * 90 + [1] * 10, "balanced", seed=0)
    >>> s.set_epoch(1)
    >>> round(sum(1 for i in s if i >= 90) / len(s), 1)
    0.5
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import ImgclfError

MODES = ("instance", "sqrt", "balanced", "progressive")


def class_probs(counts: Sequence[int] | np.ndarray, mode: str, epoch: int = 1, epochs: int = 1) -> np.ndarray:
    """(K,) probability that ``mode`` draws each class, for ``counts`` (K,) images per class, in ``epoch`` of
    ``epochs`` (epochs count from 1; only ``progressive`` depends on them)."""
    n = np.asarray(counts, dtype=np.float64)
    inst, bal = n / n.sum(), (n > 0) / max((n > 0).sum(), 1)
    if mode == "instance":
        return inst
    if mode == "balanced":
        return bal
    if mode == "sqrt":
        return np.sqrt(n) / np.sqrt(n).sum()
    t = min(max(epoch - 1, 0) / max(epochs - 1, 1), 1.0)  # 0 at the first epoch, 1 at the last
    return (1 - t) * inst + t * bal


def oversampled_classes(labels: Sequence[int] | np.ndarray, mode: str) -> frozenset[int]:
    """The classes ``mode`` draws more often than their share of the images (``p_c > n_c / N``; ``progressive``:
    at its class-balanced end), which ``aug.oversampled`` augments more strongly."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y[y >= 0])
    p = class_probs(counts, "balanced" if mode == "progressive" else mode)
    return frozenset(int(c) for c in np.flatnonzero(p > counts / counts.sum() * (1 + 1e-9)))


class ClassBalancedSampler(Sampler[int]):
    """Indices of one epoch drawn by ``mode`` (see the module docstring) from integer ``labels`` (N,).

    Raises:
        ImgclfError: an unknown mode or no labelled image.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, mode: str = "balanced", *, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, epochs: int = 1):  # fmt: skip
        if mode not in MODES:
            raise ImgclfError(f"data.sampler must be one of {', '.join(MODES)} (got {mode!r})")
        y = np.asarray(labels, dtype=np.int64)
        if y.ndim != 1:
            raise ImgclfError("data.sampler balanced / sqrt / progressive needs one class per image (label sets: "
                              "use --train.pos_weight)")  # fmt: skip
        if not (y >= 0).any():
            raise ImgclfError("data.sampler: no labelled training image")
        self.labels, self.mode, self.seed, self.epochs = y, mode, seed, max(1, epochs)
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.counts = np.bincount(y[y >= 0])
        self.total = len(y)

    def set_epoch(self, epoch: int) -> None:
        """Epochs count from 1 in imgclf's loop; ``progressive`` moves from instance to class balance over them."""
        self.epoch = epoch

    def class_probs(self) -> np.ndarray:
        """(K,) probability of drawing each class in the current epoch (``class_probs``)."""
        return class_probs(self.counts, self.mode, self.epoch, self.epochs)

    def __iter__(self) -> Iterator[int]:
        p = self.class_probs()
        w = np.zeros(self.total)
        known = self.labels >= 0
        w[known] = p[self.labels[known]] / self.counts[self.labels[known]]  # per image: p_c / n_c
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draws = torch.multinomial(torch.from_numpy(w), self.total, replacement=True, generator=g)
        return iter(draws[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.num_replicas))
