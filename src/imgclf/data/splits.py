"""Train / validation / test splits of a run's data, from its config."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import ImgclfError
from .sources import DEFAULT_DATA, Samples, open_source, stratified_split


@dataclass
class DataSplits:
    train: Samples
    val: Samples
    test: Samples | None
    class_names: list[str]


def prepare_data(cfg: Config) -> DataSplits:
    """Open train/val/test sources; split validation off the training data when none is given."""
    source = open_source(cfg.data.path or DEFAULT_DATA, "train")
    names = source.class_names
    present = [c for c, n in zip(names, source.class_counts()) if n]
    if len(present) < 2:
        raise ImgclfError(f"{source.name}: only one class ({', '.join(present) or 'none'}); need at least two")
    if cfg.train.metric == "top5" and len(names) <= 5:
        raise ImgclfError(f"train.metric: top5 needs more than 5 classes ({source.name} has {len(names)})")
    val = open_source(cfg.data.val_path, "val") if cfg.data.val_path else source.companion("val")
    if val is not None:
        train, val = source, val.remap_to(names)
    else:
        if cfg.data.val_split <= 0:
            raise ImgclfError("data.val_split must be > 0 when no data.val_path is given")
        tr, va = stratified_split(source.labels, cfg.data.val_split, cfg.train.seed)
        train, val = source.subset(tr), source.subset(va)
    if len(val) == 0:
        raise ImgclfError(
            f"{source.name}: the validation split is empty (every class has a single image); "
            "add images or pass --val-data"
        )
    test = open_source(cfg.data.test_path, "test") if cfg.data.test_path else source.companion("test")
    return DataSplits(train, val, test.remap_to(names) if test is not None else None, names)


def run_split(run_dir, config: dict, which: str, flag: str) -> Samples:
    """A saved run's own ``train`` or ``val`` split, rebuilt from its resolved config (same seed, same images)."""
    from ..config import build_config

    try:
        return getattr(prepare_data(build_config([config], ["the run's config"])), which)
    except ImgclfError as e:
        raise ImgclfError(f"{run_dir}: its {which} images are unavailable ({e}); pass {flag}") from None
