"""The training loop: a plain function per step of the recipe, read top to bottom.

``fit(cfg)`` prepares data and model, trains epoch by epoch through the strategy's phases
(``imgclf.train.strategy``: what trains at which learning rate), with AMP, accumulation, clipping,
MixUp/CutMix, EMA and a per-update LR schedule; validates the raw and EMA weights, keeps the best
by the chosen metric (``checkpoints/best.safetensors``), stops early and checkpoints atomically for
exact resume. What happens after training (test evaluation, the artifact) lives in ``imgclf.pipeline``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm.utils
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config
from ..data.loader import ImageDataset, SkipLog, make_loader, set_epoch
from ..data.sources import Samples
from ..data.splits import DataSplits, prepare_data
from ..data.transforms import eval_transform, resolve_preprocessing, train_transform
from ..dist import Dist, amp_dtype, any_rank, autocast, barrier, broadcast, setup
from ..errors import ImgclfError
from ..io import save_safetensors
from ..models.factory import create_model
from ..models.inference import infer
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logger import LOCK_FILE, RunLogger, run_is_live
from .metrics import compute_metrics
from .optim import build_optimizer, build_scheduler
from .strategy import Phase, apply_phase, phase_at, plan
from .tasks import SingleLabelTask, TaskModule

log = logging.getLogger("imgclf")

LAST_CKPT = "checkpoints/last.pt"
BEST_WEIGHTS = "checkpoints/best.safetensors"
MAX_NONFINITE = 5  # consecutive non-finite losses before giving up


@dataclass
class State:
    """Mutable loop state that a checkpoint captures."""

    epoch: int = 0  # epochs completed
    updates: int = 0
    phase_updates: int = 0  # updates since the current phase began (drives its schedule)
    best: float | None = None
    best_epoch: int = -1
    best_which: str = "model"
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Loop:
    """Everything a training step touches."""

    cfg: Config
    dist: Dist
    model: nn.Module  # the bare network
    task: SingleLabelTask  # what the outputs mean: loss, activation, decision
    wrapped: nn.Module  # TaskModule(model, task.criterion()), DDP-wrapped when distributed
    opt: torch.optim.Optimizer
    sched: Any
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler
    skips: SkipLog
    dtype: torch.dtype | None
    fmt: torch.memory_format
    phases: list[Phase]
    phase: Phase
    updates_per_epoch: int
    frozen: list[nn.Module]  # norm layers kept in eval mode in this phase
    mixup: Mixup | None


@dataclass
class Fitted:
    """What ``fit`` hands to the pipeline: the trained network (best weights loaded) and its context."""

    cfg: Config
    run_dir: Path
    model: nn.Module
    state: State
    splits: DataSplits
    preprocessing: dict[str, Any]
    weights_source: str
    dist: Dist
    skips: SkipLog
    seconds: float


def eval_loader(samples: Samples, pre: dict, cfg: Config, pin: bool = False) -> DataLoader:
    """An in-order loader with the eval transform."""
    bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    ds = ImageDataset(samples, eval_transform(pre))
    return make_loader(ds, bs, train=False, num_workers=cfg.data.num_workers, pin_memory=pin)


def train_loader(samples: Samples, pre: dict, cfg: Config, dist: Dist) -> DataLoader:
    """The shuffled, augmented loader; shuffling is a function of (seed, epoch) via ``set_epoch``."""
    probe = cfg.transfer.strategy == "probe"  # a probe sees the eval view: features as a cached probe would
    ds = ImageDataset(samples, eval_transform(pre) if probe else train_transform(pre, cfg.aug))
    return make_loader(
        ds, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        rank=dist.rank, world_size=dist.world_size, pin_memory=dist.device.type == "cuda",
        repeats=1 if probe else cfg.aug.repeats,
    )  # fmt: skip


def train_one_epoch(loop: Loop, loader: DataLoader, state: State, desc: str) -> dict[str, float]:
    """One pass over the training data; returns mean loss, images/s and the last learning rate."""
    cfg, dist = loop.cfg, loop.dist
    set_train_mode(loop)
    accum, pending, nonfinite = cfg.optim.accum_steps, 0, 0
    total_loss, seen, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not (cfg.run.progress and dist.is_main), leave=False, unit="batch")
    loop.opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        loop.skips.add(batch.skipped)
        # every item unreadable, or BatchNorm would see a single sample: skip (on every rank together)
        if any_rank(batch.images is None or len(batch.labels) < 2, dist):
            continue
        x = batch.images.to(dist.device, non_blocking=True).contiguous(memory_format=loop.fmt)
        y = batch.labels.to(dist.device, non_blocking=True)
        if loop.mixup is not None and loop.mixup.mixup_enabled:  # off for the last aug.mix_off_epochs
            if len(y) % 2:  # timm's batch mixing pairs images
                x, y = x[:-1], y[:-1]
            x, y = loop.mixup(x, y)  # y: (B, K) soft targets
        step_now = pending + 1 == accum or i + 1 == len(loader)
        sync = nullcontext() if step_now or not hasattr(loop.wrapped, "no_sync") else loop.wrapped.no_sync()
        with sync:
            with autocast(dist.device, loop.dtype):
                loss, _ = loop.wrapped(x, y)
            value = loss.item()
            if any_rank(not math.isfinite(value), dist):
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE:
                    raise ImgclfError(f"training diverged (loss {value}) in epoch {state.epoch + 1}; lower optim.lr")
                loop.opt.zero_grad(set_to_none=True)
                pending = 0
                continue
            nonfinite = 0
            loop.scaler.scale(loss / accum).backward()
        pending += 1
        if step_now:
            _update(loop, state)
            pending = 0
        total_loss += value * len(y)
        seen += len(y)
        rate = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(
            loss=f"{total_loss / seen:.4f}", lr=f"{loop.opt.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}"
        )
    if pending:
        _update(loop, state)  # the last group when trailing batches were skipped
    bar.close()
    secs = time.perf_counter() - t0
    return {
        "train_loss": total_loss / max(seen, 1),
        "lr": loop.opt.param_groups[0]["lr"],
        "img_per_s": seen * dist.world_size / max(secs, 1e-9),
        "epoch_seconds": secs,
    }


def set_train_mode(loop: Loop) -> None:
    """Training mode, except frozen BatchNorm layers; a head-only phase runs the whole backbone in eval mode
    (no dropout or stochastic depth on frozen features), exactly as a cached probe sees them."""
    loop.wrapped.train()
    if loop.phase.head_only:
        loop.model.eval()
    for m in loop.frozen:
        m.eval()


def _update(loop: Loop, state: State) -> None:
    """Optimizer step (with unscale + clip), schedule and EMA update."""
    if loop.cfg.optim.clip_grad is not None:
        loop.scaler.unscale_(loop.opt)
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), loop.cfg.optim.clip_grad)
    loop.scaler.step(loop.opt)
    loop.scaler.update()
    loop.opt.zero_grad(set_to_none=True)
    state.updates += 1
    state.phase_updates += 1
    loop.sched.step_update(state.phase_updates)
    if loop.ema is not None:
        loop.ema.update(loop.model, step=state.updates)


def score_of(metrics: dict[str, Any], metric: str) -> float:
    """Higher is better for every metric (loss is negated)."""
    return -metrics["loss"] if metric == "loss" else metrics[metric]


def validate(loop: Loop, loader: DataLoader, names: list[str]) -> dict[str, dict[str, Any]]:
    """Validation metrics of the raw model and (if enabled) its EMA."""
    nets = {"model": loop.model} | ({"ema": loop.ema.module} if loop.ema is not None else {})
    out = {}
    for which, net in nets.items():
        o = infer(net, loader, loop.dist.device, skips=loop.skips, amp_dtype=loop.dtype,
                  channels_last=loop.fmt == torch.channels_last)  # fmt: skip
        if len(o.labels) == 0:
            raise ImgclfError("no validation image could be read; see the skipped files")
        out[which] = compute_metrics(o.logits, o.labels, names, loss=loop.task.eval_criterion())
    return out


def run_dir_for(cfg: Config, resume: bool, dist: Dist) -> Path:
    """The run directory: the named one to resume, a new named one (never overwritten), or a fresh timestamped one."""
    out = Path(cfg.run.output)
    if resume:
        if not cfg.run.name:
            raise ImgclfError("resume needs run.name (the run directory under run.output)")
        d = out / cfg.run.name
        if not (d / LAST_CKPT).is_file():
            if not never_started(d):
                raise ImgclfError(f"--resume: {d} has no checkpoint ({LAST_CKPT}) to resume from")
            log.info("%s never completed an epoch: starting it afresh", d)
        return d
    if cfg.run.name:
        d = out / cfg.run.name
        if dist.is_main and d.exists() and any(d.iterdir()) and not never_started(d):
            raise ImgclfError(f"run directory {d} already exists; add --resume to continue it or pick another --name")
        return d
    stem = f"{cfg.model.name.replace('/', '_').replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    d, n = out / stem, 2
    while d.exists():
        d, n = out / f"{stem}-{n}", n + 1
    return Path(broadcast(str(d), dist))  # every rank uses rank 0's choice


#: what a run writes before its first epoch ends (a run stopped then, e.g. by --strict-images, is reusable)
_EARLY_FILES = {"config.yaml", "metrics.jsonl", "metrics.csv", "tensorboard", "checkpoints", LOCK_FILE}


def never_started(d: Path) -> bool:
    """``d`` exists and holds only what a run writes before completing its first epoch (no checkpoint, no
    metrics row, no artifact, nothing of the user's): reusing its name loses nothing."""
    if not d.is_dir():
        return False
    if not {p.name for p in d.iterdir()} <= _EARLY_FILES or any((d / "checkpoints").glob("*")) or run_is_live(d):
        return False
    rows = d / "metrics.jsonl"  # metrics.csv is written with it
    return not rows.exists() or rows.stat().st_size == 0


def build_loop(cfg: Config, dist: Dist, model: nn.Module, updates_per_epoch: int, num_classes: int) -> Loop:
    """EMA, scaler, MixUp and the first phase's task, optimizer and schedule around ``model``."""
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=fmt)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    dtype = amp_dtype(cfg.train.amp, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    mixup = None
    if cfg.aug.mixing and cfg.transfer.strategy != "probe":
        mixup = Mixup(
            mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mix_prob,
            switch_prob=cfg.aug.mix_switch_prob, label_smoothing=cfg.train.label_smoothing, num_classes=num_classes,
        )  # fmt: skip
    phases = plan(cfg)
    task, skips = SingleLabelTask.from_config(cfg.train), SkipLog(strict=cfg.data.strict_images)
    task.check(num_classes)
    loop = Loop(cfg, dist, model, task, model, None, None, ema, scaler, skips, dtype, fmt, phases, phases[0],
                updates_per_epoch, [], mixup)  # fmt: skip
    enter_phase(loop, phases[0])
    return loop


def enter_phase(loop: Loop, phase: Phase) -> None:
    """Freeze per ``phase`` and build its task (DDP-wrapped when distributed), optimizer and schedule."""
    cfg, dist = loop.cfg, loop.dist
    groups, loop.frozen = apply_phase(loop.model, phase, cfg.optim.weight_decay)
    if not groups:
        raise ImgclfError(f"phase '{phase.name}' has nothing to train (check transfer.freeze_stages)")
    loop.wrapped = None  # drop the previous phase's DDP wrapper (and its gradient hooks) before wrapping again
    wrapped: nn.Module = TaskModule(loop.model, loop.task.criterion())
    if dist.world_size > 1:  # re-wrapped per phase: DDP only syncs parameters that trained at wrap time
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
    loop.wrapped, loop.phase = wrapped, phase
    loop.opt = build_optimizer(loop.model, cfg.optim, groups)
    loop.sched = build_scheduler(loop.opt, cfg.sched, loop.updates_per_epoch, phase.epochs)
    loop.sched.step_update(0)


def fit(cfg: Config, resume: bool = False) -> Fitted:
    """Train per ``cfg`` (or continue the run named by ``cfg.run.name``); see the module docstring."""
    t_start = time.perf_counter()
    dist = setup(cfg.train.device)
    run_dir = run_dir_for(cfg, resume, dist)
    resume = resume and (run_dir / LAST_CKPT).is_file()  # a run that never completed an epoch starts afresh
    timm.utils.random_seed(cfg.train.seed, dist.rank)  # torch, numpy and python (timm's crops use random)
    splits = prepare_data(cfg)
    model, wsrc = create_model(model_config(cfg), len(splits.class_names))
    pre = resolve_preprocessing(model, cfg.data)
    tl, vl = train_loader(splits.train, pre, cfg, dist), eval_loader(splits.val, pre, cfg, dist.device.type == "cuda")
    loop = build_loop(cfg, dist, model, math.ceil(len(tl) / cfg.optim.accum_steps), len(splits.class_names))
    state = State()
    if resume:
        _restore(run_dir, loop, state)
    logger = RunLogger(run_dir, enabled=dist.is_main)
    logger.save_config(cfg)
    log.info(
        "run %s | %s (%s) | %d classes | train %d, val %d%s | %s",
        run_dir, cfg.model.name, wsrc, len(splits.class_names), len(splits.train), len(splits.val),
        f", test {len(splits.test)}" if splits.test is not None else "", dist.device,
    )  # fmt: skip
    _epochs(loop, state, run_dir, tl, vl, splits.class_names, logger)
    logger.close()
    barrier(dist)
    from safetensors.torch import load_file

    loop.model.load_state_dict(load_file(str(run_dir / BEST_WEIGHTS), device=str(dist.device)))
    return Fitted(cfg, run_dir, loop.model, state, splits, pre, wsrc, dist, loop.skips, time.perf_counter() - t_start)


def model_config(cfg: Config):
    """``cfg.model``, with random init for the scratch strategy (which refuses explicit pretrained weights)."""
    if cfg.transfer.strategy != "scratch":
        return cfg.model
    if cfg.model.weights not in ("auto", "none"):
        raise ImgclfError(f"transfer.strategy scratch trains from random init; drop model.weights={cfg.model.weights}")
    return dataclasses.replace(cfg.model, weights="none")


def _stopped(cfg: Config, state: State) -> bool:
    return cfg.train.patience is not None and state.stale >= cfg.train.patience


def _epochs(loop: Loop, state: State, run_dir: Path, tl: DataLoader, vl: DataLoader, names, logger) -> None:
    """Epoch loop: train, validate, keep the best, checkpoint, stop early."""
    cfg, dist, ema = loop.cfg, loop.dist, loop.ema
    while state.epoch < cfg.train.epochs and not _stopped(cfg, state):
        e = state.epoch + 1
        phase = phase_at(loop.phases, state.epoch)
        if phase != loop.phase:
            enter_phase(loop, phase)
            state.phase_updates = 0
            log.info("phase '%s' (epochs %d-%d)", phase.name, phase.start + 1, phase.end)
        if loop.mixup is not None:
            loop.mixup.mixup_enabled = e <= cfg.train.epochs - cfg.aug.mix_off_epochs
        set_epoch(tl, cfg.train.seed, e)
        stats = train_one_epoch(loop, tl, state, f"epoch {e}/{cfg.train.epochs} {phase.name}")
        val = validate(loop, vl, names)
        which = max(val, key=lambda k: score_of(val[k], cfg.train.metric))
        score = score_of(val[which], cfg.train.metric)
        improved = state.best is None or score > state.best
        if improved:
            state.best, state.best_epoch, state.best_which, state.stale = score, e, which, 0
            if dist.is_main:
                save_safetensors(run_dir / BEST_WEIGHTS, (loop.model if which == "model" else ema.module).state_dict())
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
            _save(run_dir, loop, state)
        log.info(_epoch_line(row, cfg, ema is not None))
        if _stopped(cfg, state):
            log.info("early stop: no better %s for %d epochs", cfg.train.metric, state.stale)


def _epoch_line(row: dict, cfg: Config, has_ema: bool) -> str:
    ema = f" (ema {100 * row['ema_val_top1']:.2f} %)" if has_ema else ""
    star = " *" if row["best"] else ""
    return (
        f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
        f"val top1 {100 * row['val_top1']:.2f} %{ema}  lr {row['lr']:.2e}  "
        f"{row['img_per_s']:.0f} img/s  {row['epoch_seconds']:.0f}s{star}"
    )


def _save(run_dir: Path, loop: Loop, state: State) -> None:
    save_checkpoint(
        run_dir / LAST_CKPT,
        {
            "model": loop.model.state_dict(),
            "optimizer": loop.opt.state_dict(),
            "scheduler": loop.sched.state_dict(),
            "ema": loop.ema.module.state_dict() if loop.ema is not None else {},
            "scaler": loop.scaler.state_dict(),
            "phase": loop.phase.name,
            "state": {k: v for k, v in vars(state).items() if k != "history"},
            "history": state.history,
            "rng": rng_state(),
        },
    )


def _restore(run_dir: Path, loop: Loop, state: State) -> None:
    ck = load_checkpoint(run_dir / LAST_CKPT)
    try:
        loop.model.load_state_dict(ck["model"])
        for k, v in ck["state"].items():
            setattr(state, k, v)
        phase = phase_at(loop.phases, min(state.epoch, loop.cfg.train.epochs - 1))
        if phase != loop.phase:
            enter_phase(loop, phase)
        if ck.get("phase") == phase.name:  # else the checkpoint closed the previous phase: start this one fresh
            loop.opt.load_state_dict(ck["optimizer"])
            loop.sched.load_state_dict(ck["scheduler"])
        else:
            state.phase_updates = 0
        if loop.ema is not None and ck["ema"]:
            loop.ema.module.load_state_dict(ck["ema"])
        if ck["scaler"]:
            loop.scaler.load_state_dict(ck["scaler"])
        state.history = list(ck["history"])
        set_rng_state(ck["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ImgclfError(f"{run_dir / LAST_CKPT} does not match this run's config ({first})") from None
    log.info("resumed %s after epoch %d", run_dir, state.epoch)
