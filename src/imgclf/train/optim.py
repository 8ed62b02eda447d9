"""Optimizer and learning-rate schedule factories over timm (and torch's one-cycle).

Every schedule is stepped per optimizer update through ``step_update(n)`` and honours each param
group's ``lr_scale`` (discriminative learning rates and layer-wise decay).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.optim.lr_scheduler import OneCycleLR

from ..config import OptimConfig, SchedConfig
from ..models.transfer import param_groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups`` (default: every trainable parameter, no weight decay on norms and biases)."""
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    # CUDA: the fused kernels, which also skip a step with non-finite gradients on the device (``found_inf``)
    # without a host sync (``loop.update``); elsewhere the default implementation
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    if cfg.name == "adamw":
        return create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                   **fused)  # fmt: skip
    # timm: "sgd" is Nesterov momentum, "momentum" is plain momentum
    name = "sgd" if cfg.nesterov else "momentum"
    return create_optimizer_v2(groups, name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **fused)


class OneCycle:
    """torch's ``OneCycleLR`` behind the timm-style ``step_update(n)`` interface."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: SchedConfig, total: int, warmup: int):
        lr = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
        start = max(cfg.warmup_lr_ratio, 1e-4)
        self.total = total
        self.sched = OneCycleLR(
            opt,
            max_lr=[lr * g.get("lr_scale", 1.0) for g in opt.param_groups],
            total_steps=total + 1,
            pct_start=min(max(warmup, 1) / total, 0.9),
            div_factor=1 / start,
            final_div_factor=start / max(cfg.min_lr_ratio, 1e-6),
            cycle_momentum=False,  # keep optim.betas / optim.momentum as configured
        )

    def step_update(self, num_updates: int) -> None:
        while self.sched.last_epoch < min(num_updates, self.total):
            self.sched.step()

    def state_dict(self) -> dict[str, Any]:
        return self.sched.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sched.load_state_dict(state)


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, updates_per_epoch: int, epochs: int):
    """The configured schedule over ``epochs`` x ``updates_per_epoch`` optimizer updates."""
    total = max(2, updates_per_epoch * epochs)
    warmup = min(int(round(cfg.warmup_epochs * updates_per_epoch)), total - 1)
    if cfg.name == "onecycle":
        return OneCycle(opt, cfg, total, warmup)
    lr = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
    cycle, limit = total - warmup, 1  # warmup_prefix: the cosine starts after warmup and ends at lr_min
    if cfg.name == "cosine_restarts":
        limit = cfg.cycles
        cycle = max(1, round((total - warmup) / sum(cfg.cycle_mul**i for i in range(cfg.cycles))))
    return CosineLRScheduler(
        opt,
        t_initial=cycle,
        lr_min=lr * (1.0 if cfg.name == "constant" else cfg.min_lr_ratio),
        cycle_mul=cfg.cycle_mul if cfg.name == "cosine_restarts" else 1.0,
        cycle_decay=cfg.cycle_decay if cfg.name == "cosine_restarts" else 1.0,
        cycle_limit=limit,
        warmup_t=warmup,
        warmup_lr_init=lr * cfg.warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
