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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from ..config import Config
from ..data.cache import large_image_samples
from ..data.loader import ImageDataset, SkipLog, make_loader, set_epoch
from ..data.preprocess import Preprocess
from ..data.sources import Samples
from ..data.splits import DataSplits
from ..dist import Dist, amp_dtype, barrier, compile_module
from ..errors import ImgclfError
from ..io import save_safetensors
from ..models.factory import create_model
from ..models.guards import guard_channels_last
from ..models.inference import infer
from ..rundir import BEST_WEIGHTS, LAST_CKPT
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logger import RunLogger
from .loop import (
    EpochHooks,
    Loop,
    State,
    prepare_run,
    run_epochs,
    train_one_epoch,
)  # fmt: skip
from .optim import build_optimizer, build_scheduler
from .strategy import Phase, apply_phase, phase_at, plan
from .tasks import SingleLabelTask, Task, TaskModule

log = logging.getLogger("imgclf")


@dataclass
class Fitted:
    """What ``fit`` hands to the pipeline: the trained network (best weights loaded) and its context."""

    cfg: Config
    run_dir: Path
    model: nn.Module
    state: State
    splits: DataSplits
    task: Task
    preprocessing: Preprocess
    weights_source: str
    dist: Dist
    skips: SkipLog
    seconds: float


def eval_loader(samples: Samples, pre: Preprocess, cfg: Config, pin: bool = False) -> DataLoader:
    """An in-order loader with the eval transform."""
    bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    ds = ImageDataset(large_image_samples(samples, pre, cfg.data), pre.eval())
    return make_loader(ds, bs, train=False, num_workers=cfg.data.num_workers, pin_memory=pin)


def train_loader(samples: Samples, pre: Preprocess, cfg: Config, dist: Dist) -> DataLoader:
    """The shuffled, augmented loader; shuffling is a function of (seed, epoch) via ``set_epoch``."""
    probe = cfg.transfer.strategy == "probe"  # a probe sees the eval view: features as a cached probe would
    ds = ImageDataset(large_image_samples(samples, pre, cfg.data, None if probe else cfg.aug),
                      pre.eval() if probe else pre.train(cfg.aug))  # fmt: skip
    sampler = None
    if cfg.data.sampler != "instance":
        from ..data.samplers import ClassBalancedSampler, oversampled_classes

        sampler = ClassBalancedSampler(samples.labels, cfg.data.sampler, seed=cfg.train.seed, epochs=cfg.train.epochs,
                                       num_replicas=dist.world_size, rank=dist.rank)  # fmt: skip
        if cfg.aug.oversampled and not probe:
            ds.strong = pre.train(dataclasses.replace(cfg.aug, auto_augment=cfg.aug.oversampled))
            ds.strong_classes = oversampled_classes(samples.labels, cfg.data.sampler)
    return make_loader(
        ds, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        rank=dist.rank, world_size=dist.world_size, pin_memory=dist.device.type == "cuda",
        repeats=1 if probe else cfg.aug.repeats, sampler=sampler,
    )  # fmt: skip


def validate(loop: Loop, loader: DataLoader, names: list[str]) -> dict[str, dict[str, Any]]:
    """Validation metrics of the raw model and (if enabled) its EMA."""
    nets = {"model": loop.model} | ({"ema": loop.ema.module} if loop.ema is not None else {})
    out = {}
    for which, net in nets.items():
        o = infer(net, loader, loop.dist.device, skips=loop.skips, amp_dtype=loop.dtype,
                  channels_last=loop.fmt == torch.channels_last)  # fmt: skip
        if len(o.labels) == 0:
            raise ImgclfError("no validation image could be read; see the skipped files")
        out[which] = loop.task.metrics(o.logits, o.labels, names, loss=loop.task.eval_criterion())
    return out


def build_loop(
    cfg: Config, dist: Dist, model: nn.Module, updates_per_epoch: int, num_classes: int, task: Task | None = None
) -> Loop:
    """EMA, scaler, MixUp and the first phase's task module, optimizer and schedule around ``model``; ``task``
    defaults to the single-label task of ``cfg.train``."""
    task = task or SingleLabelTask.from_config(cfg.train)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=fmt)
    if fmt == torch.channels_last:
        guard_channels_last(model, dist.device)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    dtype = amp_dtype(cfg.train.amp, dist.device, model)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    mixup = None
    if cfg.aug.mixing and cfg.transfer.strategy != "probe":
        # multi-label: timm mixes the multi-hot targets; the task's loss applies the label smoothing
        mixup = Mixup(
            mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mix_prob,
            switch_prob=cfg.aug.mix_switch_prob, label_smoothing=0.0 if task.multi_label else task.label_smoothing,
            num_classes=num_classes, multi_label=task.multi_label,
        )  # fmt: skip
    phases = plan(cfg)
    skips = SkipLog(strict=cfg.data.strict_images)
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
    wrapped: nn.Module = TaskModule(loop.model, loop.task.criterion().to(dist.device))  # loss buffers: pos_weight
    if cfg.train.compile:  # the training forward and loss; validation and the EMA run the plain model
        compile_module(wrapped, dist.device)
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
    run = prepare_run(cfg, resume)
    dist, run_dir, resume, splits = run.dist, run.run_dir, run.resume, run.splits
    model, wsrc = create_model(model_config(cfg), len(splits.class_names), cfg.data.input_size)
    pre = Preprocess.from_model(model, cfg.data)
    tl, vl = train_loader(splits.train, pre, cfg, dist), eval_loader(splits.val, pre, cfg, dist.device.type == "cuda")
    loop = build_loop(cfg, dist, model, math.ceil(len(tl) / cfg.optim.accum_steps), len(splits.class_names), run.task)
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
    return Fitted(cfg, run_dir, loop.model, state, splits, run.task, pre, wsrc, dist, loop.skips,
                  time.perf_counter() - t_start)  # fmt: skip


def model_config(cfg: Config):
    """``cfg.model``, with random init for the scratch strategy (which refuses explicit pretrained weights)."""
    if cfg.transfer.strategy != "scratch":
        return cfg.model
    if cfg.model.weights not in ("auto", "none"):
        raise ImgclfError(f"transfer.strategy scratch trains from random init; drop model.weights={cfg.model.weights}")
    return dataclasses.replace(cfg.model, weights="none")


def _epochs(loop: Loop, state: State, run_dir: Path, tl: DataLoader, vl: DataLoader, names, logger) -> None:
    """The shared epoch loop (``loop.run_epochs``) with full training's hooks: strategy phases, MixUp
    switch-off, per-epoch loader seeding, raw + EMA validation, best weights of either."""
    cfg, dist, ema = loop.cfg, loop.dist, loop.ema

    def before_epoch(e: int) -> None:
        phase = phase_at(loop.phases, e - 1)
        if phase != loop.phase:
            enter_phase(loop, phase)
            state.phase_updates = 0
            log.info("phase '%s' (epochs %d-%d)", phase.name, phase.start + 1, phase.end)
        if loop.mixup is not None:
            loop.mixup.mixup_enabled = e <= cfg.train.epochs - cfg.aug.mix_off_epochs
        set_epoch(tl, cfg.train.seed, e)

    def keep_best(which: str) -> None:
        save_safetensors(run_dir / BEST_WEIGHTS, (loop.model if which == "model" else ema.module).state_dict())

    hooks = EpochHooks(
        train=lambda e: train_one_epoch(loop, tl, state, f"epoch {e}/{cfg.train.epochs} {loop.phase.name}"),
        validate=lambda: validate(loop, vl, names), keep_best=keep_best, checkpoint=lambda: _save(run_dir, loop, state),
        line=lambda row: _epoch_line(row, cfg, ema is not None, loop.task), before_epoch=before_epoch,
    )  # fmt: skip
    run_epochs(cfg, state, hooks, logger, loop.task, dist.is_main)


def _epoch_line(row: dict, cfg: Config, has_ema: bool, task: Task) -> str:
    m = task.history_metrics[1]  # the task's headline metric: top1, or map for multi-label
    ema = f" (ema {100 * row[f'ema_val_{m}']:.2f} %)" if has_ema else ""
    star = " *" if row["best"] else ""
    return (
        f"epoch {row['epoch']}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
        f"val {m} {100 * row[f'val_{m}']:.2f} %{ema}  lr {row['lr']:.2e}  "
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
