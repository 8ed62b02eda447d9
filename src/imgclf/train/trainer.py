"""The training loop: a plain function per step of the recipe, read top to bottom.

``fit(cfg)`` prepares data and model, trains epoch by epoch through the strategy's phases
(``imgclf.train.strategy``: what trains at which learning rate), with AMP, accumulation, clipping,
MixUp/CutMix, EMA and a per-update LR schedule; validates the raw and EMA weights, keeps the best
by the chosen metric (``checkpoints/best.safetensors``), stops early and checkpoints atomically for
exact resume. What happens after training (test evaluation, the artifact) lives in ``imgclf.pipeline``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.utils
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from ..config import Config
from ..data import fastpath
from ..data.cache import large_image_samples
from ..data.loader import ImageDataset, SkipLog, make_loader, set_epoch
from ..data.preprocess import Preprocess
from ..data.sources import Samples
from ..data.splits import DataSplits
from ..dist import Dist, amp_dtype, barrier, broadcast_module, compile_module
from ..errors import ImgclfError
from ..io import save_safetensors
from ..models.factory import create_model
from ..models.guards import guard_channels_last
from ..models.inference import infer
from ..rundir import BEST_WEIGHTS, LAST_CKPT
from . import fsdp
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distill import Distiller, DistillModule, load_teachers
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
    teachers: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # ``Distiller.identities``


def eval_loader(samples: Samples, pre: Preprocess, cfg: Config, pin: bool = False) -> DataLoader:
    """An in-order loader with the eval transform."""
    bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    ds = ImageDataset(large_image_samples(samples, pre, cfg.data), pre.eval())
    return make_loader(ds, bs, train=False, num_workers=cfg.data.num_workers, pin_memory=pin)


def train_loader(samples: Samples, pre: Preprocess, cfg: Config, dist: Dist) -> DataLoader | fastpath.DeviceBatches:
    """The shuffled, augmented training batches: the fast path's when it applies (``data.fastpath.plan``, logged),
    else the PIL loader; order and augmentation are a function of (seed, epoch) via ``set_epoch``."""
    probe = cfg.transfer.strategy == "probe"  # a probe sees the eval view: features as a cached probe would
    sampler = None
    if cfg.data.sampler != "instance":
        from ..data.samplers import ClassBalancedSampler

        sampler = ClassBalancedSampler(samples.labels, cfg.data.sampler, seed=cfg.train.seed, epochs=cfg.train.epochs,
                                       num_replicas=dist.world_size, rank=dist.rank)  # fmt: skip
    if not probe:
        fast = fast_batches(samples, pre, cfg, dist, sampler)
        if fast is not None:
            return fast
    ds = ImageDataset(large_image_samples(samples, pre, cfg.data, None if probe else cfg.aug),
                      pre.eval() if probe else pre.train(cfg.aug))  # fmt: skip
    if sampler is not None and cfg.aug.oversampled and not probe:
        from ..data.samplers import oversampled_classes

        ds.strong = pre.train(dataclasses.replace(cfg.aug, auto_augment=cfg.aug.oversampled))
        ds.strong_classes = oversampled_classes(samples.labels, cfg.data.sampler)
    return make_loader(
        ds, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        rank=dist.rank, world_size=dist.world_size, pin_memory=dist.device.type == "cuda",
        repeats=1 if probe else cfg.aug.repeats, sampler=sampler,
    )  # fmt: skip


def fast_batches(
    samples: Samples, pre: Preprocess, cfg: Config, dist: Dist, sampler: Any
) -> fastpath.DeviceBatches | None:
    """The fast data path's batches (decoded split on the device, batched augmentation) when ``data.fast_path``
    and the data allow it, else None; one log line says which path and why (``data.fastpath``)."""
    from .probe import cache_dir

    choice = fastpath.plan(samples, pre, cfg.aug, cfg.data.fast_path, cfg.data.fast_path_budget)
    if dist.is_main:
        log.info(choice.reason)
    if not choice.use:
        return None
    return fastpath.device_batches(samples, pre, cfg.aug, choice, batch_size=cfg.data.batch_size, device=dist.device,
                                   seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size,
                                   repeats=cfg.aug.repeats, sampler=sampler, cache=cache_dir(cfg))  # fmt: skip


def validate(loop: Loop, loader: DataLoader, names: list[str], model: nn.Module | None = None) -> dict[str, Any]:
    """Validation metrics of the raw model (``model``: the network to run instead, the FSDP replica) and (if
    enabled) its EMA."""
    nets = {"model": model if model is not None else loop.model}
    if loop.ema is not None:
        nets["ema"] = loop.ema.module
    out = {}
    for which, net in nets.items():
        o = infer(net, loader, loop.dist.device, skips=loop.skips, amp_dtype=loop.dtype,
                  channels_last=loop.fmt == torch.channels_last)  # fmt: skip
        if len(o.labels) == 0:
            raise ImgclfError("no validation image could be read; see the skipped files")
        out[which] = loop.task.metrics(o.logits, o.labels, names, loss=loop.task.eval_criterion())
    return out


def build_loop(
    cfg: Config,
    dist: Dist,
    model: nn.Module,
    updates_per_epoch: int,
    num_classes: int,
    task: Task | None = None,
    distiller: Distiller | None = None,
) -> Loop:
    """EMA, scaler, MixUp and the first phase's task module, optimizer and schedule around ``model``; ``task``
    defaults to the single-label task of ``cfg.train``; ``distiller`` (``distill.load_teachers``) adds the
    teachers' terms to the loss."""
    task = task or SingleLabelTask.from_config(cfg.train)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    if fmt == torch.channels_last and fsdp.check(cfg, dist):
        fmt = torch.contiguous_format  # FSDP2 shards contiguous parameters only
        log.info("train.fsdp: channels_last off (FSDP2 shards contiguous parameters only)")
    if cfg.train.sync_bn and dist.world_size > 1:
        if dist.device.type != "cuda":
            raise ImgclfError("train.sync_bn: torch's SyncBatchNorm runs on CUDA only; drop --train.sync_bn on CPU")
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # timm's: also its fused BatchNormAct layers
    model = model.to(dist.device, memory_format=fmt)
    if fmt == torch.channels_last:
        guard_channels_last(model, dist.device)
    replica = _fsdp_shard(cfg, dist, model)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    if distiller is not None:
        if replica is not None:
            raise ImgclfError("train.fsdp with --teacher is not supported yet: distil with DDP (drop --train.fsdp)")
        distiller.to(dist.device, fmt).tap(model)  # hooks after the EMA's copy, so the copy has none
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
                updates_per_epoch, [], mixup, replica=replica, distiller=distiller)  # fmt: skip
    enter_phase(loop, phases[0])
    return loop


def _fsdp_shard(cfg: Config, dist: Dist, model: nn.Module) -> nn.Module | None:
    """``train.fsdp``: shard ``model`` in place (``train.fsdp``) and return a full replica of it for validation,
    checkpoints and everything after training; None without FSDP."""
    if not fsdp.check(cfg, dist):
        if cfg.train.fsdp:
            log.info("train.fsdp: one process, nothing to shard (launch with torchrun)")
        return None
    if len(plan(cfg)) > 1:
        raise ImgclfError("train.fsdp trains every parameter in one phase: set --transfer.head_epochs 0")
    broadcast_module(model, dist)  # every rank initialised with its own seed: rank 0's weights (DDP does this itself)
    replica = copy.deepcopy(model)  # before sharding: plain tensors
    units = fsdp.shard(model)
    log.info("FSDP2: %d units sharded over %d ranks", units, dist.world_size)
    return replica


def _net(loop: Loop) -> nn.Module:
    """The full network: ``loop.model``, or the FSDP replica."""
    return loop.replica if loop.replica is not None else loop.model


def _sync_replica(loop: Loop) -> nn.Module:
    """The network that validates and is saved: ``loop.model`` (rank 0's parameters and buffers under DDP), or under
    FSDP the full replica loaded with the gathered weights (a collective)."""
    if loop.replica is None:
        broadcast_module(loop.model, loop.dist)  # BatchNorm statistics and the EMA drift apart per rank: rank 0's
        if loop.ema is not None:
            broadcast_module(loop.ema.module, loop.dist)
        return loop.model
    loop.replica.load_state_dict(fsdp.full_state(loop.model))
    broadcast_module(loop.replica, loop.dist)  # buffers (BatchNorm statistics) are per rank under FSDP too
    return loop.replica


def enter_phase(loop: Loop, phase: Phase) -> None:
    """Freeze per ``phase`` and build its task (DDP-wrapped when distributed), optimizer and schedule."""
    cfg, dist = loop.cfg, loop.dist
    groups, loop.frozen = apply_phase(loop.model, phase, cfg.optim.weight_decay)
    if not groups:
        raise ImgclfError(f"phase '{phase.name}' has nothing to train (check transfer.freeze_stages)")
    loop.wrapped = None  # drop the previous phase's DDP wrapper (and its gradient hooks) before wrapping again
    criterion = loop.task.criterion().to(dist.device)  # loss buffers: pos_weight
    d = loop.distiller
    wrapped: nn.Module = TaskModule(loop.model, criterion) if d is None else DistillModule(loop.model, criterion, d)
    if cfg.train.compile:  # the training forward and loss; validation and the EMA run the plain model
        compile_module(wrapped, dist.device)
    if dist.world_size > 1 and loop.replica is None:  # re-wrapped per phase: DDP syncs what trained at wrap time
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
    loop.wrapped, loop.phase = wrapped, phase
    if d is not None and d.projector is not None:  # trains with the student in every phase
        groups = [*groups, {"params": list(d.projector.parameters()), "weight_decay": cfg.optim.weight_decay}]
    loop.opt = build_optimizer(loop.model, cfg.optim, groups)
    loop.sched = build_scheduler(loop.opt, cfg.sched, loop.updates_per_epoch, phase.epochs)
    loop.sched.step_update(0)


def fit(cfg: Config, resume: bool = False) -> Fitted:
    """Train per ``cfg`` (or continue the run named by ``cfg.run.name``); see the module docstring."""
    t_start = time.perf_counter()
    run = prepare_run(cfg, resume)
    cfg, dist, run_dir, resume, splits = run.cfg, run.dist, run.run_dir, run.resume, run.splits  # cfg: sizes resolved
    model, wsrc = create_model(model_config(cfg), len(splits.class_names), cfg.data.input_size, splits.class_names)
    pre = Preprocess.from_model(model, cfg.data)
    distiller = load_teachers(cfg.distill, model, pre, splits.class_names, run.task.multi_label, cfg.transfer.strategy,
                              len(splits.train))  # fmt: skip
    tl, vl = train_loader(splits.train, pre, cfg, dist), eval_loader(splits.val, pre, cfg, dist.device.type == "cuda")
    loop = build_loop(cfg, dist, model, math.ceil(len(tl) / cfg.optim.accum_steps), len(splits.class_names), run.task,
                      distiller)  # fmt: skip
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

    net = _net(loop)  # FSDP: the full replica carries the best weights on
    net.load_state_dict(load_file(str(run_dir / BEST_WEIGHTS), device=str(dist.device)))
    if distiller is not None:
        distiller.untap()  # the trained network leaves without hooks
    return Fitted(cfg, run_dir, net, state, splits, run.task, pre, wsrc, dist, loop.skips,
                  time.perf_counter() - t_start, distiller.identities if distiller is not None else [])  # fmt: skip


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
        if dist.is_main:
            net = _net(loop)  # the FSDP replica holds the weights validated this epoch
            save_safetensors(run_dir / BEST_WEIGHTS, (net if which == "model" else ema.module).state_dict())

    def validate_replicas() -> dict[str, dict[str, Any]]:
        return validate(loop, vl, names, _sync_replica(loop))

    hooks = EpochHooks(
        train=lambda e: train_one_epoch(loop, tl, state, f"epoch {e}/{cfg.train.epochs} {loop.phase.name}"),
        validate=validate_replicas, keep_best=keep_best, checkpoint=lambda: _save(run_dir, loop, state),
        line=lambda row: _epoch_line(row, cfg, ema is not None, loop.task), before_epoch=before_epoch,
    )  # fmt: skip
    run_epochs(cfg, state, hooks, logger, loop.task)


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
    """The resume checkpoint (every rank calls it: FSDP gathers the optimizer state; rank 0 writes)."""
    opt = loop.opt.state_dict() if loop.replica is None else fsdp.full_optimizer_state(loop.model, loop.opt)
    if not loop.dist.is_main:
        return
    save_checkpoint(
        run_dir / LAST_CKPT,
        {
            "model": _net(loop).state_dict(),
            "optimizer": opt,
            "scheduler": loop.sched.state_dict(),
            "ema": loop.ema.module.state_dict() if loop.ema is not None else {},
            "scaler": loop.scaler.state_dict(),
            "projector": _projector(loop).state_dict() if _projector(loop) is not None else {},
            "phase": loop.phase.name,
            "world_size": loop.dist.world_size,
            "updates_per_epoch": loop.updates_per_epoch,
            "state": {k: v for k, v in vars(state).items() if k != "history"},
            "history": state.history,
            "rng": rng_state(),
        },
    )


def _projector(loop: Loop) -> nn.Module | None:
    """The feature-distillation projector (trained with the student, checkpointed for resume), or None."""
    return loop.distiller.projector if loop.distiller is not None else None


def _restore(run_dir: Path, loop: Loop, state: State) -> None:
    ck = load_checkpoint(run_dir / LAST_CKPT)
    try:
        if loop.replica is None:
            loop.model.load_state_dict(ck["model"])
        for k, v in ck["state"].items():
            setattr(state, k, v)
        phase = phase_at(loop.phases, min(state.epoch, loop.cfg.train.epochs - 1))
        if phase != loop.phase:
            enter_phase(loop, phase)
        same_steps = ck.get("updates_per_epoch", loop.updates_per_epoch) == loop.updates_per_epoch
        if loop.replica is not None:  # FSDP: one phase; the full weights and optimizer state into the shards
            fsdp.load_full(loop.model, loop.opt, ck["model"], ck["optimizer"])
            loop.replica.load_state_dict(ck["model"])
        elif ck.get("phase") == phase.name:  # else the checkpoint closed the previous phase: start this one fresh
            loop.opt.load_state_dict(ck["optimizer"])
            if same_steps:
                loop.sched.load_state_dict(ck["scheduler"])
            else:  # another world size or batch size: this schedule's position after the completed epochs
                state.phase_updates = (state.epoch - phase.start) * loop.updates_per_epoch
                loop.sched.step_update(state.phase_updates)
        else:
            state.phase_updates = 0
        if loop.ema is not None and ck["ema"]:
            loop.ema.module.load_state_dict(ck["ema"])
        if ck["scaler"]:
            loop.scaler.load_state_dict(ck["scaler"])
        if _projector(loop) is not None and ck.get("projector"):
            _projector(loop).load_state_dict(ck["projector"])
        state.history = list(ck["history"])
        if ck.get("world_size", 1) == loop.dist.world_size and loop.dist.rank == 0:
            set_rng_state(ck["rng"])  # exact resume; other ranks (and another world size) keep their own seeds
        else:
            timm.utils.random_seed(loop.cfg.train.seed + 7919 * state.epoch, loop.dist.rank)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ImgclfError(f"{run_dir / LAST_CKPT} does not match this run's config ({first})") from None
    ws = ck.get("world_size", 1)
    log.info("resumed %s after epoch %d%s", run_dir, state.epoch,
             f" (saved by {ws} process{'es' if ws > 1 else ''}, now {loop.dist.world_size})"
             if ws != loop.dist.world_size else "")  # fmt: skip
