"""Optimizer and learning-rate schedule factories over timm."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from ..config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with weight decay on weights only (timm skips norms and biases)."""
    if cfg.name == "adamw":
        return create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    # timm: "sgd" is Nesterov momentum, "momentum" is plain momentum
    name = "sgd" if cfg.nesterov else "momentum"
    return create_optimizer_v2(model, name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, updates_per_epoch: int, epochs: int):
    """Cosine (or constant) schedule with linear warmup, stepped per optimizer update via ``step_update``."""
    total = max(1, updates_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * updates_per_epoch)), total - 1)
    lr = opt.param_groups[0]["lr"]
    return CosineLRScheduler(
        opt,
        t_initial=total - warmup,  # warmup_prefix: the cosine starts after warmup and ends at lr_min
        lr_min=lr * (cfg.min_lr_ratio if cfg.name == "cosine" else 1.0),
        warmup_t=warmup,
        warmup_lr_init=lr * cfg.warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
