"""Tasks: what a model's outputs mean and how it learns from labels, asked by every stage instead of
assuming softmax (timm ``task/``, torchvision's ``train_one_epoch(model, criterion, ...)``).

A task owns the target encoding, the loss (``criterion``, picked by ``train.loss``), the loss reported on
validation data (``eval_criterion``), the head activation (``probs``), the decision rule (``decide``) and
its calibration method; ``to_json`` is stored in the artifact (``imgclf.json`` ``task``) and ``task_from_json``
reads it back (runs saved before tasks existed are single-label cross-entropy). ``TASKS`` is the registry
that multi-label and distillation tasks join.

Example:
    >>> import torch
    >>> t = SingleLabelTask(loss="focal", focal_gamma=2.0)
    >>> task_from_json(t.to_json()) == t
    True
    >>> t.probs(torch.zeros(1, 4)).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import ImgclfError
from .losses import LOSSES


@dataclass(frozen=True)
class SingleLabelTask:
    """One class per image: softmax over K logits, cross-entropy or focal loss, argmax decision (plus the
    run's OOD rejection), temperature scaling for calibration.

    Args:
        loss: a name in ``losses.LOSSES`` (``ce``, ``focal``).
        label_smoothing: for integer targets, in [0, 1).
        focal_gamma, focal_alpha: ``FocalLoss`` settings (used by ``loss="focal"``).
    """

    kind: ClassVar[str] = "single_label"
    calibration: ClassVar[str] = "temperature"
    loss: str = "ce"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    focal_alpha: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ImgclfError(f"train.loss: unknown loss {self.loss!r} (known: {', '.join(LOSSES)})")
        if isinstance(self.focal_alpha, list):
            object.__setattr__(self, "focal_alpha", tuple(self.focal_alpha))

    def check(self, num_classes: int) -> None:
        """ImgclfError before training when the settings do not fit ``num_classes`` (per-class focal alpha)."""
        a = self.focal_alpha
        if isinstance(a, tuple) and len(a) != num_classes:
            raise ImgclfError(f"train.focal_alpha has {len(a)} values for {num_classes} classes (one per class, "
                              "in class-name order, or a single value)")  # fmt: skip

    @classmethod
    def from_config(cls, train: Any) -> SingleLabelTask:
        """From a ``config.TrainConfig`` (loss, label_smoothing, focal_gamma, focal_alpha)."""
        return cls(train.loss, train.label_smoothing, train.focal_gamma, train.focal_alpha)

    def criterion(self) -> nn.Module:
        """The training loss: ``(logits (B, K), int (B,) or soft (B, K) targets) -> scalar``."""
        return LOSSES[self.loss](self)

    def eval_criterion(self) -> nn.Module:
        """The loss reported on validation/test data: the training loss without label smoothing."""
        return LOSSES[self.loss](SingleLabelTask(self.loss, 0.0, self.focal_gamma, self.focal_alpha))

    def probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(N, K) logits -> (N, K) calibrated probabilities ``softmax(logits / T)``."""
        return (logits.float() / temperature).softmax(-1)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> (N,) predicted class indices (argmax)."""
        return probs.argmax(-1)

    def confidence(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> (N,) confidence of the decision (the top probability); drift monitoring
        compares its distribution with the reference's."""
        return probs.max(-1).values

    def class_rates(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> (K,) share of the N images decided for each class (sums to 1); drift
        monitoring compares it with the reference's by PSI."""
        return torch.bincount(self.decide(probs), minlength=probs.shape[-1]).double() / max(1, len(probs))

    def to_json(self) -> dict[str, Any]:
        d = {"kind": self.kind, **asdict(self)}
        if isinstance(d["focal_alpha"], tuple):
            d["focal_alpha"] = list(d["focal_alpha"])
        return d


class TaskModule(nn.Module):
    """The model and its training loss as one module, so DDP wraps both: ``forward(images, targets) ->
    (loss, logits)`` (timm ``task/classification.py``)."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)  # (B, K)
        return self.criterion(logits, targets), logits


#: task kind -> class; every stage reads a run's task through ``task_from_json``
TASKS: dict[str, type] = {SingleLabelTask.kind: SingleLabelTask}


def task_from_json(doc: dict[str, Any] | None) -> SingleLabelTask:
    """The task stored in an artifact (None: a run saved before tasks were recorded: single-label CE)."""
    if doc is None:
        return SingleLabelTask()
    doc = dict(doc)
    kind = doc.pop("kind", SingleLabelTask.kind)
    if kind not in TASKS:
        raise ImgclfError(f"task kind {kind!r} is not known to this imgclf (known: {', '.join(TASKS)}); upgrade it")
    fields = TASKS[kind].__dataclass_fields__
    return TASKS[kind](**{k: v for k, v in doc.items() if k in fields})
