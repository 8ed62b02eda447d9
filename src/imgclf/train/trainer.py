"""The training loop: a plain function per step of the recipe, read top to bottom.

``fit(cfg)`` prepares data and model, trains epoch by epoch (AMP, accumulation, clipping, EMA,
per-update LR schedule), validates the raw and EMA weights, keeps the best by the chosen metric,
stops early, checkpoints atomically for exact resume, evaluates the test set and writes the artifact.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..artifact import Artifact, save_artifact, save_weights
from ..config import Config, config_to_dict
from ..data.loader import ImageDataset, SkipLog, make_loader, set_epoch
from ..data.sources import Samples, open_source, stratified_split
from ..data.transforms import eval_transform, resolve_preprocessing, train_transform
from ..dist import Dist, amp_dtype, autocast, setup
from ..errors import ImgclfError
from ..eval.inference import infer
from ..eval.metrics import compute_metrics
from ..models.factory import create_model
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logger import RunLogger
from .optim import build_optimizer, build_scheduler
from .task import ClassificationTask

log = logging.getLogger("imgclf")

BUILTIN_DEFAULT = "builtin:fashion-mnist"
LAST_CKPT = "checkpoints/last.pt"
BEST_WEIGHTS = "checkpoints/best.safetensors"


@dataclass
class DataSplits:
    train: Samples
    val: Samples
    test: Samples | None
    class_names: list[str]


@dataclass
class TrainResult:
    """What ``fit`` returns: where the run is and its numbers."""

    run_dir: Path
    best_epoch: int
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class State:
    """Mutable loop state that a checkpoint captures."""

    epoch: int = 0  # epochs completed
    updates: int = 0
    best: float | None = None
    best_epoch: int = -1
    best_which: str = "model"
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_data(cfg: Config) -> DataSplits:
    """Open train/val/test sources; split validation off the training data when none is given."""
    spec = cfg.data.path or BUILTIN_DEFAULT
    source = open_source(spec, "train")
    names = source.class_names
    present = [c for c, n in zip(names, source.class_counts()) if n]
    if len(present) < 2:
        raise ImgclfError(f"{source.name}: only one class ({', '.join(present) or 'none'}); need at least two")
    val = open_source(cfg.data.val_path, "val") if cfg.data.val_path else source.companion("val")
    if val is not None:
        train, val = source, val.remap_to(names)
    else:
        if cfg.data.val_split <= 0:
            raise ImgclfError("data.val_split must be > 0 when no data.val_path is given")
        tr, va = stratified_split(source.labels, cfg.data.val_split, cfg.train.seed)
        train, val = source.subset(tr), source.subset(va)
    test = open_source(cfg.data.test_path, "test") if cfg.data.test_path else source.companion("test")
    if test is not None:
        test = test.remap_to(names)
    return DataSplits(train, val, test, names)


def _loaders(cfg: Config, splits: DataSplits, pre: dict, dist: Dist) -> tuple[DataLoader, DataLoader]:
    d = cfg.data
    pin = dist.device.type == "cuda"
    train = make_loader(
        ImageDataset(splits.train, train_transform(pre, cfg.aug)),
        d.batch_size,
        train=True,
        num_workers=d.num_workers,
        seed=cfg.train.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        pin_memory=pin,
    )
    val = eval_loader(splits.val, pre, cfg, pin)
    return train, val


def eval_loader(samples: Samples, pre: dict, cfg: Config, pin: bool = False) -> DataLoader:
    """An in-order loader with the eval transform."""
    bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    return make_loader(
        ImageDataset(samples, eval_transform(pre)), bs, train=False, num_workers=cfg.data.num_workers, pin_memory=pin
    )


def train_one_epoch(
    task: nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    sched: Any,
    ema: ModelEmaV3 | None,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    dist: Dist,
    state: State,
    skips: SkipLog,
    bar_desc: str,
) -> dict[str, float]:
    """One pass over the training data; returns mean loss, images/s and the last learning rate."""
    task.train()
    dtype = amp_dtype(cfg.train.amp, dist.device)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    accum = cfg.optim.accum_steps
    total_loss, seen, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=bar_desc, disable=not (cfg.run.progress and dist.is_main), leave=False, unit="batch")
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        skips.add(batch.skipped)
        if batch.images is None or len(batch.labels) < 2:
            continue  # all decoded items were bad, or BatchNorm would see a single sample
        x = batch.images.to(dist.device, non_blocking=True).contiguous(memory_format=fmt)
        y = batch.labels.to(dist.device, non_blocking=True)
        with autocast(dist.device, dtype):
            loss, _ = task(x, y)
        if not math.isfinite(loss.item()):
            raise ImgclfError(f"training diverged (loss {loss.item()}) in epoch {state.epoch + 1}; lower optim.lr")
        scaler.scale(loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == len(loader):
            _optimizer_step(task, opt, scaler, cfg.optim.clip_grad)
            state.updates += 1
            sched.step_update(state.updates)
            if ema is not None:
                ema.update(_unwrap(task).model, step=state.updates)
        total_loss += loss.item() * len(y)
        seen += len(y)
        rate = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}")
    bar.close()
    secs = time.perf_counter() - t0
    return {
        "train_loss": total_loss / max(seen, 1),
        "lr": opt.param_groups[0]["lr"],
        "img_per_s": seen * dist.world_size / max(secs, 1e-9),
        "epoch_seconds": secs,
    }


def _optimizer_step(task: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float | None):
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _unwrap(task: nn.Module) -> ClassificationTask:
    return task.module if hasattr(task, "module") else task


def _score(metrics: dict[str, Any], metric: str) -> float:
    """Higher is better for every metric (loss is negated)."""
    return -metrics["loss"] if metric == "loss" else metrics.get(metric, metrics["top1"])


def validate(
    model: nn.Module,
    ema: ModelEmaV3 | None,
    loader: DataLoader,
    cfg: Config,
    dist: Dist,
    names: list[str],
    skips: SkipLog,
) -> dict[str, dict[str, Any]]:
    """Validation metrics of the raw model and (if enabled) its EMA."""
    dtype = amp_dtype(cfg.train.amp, dist.device)
    cands = {"model": model} | ({"ema": ema.module} if ema is not None else {})
    out = {}
    for which, net in cands.items():
        o = infer(net, loader, dist.device, skips=skips, amp_dtype=dtype, channels_last=cfg.model.channels_last)
        out[which] = compute_metrics(o.logits, o.labels, names)
    return out


def _run_dir(cfg: Config, resume: bool) -> Path:
    out = Path(cfg.run.output)
    if resume:
        if not cfg.run.name:
            raise ImgclfError("resume needs run.name (the run directory under run.output)")
        d = out / cfg.run.name
        if not (d / LAST_CKPT).is_file():
            raise ImgclfError(f"--resume: {d} has no checkpoint ({LAST_CKPT}) to resume from")
        return d
    if cfg.run.name:
        d = out / cfg.run.name
        if d.exists() and any(d.iterdir()):
            raise ImgclfError(f"run directory {d} already exists; add --resume to continue it or pick another --name")
        return d
    stem = f"{cfg.model.name.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    d, n = out / stem, 2
    while d.exists():
        d, n = out / f"{stem}-{n}", n + 1
    return d


def fit(cfg: Config, resume: bool = False) -> TrainResult:
    """Train, validate, checkpoint, test and write the artifact; see the module docstring."""
    t_start = time.perf_counter()
    dist = setup(cfg.train.device)
    run_dir = _run_dir(cfg, resume)
    torch.manual_seed(cfg.train.seed)
    splits = prepare_data(cfg)
    model, wsrc = create_model(cfg.model, len(splits.class_names))
    pre = resolve_preprocessing(model, cfg.data)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=fmt)
    train_loader, val_loader = _loaders(cfg, splits, pre, dist)
    task: nn.Module = ClassificationTask(model, cfg.train.label_smoothing)
    if dist.world_size > 1:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        task = torch.nn.parallel.DistributedDataParallel(task, device_ids=ids)
    opt = build_optimizer(model, cfg.optim)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.optim.accum_steps)
    sched = build_scheduler(opt, cfg.sched, updates_per_epoch, cfg.train.epochs)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype(cfg.train.amp, dist.device) == torch.float16)
    state = State()
    if resume:
        _restore(run_dir, model, opt, sched, ema, scaler, state)
    skips = SkipLog(strict=cfg.data.strict_images)
    logger = RunLogger(run_dir, enabled=dist.is_main)
    if dist.is_main:
        logger.save_config(cfg)
        log.info(
            "run %s | %s (%s) | %d classes | train %d, val %d%s | %s",
            run_dir,
            cfg.model.name,
            wsrc,
            len(splits.class_names),
            len(splits.train),
            len(splits.val),
            f", test {len(splits.test)}" if splits.test is not None else "",
            dist.device,
        )
    loops = dict(task=task, opt=opt, sched=sched, ema=ema, scaler=scaler, dist=dist, skips=skips)
    _epochs(cfg, state, run_dir, model, train_loader, val_loader, splits, logger, loops)
    logger.close()
    return _finish(cfg, state, run_dir, model, splits, pre, wsrc, dist, skips, time.perf_counter() - t_start)


def _epochs(cfg, state, run_dir, model, train_loader, val_loader, splits, logger, loops) -> None:
    """Epoch loop: train, validate, keep the best, checkpoint, stop early."""
    dist, ema, skips = loops["dist"], loops["ema"], loops["skips"]
    while state.epoch < cfg.train.epochs:
        e = state.epoch + 1
        set_epoch(train_loader, cfg.train.seed, e)
        stats = train_one_epoch(
            loops["task"],
            train_loader,
            loops["opt"],
            loops["sched"],
            ema,
            loops["scaler"],
            cfg,
            dist,
            state,
            skips,
            f"epoch {e}/{cfg.train.epochs}",
        )
        val = validate(model, ema, val_loader, cfg, dist, splits.class_names, skips)
        which = max(val, key=lambda k: _score(val[k], cfg.train.metric))
        score = _score(val[which], cfg.train.metric)
        improved = state.best is None or score > state.best
        if improved:
            state.best, state.best_epoch, state.best_which, state.stale = score, e, which, 0
            if dist.is_main:
                save_weights(run_dir / BEST_WEIGHTS, model if which == "model" else ema.module)
        else:
            state.stale += 1
        row = {"epoch": e, **stats, **{f"val_{k}": val["model"][k] for k in ("loss", "top1", "macro_f1")}}
        if ema is not None:
            row.update({f"ema_val_{k}": val["ema"][k] for k in ("loss", "top1", "macro_f1")})
        row["best"] = improved
        state.history.append(row)
        state.epoch = e
        logger.log_epoch(row)
        if dist.is_main:
            _save(run_dir, model, loops, state)
        log.info(_epoch_line(row, cfg, ema is not None))
        if cfg.train.patience is not None and state.stale >= cfg.train.patience:
            log.info("early stop: no improvement in %s for %d epochs", cfg.train.metric, state.stale)
            break


def _epoch_line(row: dict, cfg: Config, has_ema: bool) -> str:
    ema = f" (ema {100 * row['ema_val_top1']:.2f} %)" if has_ema else ""
    star = " *" if row["best"] else ""
    return (
        f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
        f"val top1 {100 * row['val_top1']:.2f} %{ema}  lr {row['lr']:.2e}  "
        f"{row['img_per_s']:.0f} img/s  {row['epoch_seconds']:.0f}s{star}"
    )


def _save(run_dir: Path, model: nn.Module, loops: dict, state: State) -> None:
    ema = loops["ema"]
    save_checkpoint(
        run_dir / LAST_CKPT,
        {
            "model": model.state_dict(),
            "optimizer": loops["opt"].state_dict(),
            "scheduler": loops["sched"].state_dict(),
            "ema": ema.module.state_dict() if ema is not None else {},
            "scaler": loops["scaler"].state_dict(),
            "state": {k: v for k, v in vars(state).items() if k != "history"},
            "history": state.history,
            "rng": rng_state(),
        },
    )


def _restore(run_dir: Path, model, opt, sched, ema, scaler, state: State) -> None:
    ck = load_checkpoint(run_dir / LAST_CKPT)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if ema is not None and ck["ema"]:
        ema.module.load_state_dict(ck["ema"])
    if ck["scaler"]:
        scaler.load_state_dict(ck["scaler"])
    for k, v in ck["state"].items():
        setattr(state, k, v)
    state.history = list(ck["history"])
    set_rng_state(ck["rng"])
    log.info("resumed %s after epoch %d", run_dir, state.epoch)


def _finish(cfg, state, run_dir, model, splits, pre, wsrc, dist, skips, seconds) -> TrainResult:
    """Reload the best weights, measure val (and test), write the artifact."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(run_dir / BEST_WEIGHTS), device=str(dist.device)))
    dtype = amp_dtype(cfg.train.amp, dist.device)
    pin = dist.device.type == "cuda"

    def measure(samples: Samples, desc: str) -> dict[str, Any]:
        loader = eval_loader(samples, pre, cfg, pin)
        o = infer(
            model,
            loader,
            dist.device,
            skips=skips,
            amp_dtype=dtype,
            channels_last=cfg.model.channels_last,
            progress=cfg.run.progress and dist.is_main,
            desc=desc,
        )
        return compute_metrics(o.logits, o.labels, splits.class_names)

    val_m = measure(splits.val, "val")
    test_m = measure(splits.test, "test") if splits.test is not None else None
    metrics = {
        "val": val_m,
        "best_epoch": state.best_epoch,
        "best_weights": state.best_which,
        "epochs_run": state.epoch,
        "train_seconds": round(seconds, 1),
    }
    if test_m is not None:
        metrics["test"] = test_m
    if skips.items:
        metrics["skipped_files"] = skips.items
    art = Artifact(
        arch=cfg.model.name,
        class_names=splits.class_names,
        preprocessing=pre,
        config=config_to_dict(cfg),
        metrics=metrics,
        weights_source=wsrc,
        extra={"data": {"train": splits.train.name, "n_train": len(splits.train), "n_val": len(splits.val)}},
    )
    if dist.is_main:
        save_artifact(run_dir, model, art)
    return TrainResult(run_dir, state.best_epoch, val_m, test_m, state.history, dict(skips.items), seconds)
