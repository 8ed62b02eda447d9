"""Freezing and parameter groups through timm's model contract (``get_classifier``, ``group_matcher``).

Stages are timm's coarse parameter groups in forward order: the stem first, then each stage (for a
ViT, each block), then trailing layers such as a final conv or norm; the classifier is the head.
This works the same for CNNs and ViTs.

Example:
    >>> import timm
    >>> m = timm.create_model("test_resnet", num_classes=3)
    >>> len(stage_groups(m)) >= 3, sorted(head_names(m))
    (True, ['fc.bias', 'fc.weight'])
"""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn
from timm.models import group_parameters

from .heads import pooling_of


def head_names(model: nn.Module) -> set[str]:
    """Parameter names of the final classifier layer (``model.get_classifier()``; none for plain modules) and of
    an imgclf pooling head (``models.heads``: GeM's p, the bilinear reduction conv), which train with it."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    pool = pooling_of(model)
    ids = {id(p) for m in (head, pool) if m is not None for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Non-head parameter names per coarse group, in forward order (stem first)."""
    head = head_names(model)
    if not hasattr(model, "group_matcher"):
        return [[n for n, _ in model.named_parameters() if n not in head]]
    groups = group_parameters(model, model.group_matcher(coarse=True))
    out = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
    return [g for g in out if g]


def trainable_names(
    model: nn.Module, *, head_only: bool = False, freeze_stages: int = 0, top_stages: int | None = None
) -> set[str]:
    """Which parameters train: the head only, all but the stem + first ``freeze_stages``, or the top K stages."""
    head = head_names(model)
    if head_only:
        return head
    groups = stage_groups(model)
    if top_stages is not None:
        chosen = groups[max(0, len(groups) - top_stages) :] if top_stages else []
    else:
        chosen = groups[freeze_stages + 1 :] if freeze_stages else groups
    return head | {n for g in chosen for n in g}


def apply_trainable(model: nn.Module, trainable: set[str]) -> None:
    """Set ``requires_grad`` from ``trainable``."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)


def frozen_norms(model: nn.Module, trainable: set[str], all_bn: bool = False) -> list[nn.Module]:
    """BatchNorm layers that must stay in eval mode: those of frozen layers, or every one with ``all_bn``."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        params = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
        if all_bn or (params and not any(p in trainable for p in params)):
            out.append(m)
    return out


def layer_scales(model: nn.Module, layer_decay: float | None) -> dict[str, float]:
    """Layer-wise LR decay factors: 1 for the last layer, x ``layer_decay`` per layer towards the stem."""
    names = [n for n, _ in model.named_parameters()]
    if not layer_decay or layer_decay == 1 or not hasattr(model, "group_matcher"):
        return dict.fromkeys(names, 1.0)
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values())  # as timm: unmatched parameters (the head) form the top layer
    return {n: layer_decay ** (top - layer_of.get(n, top)) for n in names}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    backbone_lr_scale: float = 1.0,
    layer_decay: float | None = None,
) -> list[dict]:
    """Optimizer groups of the trainable parameters with ``lr_scale`` (timm's schedulers apply it).

    The head gets scale 1; backbone parameters get ``backbone_lr_scale`` x their layer-decay factor.
    Norms, biases and the model's ``no_weight_decay()`` names get no weight decay.
    """
    head = head_names(model)
    scales = layer_scales(model, layer_decay)
    skip_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, float], list] = defaultdict(list)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 if n in head else backbone_lr_scale * scales[n]
        wd = 0.0 if p.ndim <= 1 or n in skip_wd else weight_decay
        groups[(round(scale, 12), wd)].append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in sorted(groups.items(), reverse=True)]
