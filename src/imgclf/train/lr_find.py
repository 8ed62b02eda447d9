"""LR range test: raise the learning rate exponentially for a few hundred steps, watch the loss.

The same data, model, first strategy phase (for ``staged``: the head phase) and optimizer groups as
``imgclf train`` (so discriminative rates keep their ratios); the suggestion is the rate where the
smoothed loss falls fastest, the usual "steepest descent" reading of the curve (Smith 2017; fastai).

Example:
    >>> res = lr_find(make_config("images/"), steps=100)  # doctest: +SKIP
    >>> res["suggested_lr"]  # doctest: +SKIP
    0.0012
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from ..data.preprocess import Preprocess
from ..errors import ImgclfError
from ..io import write_json
from .loop import forward_loss, prepare_run, set_train_mode
from .trainer import build_loop, model_config, train_loader

log = logging.getLogger("imgclf")


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 5, skip_end: int = 3) -> float:
    """The learning rate with the steepest fall of the smoothed loss (per log-lr)."""
    lo, hi = skip_start, max(skip_start + 2, len(lrs) - skip_end)
    x, y = np.log10(np.asarray(lrs[lo:hi])), np.asarray(smoothed[lo:hi])
    if len(x) < 3:
        raise ImgclfError("lr-find: too few steps before the loss diverged; lower --start-lr or add steps")
    grad = np.gradient(y, x)
    return float(lrs[lo + int(np.argmin(grad))])


def lr_find(
    cfg: Config, *, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100, diverge: float = 4.0
) -> dict[str, Any]:
    """Run the range test on ``cfg``'s training data and model; return lrs, losses and the suggestion."""
    if not 0 < start_lr < end_lr:
        raise ImgclfError(f"lr-find: need 0 < --start-lr < --end-lr (got {start_lr}, {end_lr})")
    run = prepare_run(cfg, needs_dir=False)  # the set-up of every training run, without a run directory
    cfg, dist, splits = run.cfg, run.dist, run.splits  # cfg: data.input_size auto resolved
    from ..models.factory import create_model

    model, _ = create_model(model_config(cfg), len(splits.class_names), cfg.data.input_size, splits.class_names)
    tl = train_loader(splits.train, Preprocess.from_model(model, cfg.data), cfg, dist)
    loop = build_loop(cfg, dist, model, len(tl), len(splits.class_names), run.task)
    set_train_mode(loop)
    lrs, losses, best = [], [], math.inf
    batches = iter(tl)
    t0 = time.perf_counter()
    for i in tqdm(range(steps), desc="lr-find", disable=not cfg.run.progress, leave=False):
        lr = start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))
        for g in loop.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batch = next(batches, None)
        if batch is None:
            batches = iter(tl)
            batch = next(batches)
        if batch.images is None or len(batch.labels) < 2:
            continue
        x = batch.images.to(dist.device).contiguous(memory_format=loop.fmt)
        y = batch.labels.to(dist.device)
        if loop.mixup is not None and len(y) % 2 == 0:
            x, y = loop.mixup(x, y)
        loss = forward_loss(loop, x, y)  # the step of `imgclf train` (task loss, autocast), at this rate
        loop.opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        value = loss.item()
        if not math.isfinite(value):
            break  # diverged: the non-finite point is not recorded
        lrs.append(lr)
        losses.append(value)
        s = smooth(losses)[-1]
        best = min(best, s)
        if i > 10 and s > diverge * best:
            break
    sm = smooth(losses)
    lr_min = lrs[int(np.argmin(sm))]
    return {
        "lrs": lrs,
        "losses": losses,
        "smoothed": sm,
        "suggested_lr": suggest(lrs, sm),
        "min_loss_lr": lr_min,
        "steps_run": len(lrs),
        "seconds": round(time.perf_counter() - t0, 1),
        "model": cfg.model.name,
        "strategy": cfg.transfer.strategy,
    }


def save_lr_find(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``lr_find.json`` and ``lr_find.png`` (loss vs learning rate, log x) into ``out_dir``."""
    from ..plots import lr_find_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    js, png = out_dir / "lr_find.json", out_dir / "lr_find.png"
    write_json(js, result)
    lr_find_plot(result, png)
    return js, png
