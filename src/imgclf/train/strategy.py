"""Transfer strategies as phases: which parameters train, at which learning rates, for which epochs.

- ``finetune``: one phase; everything trains (minus ``freeze_stages``), the backbone at
  ``optim.lr x backbone_lr_scale`` with optional layer-wise decay.
- ``staged``: ``head_epochs`` with only the head training (backbone and its BatchNorm frozen), then the
  whole network (or the top ``unfreeze_stages``) at discriminative rates; each phase gets its own
  optimizer and schedule (warmup + decay).
- ``scratch``: one phase from random init, one learning rate.
- ``probe`` (uncached): the head alone on features recomputed every epoch, no augmentation; the cached
  probe lives in ``imgclf.train.probe``.

Example:
    >>> from imgclf.config import Config
    >>> cfg = Config(); cfg.transfer.strategy = "staged"; cfg.train.epochs = 5
    >>> [(p.name, p.start, p.end, p.head_only) for p in plan(cfg)]
    [('head', 0, 2, True), ('unfrozen', 2, 5, False)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..config import Config
from ..errors import ImgclfError
from ..models.transfer import apply_trainable, frozen_norms, param_groups, trainable_names


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs ``[start, end)`` with one set of trainable parameters and LR scales."""

    name: str
    start: int
    end: int
    head_only: bool = False
    freeze_stages: int = 0
    top_stages: int | None = None
    backbone_lr_scale: float = 1.0
    layer_decay: float | None = None
    freeze_all_bn: bool = False

    @property
    def epochs(self) -> int:
        return self.end - self.start


def plan(cfg: Config) -> list[Phase]:
    """The phases of ``cfg.transfer.strategy`` over ``cfg.train.epochs``."""
    t, e = cfg.transfer, cfg.train.epochs
    # discriminative rates protect pretrained features; a randomly initialised backbone has none
    scale = 1.0 if cfg.model.weights == "none" else t.backbone_lr_scale
    if t.strategy == "staged":
        if e <= t.head_epochs:
            raise ImgclfError(
                f"train.epochs ({e}) must exceed transfer.head_epochs ({t.head_epochs}) for the staged strategy"
            )
        return [
            Phase("head", 0, t.head_epochs, head_only=True, freeze_all_bn=True),
            Phase("unfrozen", t.head_epochs, e, freeze_stages=t.freeze_stages, top_stages=t.unfreeze_stages,
                  backbone_lr_scale=scale, layer_decay=t.layer_decay, freeze_all_bn=t.freeze_bn),
        ]  # fmt: skip
    if t.strategy == "probe":  # the uncached probe (probe.cache false); the cached one never gets here
        if cfg.probe.solver != "sgd" or cfg.probe.aug_passes:
            raise ImgclfError(
                "probe.cache false recomputes features every epoch and trains the head with optim.*: "
                "set probe.solver sgd and probe.aug_passes 0"
            )
        return [Phase("probe", 0, e, head_only=True, freeze_all_bn=True)]
    if t.strategy == "scratch" and t.freeze_stages:
        raise ImgclfError("transfer.freeze_stages would freeze random weights under the scratch strategy; drop it")
    if t.strategy == "scratch":
        return [Phase("scratch", 0, e, freeze_stages=t.freeze_stages, freeze_all_bn=t.freeze_bn)]
    return [
        Phase("finetune", 0, e, freeze_stages=t.freeze_stages, backbone_lr_scale=scale,
              layer_decay=t.layer_decay, freeze_all_bn=t.freeze_bn)
    ]  # fmt: skip


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that trains epoch ``epoch`` (0-based)."""
    return next(p for p in phases if p.start <= epoch < p.end)


def apply_phase(model: nn.Module, phase: Phase, weight_decay: float) -> tuple[list[dict], list[nn.Module]]:
    """Freeze per ``phase``; return the optimizer groups and the norm layers to keep in eval mode."""
    trainable = trainable_names(
        model, head_only=phase.head_only, freeze_stages=phase.freeze_stages, top_stages=phase.top_stages
    )
    apply_trainable(model, trainable)
    groups = param_groups(model, weight_decay, phase.backbone_lr_scale, phase.layer_decay)
    return groups, frozen_norms(model, trainable, phase.freeze_all_bn)
