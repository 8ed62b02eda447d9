"""Linear probe on cached features: the backbone runs once per image, the head trains in seconds.

Features (timm ``forward_head(pre_logits=True)``, eval preprocessing, plus ``probe.aug_passes``
augmented passes over the training data) are cached on disk under a key made of the architecture,
the weights' content, the pooling head (``model.head``: its kind and tensors), the preprocessing, the data
and the view, so a second run with other probe settings skips the backbone entirely. A pooling head's own
parameters (GeM's p, the bilinear reduction conv) stay at their initial values: only the Linear is fitted.
The head is then fitted either

- ``lbfgs``: multinomial logistic regression on standardised features, full-batch L-BFGS for each L2
  strength in ``probe.wd_grid`` (warm-started), the best on the validation split kept; or
- ``sgd``: mini-batch training of the head with ``optim.*``/``sched.*`` for ``train.epochs``, the
  same optimisation the uncached probe (``probe.cache false``) runs through the full network.

The fitted head is folded back into the model's classifier, so the artifact is a plain timm model (plus the
pooling module of a ``model.head`` other than linear).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import timm.utils
import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..artifact import package_versions
from ..config import Config
from ..data.cache import data_identity
from ..data.loader import ImageDataset, SkipLog, Skipped, make_loader
from ..data.preprocess import Preprocess
from ..data.sources import Samples
from ..dist import Dist
from ..errors import ImgclfError
from ..io import save_safetensors
from ..models.factory import create_model
from ..models.heads import head_identity
from ..models.inference import Features, extract_features
from ..models.weights import packaged_weights_file
from ..rundir import BEST_WEIGHTS, LAST_CKPT, WEIGHTS_FILE
from .checkpoint import load_checkpoint, save_checkpoint
from .logger import RunLogger
from .loop import EpochHooks, FeatureBatches, Loop, State, prepare_run, run_epochs, score_of, train_one_epoch
from .optim import build_optimizer, build_scheduler
from .strategy import Phase
from .tasks import SingleLabelTask, Task, TaskModule, metric_of
from .trainer import Fitted

log = logging.getLogger("imgclf")
CACHE_FORMAT = 1


def cache_dir(cfg: Config) -> Path:
    """``probe.cache_dir`` or ``$XDG_CACHE_HOME/imgclf/features`` (default ``~/.cache/imgclf/features``)."""
    if cfg.probe.cache_dir:
        return Path(cfg.probe.cache_dir).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "imgclf" / "features"


def _sha(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(weights_source: str, cfg: Config, model: nn.Module) -> str:
    """What the backbone's weights are: a content hash for files, the pretrained tag for hub weights."""
    kind, _, rest = weights_source.partition(":")
    if kind == "packaged":
        return "sha256:" + _file_sha(packaged_weights_file(cfg.model.name))
    if kind == "file":
        return "sha256:" + _file_sha(Path(rest))
    if kind == "run":  # --weights RUN: its weights file
        return "sha256:" + _file_sha(Path(rest) / WEIGHTS_FILE)
    if kind == "hub":
        pc = getattr(model, "pretrained_cfg", {})
        return f"{weights_source}|{pc.get('hf_hub_id') or pc.get('url')}|{pc.get('tag')}"
    return f"random-init:seed{cfg.train.seed}"


#: augmentation fields that change what a training image looks like (MixUp & co. act on batches, not here)
_VIEW_AUG_FIELDS = ("scale", "ratio", "hflip", "vflip", "rotation", "translate", "shear", "perspective",
                    "color_jitter", "grayscale", "auto_augment", "re_prob")  # fmt: skip


def cached_features(
    model: nn.Module, samples: Samples, transform, view: dict, key_base: dict, cfg: Config, dist: Dist, skips: SkipLog
) -> Features:
    """Features of ``samples`` under ``transform``, from the cache when the key matches.

    The key holds the architecture, the weights' identity, the preprocessing, the data's content, the view
    (augmentation and seed) and the torch/timm/imgclf versions; unreadable files found when the features
    were computed are stored with them and reported again on a cache hit.
    """
    key = _sha({**key_base, "data": data_identity(samples), "view": view, "format": CACHE_FORMAT})[:40]
    path = cache_dir(cfg) / f"{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        skipped = json.loads(safe_open_meta(path).get("skipped", "[]"))
        skips.add([Skipped(-1, src, why) for src, why in skipped])
        log.info("features %s: cache hit (%d x %d)", view["name"], *t["features"].shape)
        return Features(t["features"], t["labels"], t["indices"])
    bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    seed = view.get("seed", 0)
    timm.utils.random_seed(seed)  # augmentation in the main process (num_workers 0); workers get seeds from it
    loader = make_loader(ImageDataset(samples, transform), bs, train=False, num_workers=cfg.data.num_workers,
                         seed=seed, pin_memory=dist.device.type == "cuda")  # fmt: skip
    t0 = time.perf_counter()
    local = SkipLog(strict=skips.strict)
    f = extract_features(model, loader, dist.device, skips=local, channels_last=cfg.model.channels_last,
                         progress=cfg.run.progress and dist.is_main, desc=f"features {view['name']}")  # fmt: skip
    skips.items.update(local.items)
    if dist.is_main:
        meta = {"view": json.dumps(view), "data": samples.name, "arch": key_base["arch"],
                "skipped": json.dumps(sorted(local.items.items()))}  # fmt: skip
        save_safetensors(path, {"features": f.features, "labels": f.labels, "indices": f.indices}, meta)
    secs = time.perf_counter() - t0
    log.info("features %s: computed %d in %.1fs (%.0f img/s), cached", view["name"], len(f.labels), secs,
             len(f.labels) / max(secs, 1e-9))  # fmt: skip
    return f


def safe_open_meta(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def fit_lbfgs(
    xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, k: int, wd_grid: list[float],
    max_iter: int, metric: str = "auto", task: Task | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:  # fmt: skip
    """The task's loss (without label smoothing; cross-entropy: multinomial logistic regression; binary
    cross-entropy: one logistic regression per class) + L2 per strength (strongest first, warm-started), solved
    by L-BFGS; best by val ``metric`` (``auto``: the task's default).

    Returns the head (weight (K, D), bias (K,)) in the raw feature space and one row per strength.
    """
    task = task or SingleLabelTask()
    crit, metric = task.eval_criterion(), metric_of(task, metric)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xs, xv = (xtr - mu) / sd, (xva - mu) / sd
    w = torch.zeros(k, xs.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    rows, best = [], None
    for wd in sorted(wd_grid, reverse=True):
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.Optimizer = opt, wd: float = wd) -> torch.Tensor:
            opt.zero_grad()
            loss = crit(xs @ w.T + b, ytr) + 0.5 * wd * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            row = {"wd": wd, **_val_row(xv @ w.T + b, yva, k, metric, task)}
        rows.append(row)
        if best is None or (row["score"], -row["val_loss"]) > (best[0]["score"], -best[0]["val_loss"]):
            best = (row, w.detach().clone(), b.detach().clone())
    _, wb, bb = best
    weight = wb / sd  # fold the standardisation into the head
    return weight, bb - weight @ mu, rows


def _val_row(logits: torch.Tensor, targets: torch.Tensor, k: int, metric: str, task: Task) -> dict[str, float]:
    m = task.metrics(logits, targets, [str(i) for i in range(k)], loss=task.eval_criterion())
    return {**{f"val_{key}": m[key] for key in task.history_metrics}, "score": score_of(m, metric)}


def head_loop(cfg: Config, head: nn.Linear, batches_per_epoch: int, task: Task) -> Loop:
    """The shared training loop's state for a linear head on cached CPU features: the run's task, optimizer and
    schedule; one phase, no AMP, EMA, MixUp or DDP (every rank fits the same head on the same features)."""
    opt = build_optimizer(head, cfg.optim)
    per_epoch = math.ceil(batches_per_epoch / cfg.optim.accum_steps)
    sched = build_scheduler(opt, cfg.sched, per_epoch, cfg.train.epochs)
    phase = Phase("probe", 0, cfg.train.epochs)
    return Loop(cfg, Dist(torch.device("cpu")), head, task, TaskModule(head, task.criterion()), opt, sched, None,
                torch.amp.GradScaler("cpu", enabled=False), SkipLog(), None, torch.contiguous_format, [phase], phase,
                per_epoch, [], None)  # fmt: skip


def fit_sgd(
    head: nn.Linear, tr: Features, va: Features, cfg: Config, run_dir: Path, state: State, logger: RunLogger,
    task: Task, ck: dict | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Mini-batch head training on cached features through the shared loop (``train_one_epoch``,
    ``run_epochs``); checkpoints every epoch; returns the best head state."""
    batches = FeatureBatches(tr.features, tr.labels, cfg.data.batch_size, cfg.train.seed)
    loop = head_loop(cfg, head, len(batches), task)
    best = {"model": {k: v.clone() for k, v in head.state_dict().items()}}
    if ck is not None and "optimizer" in ck:  # resuming
        head.load_state_dict(ck["model"])
        loop.opt.load_state_dict(ck["optimizer"])
        loop.sched.load_state_dict(ck["scheduler"])
        best["model"] = ck["best_head"]
        state.phase_updates = state.updates  # one phase: its schedule runs on all updates
    loop.sched.step_update(state.phase_updates)
    names = [str(i) for i in range(head.out_features)]
    headline = task.history_metrics[1]

    def validate() -> dict[str, dict[str, Any]]:
        with torch.no_grad():
            return {"model": task.metrics(head(va.features), va.labels, names, loss=task.eval_criterion())}

    def checkpoint() -> None:
        if logger.enabled:
            save_checkpoint(run_dir / LAST_CKPT, {"model": head.state_dict(), "optimizer": loop.opt.state_dict(),
                            "scheduler": loop.sched.state_dict(), "best_head": best["model"], "probe": True,
                            "state": {k: v for k, v in vars(state).items() if k != "history"},
                            "history": state.history})  # fmt: skip

    hooks = EpochHooks(
        train=lambda e: train_one_epoch(loop, batches, state, f"probe epoch {e}/{cfg.train.epochs}"),
        validate=validate, checkpoint=checkpoint, before_epoch=batches.set_epoch,
        keep_best=lambda which: best.update(model={k: v.clone() for k, v in head.state_dict().items()}),
        line=lambda r: f"epoch {r['epoch']}/{cfg.train.epochs}  loss {r['train_loss']:.4f}  val {headline} "
                       f"{100 * r[f'val_{headline}']:.2f} %{' *' if r['best'] else ''}",
    )  # fmt: skip
    run_epochs(cfg, state, hooks, logger, task)
    return best["model"]


def _lbfgs_head(tr: Features, va: Features, k: int, cfg: Config, run_dir: Path, state: State, logger: RunLogger,
                task: Task):  # fmt: skip
    weight, bias, rows = fit_lbfgs(tr.features, tr.labels, va.features, va.labels, k, cfg.probe.wd_grid,
                                   cfg.probe.max_iter, cfg.train.metric, task)  # fmt: skip
    state.history = [{"epoch": i + 1, **{key: v for key, v in r.items() if key != "score"}} for i, r in enumerate(rows)]
    best = max(rows, key=lambda r: (r["score"], -r["val_loss"]))  # ties: the lower validation loss
    state.epoch, state.best, state.best_epoch = len(rows), best["score"], rows.index(best) + 1
    for row in state.history:
        logger.log_epoch(row)
    m = task.history_metrics[1]
    log.info("probe L-BFGS: best wd %g, val %s %.2f %%", best["wd"], m, 100 * best[f"val_{m}"])
    head_state = {"weight": weight, "bias": bias}
    plain = {k2: v for k2, v in vars(state).items() if k2 != "history"}
    if logger.enabled:
        save_checkpoint(
            run_dir / LAST_CKPT, {"model": head_state, "probe": True, "history": state.history, "state": plain}
        )
    return head_state


def fit_probe(cfg: Config, resume: bool = False) -> Fitted:
    """Frozen backbone, cached features, a fitted linear head; see the module docstring."""
    t_start = time.perf_counter()
    run = prepare_run(cfg, resume)
    cfg, dist, run_dir, resume, splits = run.cfg, run.dist, run.run_dir, run.resume, run.splits  # cfg: sizes resolved
    k = len(splits.class_names)
    model, wsrc = create_model(cfg.model, k, cfg.data.input_size, splits.class_names)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ImgclfError(f"the cached probe needs a Linear classifier; {cfg.model.name} has {type(head).__name__}")
    pre = Preprocess.from_model(model, cfg.data)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=fmt).eval()
    skips = SkipLog(strict=cfg.data.strict_images)
    versions = {k: v for k, v in package_versions().items() if k in ("torch", "timm", "imgclf")}
    base = {"arch": cfg.model.name, "weights": weights_identity(wsrc, cfg, model), "preprocessing": pre.to_json(),
            "versions": versions}  # fmt: skip
    pooling = head_identity(model)  # a pooling head's features depend on its kind, p, conv and hashes too
    if pooling is not None:  # (runs without one keep their cache keys)
        base["head"] = pooling
    ev = pre.eval()
    feats = [cached_features(model, splits.train, ev, {"name": "train"}, base, cfg, dist, skips)]
    for i in range(cfg.probe.aug_passes):
        aug = {k: getattr(cfg.aug, k) for k in _VIEW_AUG_FIELDS}
        view = {"name": f"train-aug{i + 1}", "aug": aug, "seed": cfg.train.seed * 1000 + i + 1}
        feats.append(cached_features(model, splits.train, pre.train(cfg.aug), view, base, cfg, dist, skips))
    tr = Features(*(torch.cat(parts) for parts in zip(*feats)))
    va = cached_features(model, splits.val, ev, {"name": "val"}, base, cfg, dist, skips)
    if len(va.labels) == 0 or len(tr.labels) == 0:
        raise ImgclfError("no training or validation image could be read; see the skipped files")
    logger = RunLogger(run_dir, enabled=dist.is_main)
    logger.save_config(cfg)
    state, ck = State(), load_checkpoint(run_dir / LAST_CKPT) if resume else None
    if ck is not None:
        for key, v in ck["state"].items():
            setattr(state, key, v)
        state.history = list(ck["history"])
    if cfg.probe.solver == "lbfgs":
        head_state = ck["model"] if ck is not None else _lbfgs_head(tr, va, k, cfg, run_dir, state, logger, run.task)
    else:
        head_cpu = nn.Linear(head.in_features, k)
        nn.init.zeros_(head_cpu.weight)
        nn.init.zeros_(head_cpu.bias)
        head_state = fit_sgd(head_cpu, tr, va, cfg, run_dir, state, logger, run.task, ck)
    logger.close()
    head.load_state_dict({k2: v.to(head.weight.device) for k2, v in head_state.items()})
    if dist.is_main:
        save_safetensors(run_dir / BEST_WEIGHTS, model.state_dict())
    return Fitted(cfg, run_dir, model, state, splits, run.task, pre, wsrc, dist, skips, time.perf_counter() - t_start)
