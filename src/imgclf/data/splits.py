"""Train / validation / test splits of a run's data, from its config."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..errors import ImgclfError
from .images import policy_from_config
from .sources import DEFAULT_DATA, Samples, label_format_from_config, open_source, stratified_split

log = logging.getLogger("imgclf")


@dataclass
class DataSplits:
    train: Samples
    val: Samples
    test: Samples | None
    class_names: list[str]


def prepare_data(cfg: Config, check_files: bool = True) -> DataSplits:
    """Open train/val/test sources (decoded per ``data.pixel_range``/``background``, within ``data.max_pixels``/
    ``max_aspect``); split validation off the training data when none is given.

    ``check_files`` reads every file's header first: unreadable files, non-images and images over the
    limits are reported as skipped and kept out of the stratified split, so no class loses its validation
    images to junk; classes with too few usable images are named in a warning. Labels are read per
    ``data.task``/``classes``/``label_sep``; multi-label data is split by iterative stratification, and
    validation/test data must be of the same kind (single- or multi-label) as the training data.
    """
    policy, fmt = policy_from_config(cfg.data), label_format_from_config(cfg.data)
    source = _checked(open_source(cfg.data.path or DEFAULT_DATA, "train", policy, fmt), cfg, check_files)
    names = source.class_names
    usable = source.class_counts(usable=True)
    _check_classes(source, usable, cfg.train.metric)
    val = open_source(cfg.data.val_path, "val", policy, fmt) if cfg.data.val_path else source.companion("val")
    if val is not None:
        train, val = source, _same_kind(_checked(val, cfg, check_files), source).remap_to(names)
    else:
        if cfg.data.val_split <= 0:
            raise ImgclfError("data.val_split must be > 0 when no data.val_path is given")
        if getattr(source.store, "streaming", False):  # its val images would be streamed past every epoch
            raise ImgclfError(f"{source.name}: a validation split cannot be drawn from a streamed WebDataset; pass "
                              "--val-data (other shards), or local shard paths, which are read by index")  # fmt: skip
        good = np.setdiff1d(np.arange(len(source)), np.fromiter(source.bad, dtype=np.int64, count=len(source.bad)))
        tr, va = stratified_split(source.labels[good], cfg.data.val_split, cfg.train.seed)
        bad = np.asarray(sorted(source.bad), dtype=np.int64)  # unreadable: in train, where they are reported
        train, val = source.subset(np.sort(np.concatenate([good[tr], bad]))), source.subset(good[va])
        _warn_small_classes(names, usable, val.class_counts(), source.name)
    if len(val) == 0:
        raise ImgclfError(
            f"{source.name}: the validation split is empty (every class has a single image); "
            "add images or pass --val-data"
        )
    test = open_source(cfg.data.test_path, "test", policy, fmt) if cfg.data.test_path else source.companion("test")
    test = _same_kind(_checked(test, cfg, check_files), source).remap_to(names) if test is not None else None
    return DataSplits(train, val, test, names)


def _check_classes(source: Samples, usable: np.ndarray, metric: str) -> None:
    """Single-label training needs two classes with readable images (and 6+ classes for top5); multi-label
    training needs one class with a readable positive image."""
    names = source.class_names
    present = [c for c, n in zip(names, usable) if n]
    if source.multi_label:
        if not present:
            raise ImgclfError(f"{source.name}: no class has a readable positive image (every label set is empty "
                              "or its images are unreadable); need at least one")  # fmt: skip
        return
    if len(present) < 2:
        raise ImgclfError(f"{source.name}: only one class with readable images ({', '.join(present) or 'none'}); "
                          "need at least two")  # fmt: skip
    if metric == "top5" and len(names) <= 5:
        raise ImgclfError(f"train.metric: top5 needs more than 5 classes ({source.name} has {len(names)})")


def _same_kind(s: Samples, train: Samples) -> Samples:
    """``s`` when it is single-label like ``train`` or multi-label like it; else a one-line error naming both."""
    if s.multi_label == train.multi_label:
        return s
    kind = {True: "multi-label", False: "single-label"}
    hint = " (--data.task multi_label reads single-label data as one-hot label sets)" if train.multi_label else ""
    raise ImgclfError(f"{s.name} is {kind[s.multi_label]} but the training data {train.name} is "
                      f"{kind[train.multi_label]}; give data of one kind{hint}")  # fmt: skip


def _checked(s: Samples, cfg: Config, check: bool) -> Samples:
    if check:
        s.check_files(progress=cfg.run.progress)
    for note in s.notes:
        log.warning(note)
    if s.bad:
        first = next(iter(s.bad))
        if cfg.data.strict_images:
            raise ImgclfError(f"{s.describe(first)}: {s.bad[first]} (drop --strict-images to skip bad files instead)")
        log.warning("%s: %d file(s) cannot be used and are skipped (e.g. %s: %s)", s.name, len(s.bad),
                    s.describe(first), s.bad[first])  # fmt: skip
    return s


def _warn_small_classes(names: list[str], usable: np.ndarray, in_val: np.ndarray, where: str) -> None:
    """Name the classes that end with no validation image (1 usable image) or no usable image at all."""
    none = [c for c, n in zip(names, usable) if n == 0]
    single = [c for c, n, v in zip(names, usable, in_val) if n > 0 and v == 0]
    if none:
        log.warning("%s: no readable image for class(es) %s: the model can never predict them correctly",
                    where, ", ".join(none[:10]))  # fmt: skip
    if single:
        log.warning("%s: class(es) %s have too few images for a validation image (need 2+): their validation "
                    "metrics are missing", where, ", ".join(single[:10]))  # fmt: skip


def run_split(art, which: str, flag: str) -> Samples:
    """A saved run's own ``train`` or ``val`` split, rebuilt from its resolved config (same seed, same images);
    a warning when its size differs from the one training recorded (files added, removed or unreadable)."""
    from ..config import build_config

    try:
        split = getattr(prepare_data(build_config([art.config], ["the run's config"])), which)
    except ImgclfError as e:
        raise ImgclfError(f"{art.run_dir}: its {which} images are unavailable ({e}); pass {flag}") from None
    recorded = art.data.get(f"n_{which}")
    if recorded is not None and recorded != len(split):
        log.warning("%s: the rebuilt %s split has %d images where training had %d (the data changed); "
                    "figures on it are not the training-time ones (pass %s)",
                    art.run_dir, which, len(split), recorded, flag)  # fmt: skip
    return split
