"""The one training loop: run set-up, the optimisation step, the epoch and the epoch sequence, shared by full
training (``trainer``), the cached-feature probe's SGD head (``probe``) and the LR range test (``lr_find``).

- ``prepare_run``: device/process group, run directory (new, named or resumed), seeding, data splits.
- ``forward_loss`` / ``update``: the task's loss under autocast; one optimizer update (unscale, clip, step,
  schedule per update, EMA), as torchvision's ``train_one_epoch(model, criterion, ...)`` and timm's task
  modules split it.
- ``train_one_epoch``: accumulation, DDP ``no_sync``, MixUp/CutMix, non-finite-gradient guard, progress bar; it
  takes any iterable of ``Batch`` (image loaders, or ``FeatureBatches`` of cached features for the probe).
- ``run_epochs``: train, validate, keep the best, patience, history rows, logging and checkpointing; each
  caller plugs in what differs (``EpochHooks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm.utils
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from ..config import Config
from ..data.loader import Batch, SkipLog
from ..data.sizing import auto_input_size, median_side
from ..data.sources import Samples
from ..data.splits import DataSplits, prepare_data
from ..dist import Dist, autocast, broadcast, setup
from ..errors import ImgclfError
from ..models.factory import default_input_size
from ..models.heads import FEATURE_STATS_MAX_DIM, head_spec, head_width
from ..models.weights import run_dir_weights, run_meta
from ..rundir import EARLY_FILES, LAST_CKPT, RunDir
from .logger import RunLogger, run_is_live
from .strategy import Phase
from .tasks import Task, check_trust, metric_of, task_for_config

log = logging.getLogger("imgclf")
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
    task: Task  # what the outputs mean: loss, activation, decision
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
    bad_updates: torch.Tensor | None = None  # consecutive updates skipped for non-finite gradients (on the device)
    replica: nn.Module | None = None  # train.fsdp: the full model that validates and is saved (``train.fsdp``)
    distiller: Any = None  # ``distill.Distiller`` when teachers teach (``--teacher``)


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


def never_started(d: Path) -> bool:
    """``d`` exists and holds only what a run writes before completing its first epoch (no checkpoint, no
    metrics row, no artifact, nothing of the user's): reusing its name loses nothing."""
    if not d.is_dir():
        return False
    if not {p.name for p in d.iterdir()} <= EARLY_FILES or any(RunDir(d).checkpoints.glob("*")) or run_is_live(d):
        return False
    rows = RunDir(d).metrics_jsonl  # metrics.csv is written with it
    return not rows.exists() or rows.stat().st_size == 0


def set_train_mode(loop: Loop) -> None:
    """Training mode, except frozen BatchNorm layers; a head-only phase runs the whole backbone in eval mode
    (no dropout or stochastic depth on frozen features), exactly as a cached probe sees them."""
    loop.wrapped.train()
    if loop.phase.head_only:
        loop.model.eval()
    for m in loop.frozen:
        m.eval()


def train_one_epoch(loop: Loop, loader: Any, state: State, desc: str) -> dict[str, float]:
    """One pass over ``loader`` (any sized iterable of ``Batch``); returns mean loss, images/s, the last LR.

    No collective beyond DDP's gradient all-reduce and one all-reduce of the loss sum at the end, and no host sync
    per step: the loss is summed on the device and read every ``REFRESH`` batches for the progress bar (and the
    divergence check, ``update``). Under torchrun a rank whose batch is unusable (every image unreadable, or one
    image left for BatchNorm) repeats its last good batch with zero weight, so the ranks stay in step."""
    cfg, dist = loop.cfg, loop.dist
    set_train_mode(loop)
    accum, pending, last = cfg.optim.accum_steps, 0, None
    total = torch.zeros(2, device=dist.device)  # sum of finite losses x images, images
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not (cfg.run.progress and dist.is_main), leave=False, unit="batch")
    loop.opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        loop.skips.add(batch.skipped)
        if batch.images is None or len(batch.labels) < 2:
            if dist.world_size == 1:
                continue
            if last is None:
                raise ImgclfError(f"rank {dist.rank}: no readable image in the first batch of epoch {state.epoch + 1}; "
                                  "see the skipped files (or drop them from the data)")  # fmt: skip
            x, y, weight = *last, 0.0
        else:
            x = batch.images.to(dist.device, non_blocking=True).contiguous(memory_format=loop.fmt)
            y = batch.labels.to(dist.device, non_blocking=True)
            if loop.mixup is not None and loop.mixup.mixup_enabled:  # off for the last aug.mix_off_epochs
                if len(y) % 2:  # timm's batch mixing pairs images
                    x, y = x[:-1], y[:-1]
                x, y = loop.mixup(x, y)  # y: (B, K) soft targets
            last, weight = (x, y), 1.0
        step_now = pending + 1 == accum or i + 1 == len(loader)
        sync = nullcontext() if step_now or not hasattr(loop.wrapped, "no_sync") else loop.wrapped.no_sync()
        with sync:
            loss = forward_loss(loop, x, y)
            loop.scaler.scale(loss * (weight / accum)).backward()
        if weight:
            finite = torch.isfinite(loss.detach())
            total += torch.stack([torch.where(finite, loss.detach(), 0.0) * len(y), finite * float(len(y))])
            seen += len(y)
        pending += 1
        if step_now:
            update(loop, state)
            pending = 0
        if (i + 1) % REFRESH == 0 or i + 1 == len(loader):
            _refresh(loop, bar, total, seen * dist.world_size / max(time.perf_counter() - t0, 1e-9), state)
    if pending:
        update(loop, state)  # the last group when trailing batches were skipped
    bar.close()
    _check_diverged(loop, state)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)  # the epoch's loss over every rank's images
    secs = time.perf_counter() - t0
    loss_sum, n = total.tolist()
    return {
        "train_loss": loss_sum / max(n, 1) if n else float("nan"),
        "lr": loop.opt.param_groups[0]["lr"],
        "img_per_s": seen * dist.world_size / max(secs, 1e-9),
        "epoch_seconds": secs,
    }


REFRESH = 20  # batches between reads of the device loss sum (progress bar, divergence check)


def _refresh(loop: Loop, bar, total: torch.Tensor, rate: float, state: State) -> None:
    """Progress-bar numbers and the divergence check: the one host sync every ``REFRESH`` batches."""
    _check_diverged(loop, state)
    if not bar.disable:
        loss_sum, n = total.tolist()
        bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", lr=f"{loop.opt.param_groups[0]['lr']:.2e}",
                        img_s=f"{rate:.0f}")  # fmt: skip


def _check_diverged(loop: Loop, state: State) -> None:
    if loop.bad_updates is not None and int(loop.bad_updates) >= MAX_NONFINITE:
        raise ImgclfError(f"training diverged: {MAX_NONFINITE} updates in a row with non-finite gradients in epoch "
                          f"{state.epoch + 1}; lower optim.lr (or add --optim.clip_grad 1.0)")  # fmt: skip


def update(loop: Loop, state: State) -> None:
    """Optimizer step (``optimizer_step``: unscale, clip, skip non-finite), schedule and EMA update."""
    params = [p for p in loop.model.parameters() if p.grad is not None]
    loop.bad_updates = optimizer_step(loop.opt, loop.scaler, params, loop.cfg.optim.clip_grad, loop.bad_updates)
    state.updates += 1
    state.phase_updates += 1
    loop.sched.step_update(state.phase_updates)
    if loop.ema is not None:
        loop.ema.update(loop.model, step=state.updates)


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                   clip_grad: float | None, bad: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
    """One optimizer step (with unscale + clip) over ``params`` (those with gradients); returns the count of
    consecutive skipped steps (on the device), ``bad`` carried on.

    A step whose gradients are not finite (a non-finite loss on any rank: DDP's all-reduce spreads it, so every
    rank decides alike without a collective) is skipped: on the device by the fused CUDA optimizers (``found_inf``,
    as ``GradScaler`` does), else after reading one flag (free on the CPU). ``MAX_NONFINITE`` such steps in a row
    end training (the callers check). fp16 runs leave this to ``GradScaler``."""
    if clip_grad is not None:
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    elif not scaler.is_enabled():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm := locals().get("norm"), "full_tensor"):  # FSDP: the norm over every rank's shards
        norm = norm.full_tensor()
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    else:
        flag = ~torch.isfinite(norm)
        bad = (0 if bad is None else bad + 1) * flag
        if opt.defaults.get("fused"):
            opt.found_inf = flag.float()
            opt.step()
            del opt.found_inf
        elif not flag.item():
            opt.step()
    opt.zero_grad(set_to_none=True)
    return bad


def score_of(metrics: dict[str, Any], metric: str) -> float:
    """Higher is better for every metric (loss is negated)."""
    return -metrics["loss"] if metric == "loss" else metrics[metric]


@dataclass
class Run:
    """What every training entry point starts from (``prepare_run``)."""

    cfg: Config
    dist: Dist
    run_dir: Path
    resume: bool  # a checkpoint exists and will be restored
    splits: DataSplits
    task: Task  # single- or multi-label, from the training data and ``cfg.train``


def prepare_run(cfg: Config, resume: bool = False, *, needs_dir: bool = True) -> Run:
    """Set up devices / the process group, choose the run directory (``needs_dir``; lr-find has none), seed
    torch, numpy and python per rank (timm's crops use ``random``), open the data splits and pick the task
    (multi-label when the training data hold label sets)."""
    dist = setup(cfg.train.device, cfg.train.dist_timeout)
    run_dir = run_dir_for(cfg, resume, dist) if needs_dir else Path(cfg.run.output)
    resume = needs_dir and resume and (run_dir / LAST_CKPT).is_file()  # never completed an epoch: afresh
    timm.utils.random_seed(cfg.train.seed, dist.rank)
    splits = prepare_data(cfg)
    cfg = with_input_size(adopt_run_weights(cfg), splits.train)
    task = task_for_config(cfg.train, splits.train)
    check_trust(cfg.trust, task)
    _check_sampler(cfg, task)
    _check_head(cfg, task)
    return Run(cfg, dist, run_dir, resume, splits, task)


def adopt_run_weights(cfg: Config) -> Config:
    """``cfg`` with what a run given as ``model.weights`` fixes (``--weights RUN``).

    A zero-shot run (``imgclf zeroshot``): its open_clip architecture (``model.name``) and its own input size (an
    open_clip tower is built for one size); ImgclfError for another ``data.input_size`` or the probe strategy (it
    fits a new linear head: fine-tune the zero-shot head instead). A trained or self-supervised run: its input
    size, crop and interpolation unless the data config sets them, so the network sees images as it learned them.
    """
    run = run_dir_weights(cfg.model.weights)
    if run is None:
        return cfg
    meta = run_meta(run)
    pre = meta["preprocessing"]
    size = int(max(pre["input_size"][1:]))
    if meta.get("kind") != "zeroshot":
        data = replace(cfg.data, input_size=size if cfg.data.input_size == "auto" else cfg.data.input_size,
                       crop_pct=cfg.data.crop_pct if cfg.data.crop_pct is not None else pre.get("crop_pct"),
                       interpolation=cfg.data.interpolation or pre.get("interpolation"))  # fmt: skip
        return replace(cfg, data=data)
    if cfg.data.input_size not in ("auto", None, size):
        raise ImgclfError(f"weights {run}: a zero-shot model takes its own input size {size}; drop --input-size")
    if cfg.transfer.strategy == "probe":
        raise ImgclfError(f"weights {run}: the probe strategy fits a new linear head; fine-tune from the zero-shot "
                          "head (--strategy finetune or staged) or use the zero-shot run as it is")  # fmt: skip
    if cfg.model.name != meta["arch"]:
        log.info("model: %s (the architecture of the zero-shot run %s)", meta["arch"], run)
    return replace(cfg, model=replace(cfg.model, name=meta["arch"]), data=replace(cfg.data, input_size=None))


def with_input_size(cfg: Config, train: Samples) -> Config:
    """``cfg`` with ``data.input_size auto`` resolved from the training images (``data.sizing``): a size near
    their native resolution (crop_pct 1.0 unless set) when they are much smaller than the model's default, else
    None (the model's default), logged. The run saves the resolved config, so resume, eval and export agree."""
    if cfg.data.input_size != "auto":
        return cfg
    default, fixed = default_input_size(cfg.model.name)
    auto = auto_input_size(median_side(train) if default else None, default, fixed, cfg.data.crop_pct)
    if auto.message:
        log.info(auto.message)
    return replace(cfg, data=replace(cfg.data, input_size=auto.size, crop_pct=auto.crop_pct))


def _check_head(cfg: Config, task: Task) -> None:
    """ImgclfError before training when the OOD score needs feature statistics (Mahalanobis, k-NN; the multi-label
    default is k-NN) and the pooling head's features are wider than they are fitted for."""
    width = head_width(head_spec(cfg.model)) or 0
    score = cfg.trust.ood_score if cfg.trust.ood_score != "auto" else ("knn" if task.multi_label else "energy")
    if cfg.trust.ood and score in ("mahalanobis", "knn") and width > FEATURE_STATS_MAX_DIM:
        raise ImgclfError(f"trust.ood_score {score} needs feature statistics, fitted for features of up to "
                          f"{FEATURE_STATS_MAX_DIM} values; model.head {cfg.model.head} gives {width}: lower "
                          "model.bilinear_dim / compact_dim, or a logit score (--trust.ood-score energy)")  # fmt: skip


def _check_sampler(cfg: Config, task: Task) -> None:
    """ImgclfError before training when ``data.sampler`` cannot apply: label sets, repeated augmentation (whose
    sampler it would replace), or the cached probe (whose head trains on cached feature batches)."""
    if cfg.data.sampler == "instance":
        if cfg.aug.oversampled:
            raise ImgclfError("aug.oversampled augments the classes a class-aware sampler repeats; set --data.sampler "
                              "sqrt, balanced or progressive (or drop aug.oversampled)")  # fmt: skip
        return
    if task.multi_label:
        raise ImgclfError("data.sampler balanced / sqrt / progressive needs one class per image (label sets: use "
                          "--train.pos_weight)")  # fmt: skip
    if cfg.aug.repeats > 1:
        raise ImgclfError("data.sampler and aug.repeats > 1 both choose the training order; use one of them")
    if cfg.transfer.strategy == "probe" and cfg.probe.cache:
        raise ImgclfError("data.sampler does not apply to the cached probe (its head trains on cached features); "
                          "pass --probe.cache false or a class-weighted loss (--train.class_weights)")  # fmt: skip


def forward_loss(loop: Loop, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task's training loss of one batch under the run's autocast (``loop.wrapped``: task module, DDP)."""
    with autocast(loop.dist.device, loop.dtype):
        loss, _ = loop.wrapped(x, y)
    return loss


class FeatureBatches:
    """Cached features as training batches for ``train_one_epoch``: a seeded permutation per epoch
    (``set_epoch``), full batches only (one batch of everything when there are fewer than ``batch_size``)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.features, self.labels, self.bs, self.seed, self.epoch = features, labels, batch_size, seed, 1
        n = len(labels)
        self.n_batches = n // batch_size if n > batch_size else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)
        for i in range(self.n_batches):
            idx = order[i * self.bs : (i + 1) * self.bs]
            yield Batch(self.features[idx], self.labels[idx], idx, [])


@dataclass
class EpochHooks:
    """What differs between the callers of ``run_epochs``."""

    train: Callable[[int], dict[str, float]]  # epoch -> train stats (train_loss, lr, img_per_s, epoch_seconds)
    validate: Callable[[], dict[str, dict[str, Any]]]  # -> {"model": metrics, ["ema": metrics]}
    keep_best: Callable[[str], None]  # save the best weights ("model" or "ema"); called on every rank, rank 0 writes
    checkpoint: Callable[[], None]  # the resume checkpoint; called on every rank (FSDP gathers), rank 0 writes
    line: Callable[[dict[str, Any]], str]  # the log line of an epoch row
    before_epoch: Callable[[int], None] = lambda epoch: None  # phase changes, MixUp switch-off, loader seeding


def stopped(cfg: Config, state: State) -> bool:
    return cfg.train.patience is not None and state.stale >= cfg.train.patience


def run_epochs(cfg: Config, state: State, hooks: EpochHooks, logger: RunLogger, task: Task) -> None:
    """Epochs ``state.epoch + 1 .. cfg.train.epochs``: train, validate (raw and EMA weights), keep the best by
    ``cfg.train.metric`` (resolved for ``task``), append a history row (``task.history_metrics``), log it,
    checkpoint, stop after ``cfg.train.patience`` epochs without improvement."""
    metric, keys = metric_of(task, cfg.train.metric), task.history_metrics
    while state.epoch < cfg.train.epochs and not stopped(cfg, state):
        e = state.epoch + 1
        hooks.before_epoch(e)
        stats = hooks.train(e)
        val = hooks.validate()
        which = max(val, key=lambda k: score_of(val[k], metric))
        score = score_of(val[which], metric)
        improved = state.best is None or score > state.best
        if improved:
            state.best, state.best_epoch, state.best_which, state.stale = score, e, which, 0
            hooks.keep_best(which)
        else:
            state.stale += 1
        row = {"epoch": e, **stats, **{f"val_{k}": val["model"][k] for k in keys}}
        if "ema" in val:
            row.update({f"ema_val_{k}": val["ema"][k] for k in keys})
        row["best"] = improved
        state.history.append(row)
        state.epoch = e
        logger.log_epoch(row)
        hooks.checkpoint()
        log.info(hooks.line(row))
        if stopped(cfg, state):
            log.info("early stop: no better %s for %d epochs", metric, state.stale)
