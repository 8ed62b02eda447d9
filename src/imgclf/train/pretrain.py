"""``imgclf pretrain``: self-supervised pretraining of any timm backbone on unlabelled images (``train.ssl``).

The images come from a folder (recursive; labels, if any, are ignored), a CSV, an .npz or ``builtin:NAME``. Each
epoch: the method's views (lightly transforms at the backbone's preprocessing), its loss, the optimizer and
schedule of the training config (``optim``, ``sched``), AMP (``train.amp``) and DDP under torchrun (NT-Xent
gathers the negatives of every rank). After each epoch, the monitor (rank 0):

- ``emb_spread``: the collapse check (``ssl.embedding_spread`` of the backbone's pooled embeddings of a fixed
  set of images; ~1 spread, 0 collapsed), warned about below ``ssl.collapse_std``;
- ``knn_top1``: with ``ssl.knn_data``, k-NN accuracy (cosine, ``ssl.knn_k`` neighbours, temperature 0.1) of one
  stratified half of the labelled images classified by the other half.

``checkpoints/last.pt`` after every epoch holds the method (backbone, heads, momentum encoders, DINO's centre),
optimizer, schedule, scaler, history and RNG states: ``--resume`` continues exactly. The result is a run of kind
``backbone``: ``model.safetensors`` is the backbone alone (timm keys, no head) and ``imgclf.json`` holds its
preprocessing, so ``imgclf train DATA --weights RUN`` (probe, finetune) and ``imgclf knn build --weights RUN``
start from it.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm.utils
import torch
import torch.nn as nn
from tqdm import tqdm

from ..artifact import Artifact, save_artifact
from ..config import Config, InferConfig, config_to_dict
from ..data.images import policy_from_config
from ..data.loader import ImageDataset, SkipLog, make_loader, set_epoch
from ..data.preprocess import Preprocess
from ..data.sources import open_source, open_unlabelled, stratified_split
from ..dist import Dist, amp_dtype, autocast, barrier, setup
from ..errors import ImgclfError
from ..models.embedding import embed_samples
from ..models.factory import architecture_of, create_model, size_kwargs
from ..models.knn import classify_embeddings
from ..rundir import LAST_CKPT
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logger import RunLogger
from .loop import MAX_NONFINITE, REFRESH, adopt_run_weights, optimizer_step, run_dir_for, with_input_size
from .optim import build_optimizer, build_scheduler
from .ssl import build_method, dino_vit_kwargs, embedding_spread, kept_backbone, view_transform

log = logging.getLogger("imgclf")
KIND = "backbone"  #: ``imgclf.json`` kind of a pretrained backbone
MONITOR_IMAGES = 1024  # images of the collapse check (the first ones of the data, fixed for the run)
KNN_TEMPERATURE = 0.1


@dataclass
class PretrainState:
    epoch: int = 0
    updates: int = 0
    seconds: float = 0.0  # wall time of the epochs so far, over every session (resume adds to it)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PretrainResult:
    """What ``pretrain`` returns: the run directory, its per-epoch history and the resources it took."""

    run_dir: Path
    method: str
    arch: str
    history: list[dict[str, Any]]
    seconds: float
    peak_rss_mb: float
    peak_worker_rss_mb: float
    skipped: dict[str, str]
    collapsed: bool


@dataclass
class _Job:
    cfg: Config
    dist: Dist
    run_dir: Path
    method: nn.Module
    wrapped: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    fmt: torch.memory_format
    pre: Preprocess
    loader: Any
    skips: SkipLog
    monitor: Any  # (samples of the collapse check, (support, query) samples of the k-NN monitor or None)
    bad: torch.Tensor | None = None  # consecutive updates with non-finite gradients (on the device)
    last: list[torch.Tensor] | None = None  # the last usable views (a rank with an unusable batch repeats them)


def pretrain(cfg: Config, resume: bool = False) -> PretrainResult:
    """Self-supervised pretraining per ``cfg`` (``cfg.ssl`` the method; ``data.path`` the images; ``model.name``
    the backbone, random init unless ``model.weights`` names others); see the module docstring.

    Raises:
        ImgclfError: no readable images, a method the backbone cannot take (MAE needs a ViT), a non-finite loss
            for ``MAX_NONFINITE`` updates in a row, an existing run name without ``--resume``.
    """
    job = _prepare(cfg, resume)
    state = PretrainState()
    if resume and (job.run_dir / LAST_CKPT).is_file():
        _restore(job, state)
    logger = RunLogger(job.run_dir, enabled=job.dist.is_main)
    logger.save_config(job.cfg)
    log.info("pretrain %s | %s %s | %d images | %s", job.run_dir, job.cfg.ssl.method, job.cfg.model.name,
             len(job.loader.dataset), job.dist.device)  # fmt: skip
    for epoch in range(state.epoch + 1, job.cfg.train.epochs + 1):
        t0 = time.perf_counter()
        set_epoch(job.loader, job.cfg.train.seed, epoch)
        row = {"epoch": epoch, **_train_epoch(job, state, epoch)}
        row.update(_monitor(job))  # every rank: the embedding shards over them under torchrun
        state.epoch, state.seconds = epoch, state.seconds + time.perf_counter() - t0
        state.history.append(row)
        logger.log_epoch(row)
        if job.dist.is_main:
            log.info(_line(row, job.cfg))
        _save(job, state)
    logger.close()
    barrier(job.dist)
    return _finish(job, state)


def _prepare(cfg: Config, resume: bool) -> _Job:
    """Devices, run directory, images, backbone, method, loader, optimizer and schedule."""
    dist = setup(cfg.train.device, cfg.train.dist_timeout)
    if cfg.model.weights == "auto":  # self-supervision starts from random init unless told otherwise
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="none"))
    if not cfg.data.path:
        raise ImgclfError("imgclf pretrain needs images: imgclf pretrain DATA (a folder, CSV, .npz or builtin:NAME)")
    run_dir = run_dir_for(cfg, resume, dist)
    timm.utils.random_seed(cfg.train.seed, dist.rank)
    samples = open_unlabelled(cfg.data.path, "train", policy_from_config(cfg.data))
    if len(samples) < 2:
        raise ImgclfError(f"{samples.name}: {len(samples)} image(s); self-supervision needs a set of images")
    cfg = with_input_size(adopt_run_weights(cfg), samples)
    backbone, _ = create_model(cfg.model, 0, cfg.data.input_size)
    extra = dino_vit_kwargs(cfg.ssl, backbone)
    if extra:  # rebuilt: DINO's local crops are smaller than the ViT's input size
        backbone, _ = create_model(cfg.model, 0, cfg.data.input_size, build_kwargs=extra)
    pre = Preprocess.from_model(backbone, cfg.data)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    method = build_method(cfg.ssl, backbone, dist.world_size > 1).to(dist.device, memory_format=fmt)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", (1,))[0]
    loader = make_loader(ImageDataset(samples, view_transform(cfg.ssl, pre, patch)), cfg.data.batch_size, train=True,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed, rank=dist.rank,
                         world_size=dist.world_size, pin_memory=dist.device.type == "cuda")  # fmt: skip
    if len(loader) == 0:
        raise ImgclfError(f"{samples.name}: {len(samples)} images make no batch of {cfg.data.batch_size}; "
                          "lower --batch-size")  # fmt: skip
    wrapped: nn.Module = method
    if dist.world_size > 1:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(method, device_ids=ids)
    opt = build_optimizer(method, cfg.optim)
    sched = build_scheduler(opt, cfg.sched, len(loader), cfg.train.epochs)
    sched.step_update(0)
    dtype = amp_dtype(cfg.train.amp, dist.device, backbone)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    monitor = (_monitor_sets(samples, cfg), pre)
    return _Job(cfg, dist, run_dir, method, wrapped, opt, sched, scaler, dtype, fmt, pre, loader,
                SkipLog(strict=cfg.data.strict_images), monitor)  # fmt: skip


def _monitor_sets(samples, cfg: Config) -> tuple[Any, Any]:
    """(the first ``MONITOR_IMAGES`` images, for the collapse check; (support, query) halves of at most
    ``ssl.knn_max`` stratified labelled images of ``ssl.knn_data``, or None)."""
    pick = np.random.default_rng(cfg.train.seed).permutation(len(samples))[:MONITOR_IMAGES]  # any folder order
    spread = samples.subset(np.sort(pick))
    if not cfg.ssl.knn_data:
        return spread, None
    labelled = open_source(cfg.ssl.knn_data, "train", policy_from_config(cfg.data))
    if labelled.multi_label:
        raise ImgclfError(f"ssl.knn_data {labelled.name}: label sets; the k-NN monitor needs one class per image")
    idx = np.arange(len(labelled))
    if len(labelled) > cfg.ssl.knn_max:
        idx, _ = stratified_split(labelled.labels, 1 - cfg.ssl.knn_max / len(labelled), cfg.train.seed)
    sup, qry = stratified_split(labelled.labels[idx], 0.5, cfg.train.seed)
    return spread, (labelled.subset(np.sort(idx[sup])), labelled.subset(np.sort(idx[qry])))


def _train_epoch(job: _Job, state: PretrainState, epoch: int) -> dict[str, float]:
    """One pass. No host sync per step: the loss is summed on the device and read every ``REFRESH`` batches (the
    bar and the divergence check). Under torchrun a rank whose batch is unusable (every image unreadable) repeats
    its last good views with zero weight, so the ranks stay in step, as ``train.loop`` does."""
    cfg, dist = job.cfg, job.dist
    total_updates = cfg.train.epochs * len(job.loader)
    job.wrapped.train()
    total = torch.zeros(2, device=dist.device)  # sum of finite losses, their count
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(job.loader, desc=f"pretrain {epoch}/{cfg.train.epochs} {cfg.ssl.method}", leave=False, unit="batch",
               disable=not (cfg.run.progress and dist.is_main))  # fmt: skip
    for i, batch in enumerate(bar):
        job.skips.add(batch.skipped)
        weight = 1.0
        if batch.images is None or len(batch.images[0]) < 2:
            if dist.world_size == 1:
                continue
            if job.last is None:
                raise ImgclfError(f"rank {dist.rank}: no readable image in the first batch of epoch {epoch}; see the "
                                  "skipped files (or drop them from the data)")  # fmt: skip
            views, weight = job.last, 0.0
        else:
            views = [v.to(dist.device, non_blocking=True).contiguous(memory_format=job.fmt) for v in batch.images]
            job.last = views
        with autocast(dist.device, job.dtype):
            loss = job.wrapped(views, epoch - 1)
        job.scaler.scale(loss * weight).backward()
        job.method.after_backward(epoch - 1)
        _step(job)
        state.updates += 1
        job.sched.step_update(state.updates)
        job.method.after_update(state.updates / total_updates)
        if weight:
            finite = torch.isfinite(loss.detach())
            total += torch.stack([torch.where(finite, loss.detach(), 0.0), finite.float()])
            seen += len(views[0])
        if (i + 1) % REFRESH == 0 or i + 1 == len(job.loader):
            _check_diverged(job, epoch)
            if not bar.disable:
                s, n = total.tolist()
                bar.set_postfix(loss=f"{s / max(n, 1):.4f}", lr=f"{job.opt.param_groups[0]['lr']:.2e}")
    bar.close()
    _check_diverged(job, epoch)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    s, n = total.tolist()
    secs = time.perf_counter() - t0
    return {"train_loss": s / n if n else float("nan"), "lr": job.opt.param_groups[0]["lr"],
            "img_per_s": seen * dist.world_size / max(secs, 1e-9), "epoch_seconds": secs}  # fmt: skip


def _step(job: _Job) -> None:
    """``train.loop.optimizer_step``: unscale, clip, and skip a step with non-finite gradients (``job.bad`` counts
    them in a row)."""
    params = [p for p in job.method.parameters() if p.grad is not None]
    job.bad = optimizer_step(job.opt, job.scaler, params, job.cfg.optim.clip_grad, job.bad)


def _check_diverged(job: _Job, epoch: int) -> None:
    if job.bad is not None and int(job.bad) >= MAX_NONFINITE:
        raise ImgclfError(f"pretraining diverged: {MAX_NONFINITE} updates in a row with non-finite gradients in "
                          f"epoch {epoch}; lower optim.lr (or add --optim.clip_grad 1.0)")  # fmt: skip


def _monitor(job: _Job) -> dict[str, float]:
    """The collapse check and (with ``ssl.knn_data``) the k-NN accuracy of the kept backbone now (every rank: under
    torchrun the embedding shards over the ranks and gathers)."""
    (spread_set, knn_sets), pre = job.monitor
    infer = InferConfig(device=str(job.dist.device), batch_size=256, workers=0, progress=False)
    backbone = kept_backbone(job.method)
    was = backbone.training
    backbone.eval()
    try:
        feats, _, _ = embed_samples(backbone, spread_set, pre, infer)
        row = {"emb_spread": embedding_spread(feats)}
        if knn_sets is not None:
            (s, ys, _), (q, yq, _) = (embed_samples(backbone, part, pre, infer) for part in knn_sets)
            k = len(knn_sets[0].class_names)
            pred = classify_embeddings(q, s, ys, k, k=job.cfg.ssl.knn_k, temperature=KNN_TEMPERATURE).argmax(1)
            row["knn_top1"] = float((pred == yq).float().mean())
    finally:
        backbone.train(was).to(memory_format=job.fmt)  # embedding switched it to channels_last
    if row["emb_spread"] < job.cfg.ssl.collapse_std and job.dist.is_main:
        log.warning("collapse check: embedding spread %.3f < ssl.collapse_std %.3f: the representation is "
                    "collapsing (lower optim.lr, or raise ssl.temperature / ssl.momentum)",
                    row["emb_spread"], job.cfg.ssl.collapse_std)  # fmt: skip
    return row


def _line(row: dict[str, Any], cfg: Config) -> str:
    knn = f" | k-NN top-1 {row['knn_top1']:.2%}" if "knn_top1" in row else ""
    spread = f" | spread {row['emb_spread']:.3f}" if "emb_spread" in row else ""
    return (f"epoch {row['epoch']}/{cfg.train.epochs} | loss {row['train_loss']:.4f}{spread}{knn} | "
            f"{row['img_per_s']:.0f} img/s | {row['epoch_seconds']:.0f} s")  # fmt: skip


def _save(job: _Job, state: PretrainState) -> None:
    if not job.dist.is_main:
        return
    save_checkpoint(job.run_dir / LAST_CKPT, {
        "model": job.method.state_dict(), "optimizer": job.opt.state_dict(), "scheduler": job.sched.state_dict(),
        "scaler": job.scaler.state_dict(),
        "state": {"epoch": state.epoch, "updates": state.updates, "seconds": state.seconds},
        "history": state.history, "rng": rng_state(), "world_size": job.dist.world_size,
        "updates_per_epoch": len(job.loader), "method": job.cfg.ssl.method,
    })  # fmt: skip


def _restore(job: _Job, state: PretrainState) -> None:
    path = job.run_dir / LAST_CKPT
    ck = load_checkpoint(path)
    if ck.get("method") != job.cfg.ssl.method or ck.get("updates_per_epoch") != len(job.loader):
        raise ImgclfError(f"{path}: saved by {ck.get('method')} with {ck.get('updates_per_epoch')} updates per epoch;"
                          f" this run is {job.cfg.ssl.method} with {len(job.loader)} (same data and batch size "
                          "resume)")  # fmt: skip
    try:
        job.method.load_state_dict(ck["model"])
        job.opt.load_state_dict(ck["optimizer"])
        job.sched.load_state_dict(ck["scheduler"])
        if ck["scaler"]:
            job.scaler.load_state_dict(ck["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ImgclfError(f"{path} does not match this run's config ({str(e).strip().splitlines()[0][:160]})") from None
    state.epoch, state.updates = ck["state"]["epoch"], ck["state"]["updates"]
    state.seconds = float(ck["state"].get("seconds", 0.0))
    state.history = list(ck["history"])
    if ck.get("world_size", 1) == job.dist.world_size and job.dist.rank == 0:
        set_rng_state(ck["rng"])
    else:
        timm.utils.random_seed(job.cfg.train.seed + 7919 * state.epoch, job.dist.rank)
    log.info("resumed %s after epoch %d", job.run_dir, state.epoch)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory in MiB of this process (``RUSAGE_SELF``) or of its largest finished child
    (``RUSAGE_CHILDREN``: data-loader workers), from ``getrusage`` (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(who).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _finish(job: _Job, state: PretrainState) -> PretrainResult:
    """Rank 0 writes the backbone run (kind ``backbone``: ``ssl.kept_backbone``, DINO's teacher)."""
    cfg, backbone, seconds = job.cfg, kept_backbone(job.method), state.seconds
    last = state.history[-1] if state.history else {}
    collapsed = bool(last) and last.get("emb_spread", 1.0) < cfg.ssl.collapse_std
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if job.dist.device.type == "cuda" else None
    metrics = {"history": state.history, "pretrain_seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb()),
               "peak_worker_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN)),
               "collapsed": collapsed, **({"cuda_peak_mb": round(cuda_peak)} if cuda_peak is not None else {}),
               **{k: last[k] for k in ("emb_spread", "knn_top1", "train_loss") if k in last}}  # fmt: skip
    if job.skips.items:
        metrics["skipped_files"] = job.skips.items
    art = Artifact(
        arch=architecture_of(backbone, cfg.model.name), class_names=[], preprocessing=job.pre,
        config=config_to_dict(cfg), metrics=metrics, weights_source=f"ssl:{cfg.ssl.method}", kind=KIND,
        data={"train": str(cfg.data.path), "n_train": len(job.loader.dataset)},
        model_kwargs=size_kwargs(cfg.model.name, cfg.data.input_size),
    )  # fmt: skip
    art.extra["ssl"] = config_to_dict(cfg)["ssl"]
    if job.dist.is_main:
        save_artifact(job.run_dir, backbone, art)
    return PretrainResult(job.run_dir, cfg.ssl.method, art.arch, state.history, seconds, metrics["peak_rss_mb"],
                          metrics["peak_worker_rss_mb"], dict(job.skips.items), collapsed)  # fmt: skip
