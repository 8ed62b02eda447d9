"""``train.fsdp``: fully sharded data parallel training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

DDP keeps a whole copy of the parameters, gradients and AdamW moments on every rank (16 bytes per parameter in
fp32); FSDP2 keeps 1/world of them and gathers each block's parameters just in time for its forward and backward.
imgclf shards the training state only: validation, the checkpoint and everything after training (calibration, the
artifact, the report) run on a full replica whose weights are gathered from the shards once per epoch, so the
sharded model never has to run an uneven number of forwards on different ranks (sharded evaluation inputs differ
by one image between ranks).

Units: every block of the model's sequential containers (``nn.Sequential``/``nn.ModuleList`` children: timm's
``blocks``, ``stages``, ``layers``) holding at least ``MIN_UNIT_SHARE`` of the parameters, innermost first, then the
root; see the FSDP2 tutorial (pytorch.org/tutorials/intermediate/FSDP_tutorial) for the per-block policy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import Config
from ..dist import Dist
from ..errors import ImgclfError

MIN_UNIT_SHARE = 0.02  # a block below 2 % of the parameters joins its parent's unit (fewer, larger all-gathers)


def check(cfg: Config, dist: Dist) -> bool:
    """Whether this run trains with FSDP2 (``train.fsdp`` under torchrun).

    Raises:
        ImgclfError: ``train.fsdp`` with an EMA, ``train.sync_bn``, or a strategy that freezes part of the model
            (probe, staged, ``transfer.freeze_stages``).
    """
    if not cfg.train.fsdp or dist.world_size == 1:
        return False
    if cfg.train.ema:
        raise ImgclfError("train.fsdp does not keep an EMA of sharded weights yet; add --train.ema false")
    if cfg.train.sync_bn:
        raise ImgclfError("train.fsdp and train.sync_bn: pick one (FSDP runs BatchNorm per rank)")
    if cfg.transfer.strategy not in ("finetune", "scratch") or cfg.transfer.freeze_stages:
        raise ImgclfError("train.fsdp trains every parameter: use --strategy finetune or scratch without "
                          "transfer.freeze_stages (a probe or staged run has little to shard)")  # fmt: skip
    return True


def shard(model: nn.Module) -> int:
    """Apply ``fully_shard`` in place to the blocks of ``model`` and to its root; returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() for p in model.parameters())
    units = 0
    for m in reversed(list(model.modules())):  # innermost first: a unit's parameters leave its parent's unit
        if not isinstance(m, (nn.Sequential, nn.ModuleList)):
            continue
        for child in m.children():
            n = sum(p.numel() for p in child.parameters() if not _is_sharded(p))
            if n >= MIN_UNIT_SHARE * total and not _is_unit(child):
                fully_shard(child)
                units += 1
    fully_shard(model)
    return units + 1


def _is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _is_unit(m: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(m, FSDPModule)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on every rank, on the CPU; a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full tensors (rank 0 holds it; the others an empty dict); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full(model: nn.Module, opt: torch.optim.Optimizer | None, sd: dict[str, Any], osd: dict | None) -> None:
    """Load a full state dict (and optimizer state) into the sharded ``model``; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )  # fmt: skip

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd, options=options)
    if opt is not None and osd is not None:
        set_optimizer_state_dict(model, opt, osd, options=options)
