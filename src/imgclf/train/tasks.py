"""Tasks: what a model's outputs mean and how it learns from labels, asked by every stage instead of
assuming softmax (timm ``task/``, torchvision's ``train_one_epoch(model, criterion, ...)``).

A task owns the target encoding, the loss (``criterion``, picked by ``train.loss``), the loss reported on
validation data (``eval_criterion``), the head activation (``probs``, with the run's calibration), the decision
rule (``decide``: argmax for single-label, per-class thresholds for multi-label), the metric set (``metrics``)
and the metric that picks the best checkpoint by default; ``to_json`` is stored in the artifact (``imgclf.json``
``task``) and ``task_from_json`` reads it back (runs saved before tasks existed are single-label cross-entropy).
``TASKS`` is the registry; ``task_for_config`` picks the task of a training job from its config and data.

- ``SingleLabelTask``: one class per image; softmax, cross-entropy or focal loss, argmax.
- ``MultiLabelTask``: any set of classes per image (the empty set included); one sigmoid per class, binary
  cross-entropy, asymmetric or sigmoid focal loss, a decision threshold per class (``Decision``).

Example:
    >>> import torch
    >>> t = SingleLabelTask(loss="focal", focal_gamma=2.0)
    >>> task_from_json(t.to_json()) == t
    True
    >>> t.probs(torch.zeros(1, 4)).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    >>> m = MultiLabelTask()
    >>> m.decide(m.probs(torch.tensor([[2.0, -2.0]]))).tolist()
    [[True, False]]
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from ..errors import ImgclfError
from .losses import LOSSES, MULTILABEL_LOSSES

Calib = float | list[float] | torch.Tensor  # a temperature: one for every class, or one per class (multi-label)


def _tuple(v: Any) -> Any:
    return tuple(float(x) for x in v) if isinstance(v, list | tuple) else v


def _listed(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class Decision:
    """How a multi-label run turns calibrated probabilities into a label set.

    ``rule``: ``threshold`` (label k is on when ``p_k >= thresholds[k]``; ``thresholds`` is one value for every
    class or one per class) or ``top_k`` (the ``top_k`` most probable labels, never the empty set).
    ``objective``/``target`` record how per-class thresholds were tuned (``eval.thresholds``): ``f1``,
    ``precision`` or ``recall`` (reaching ``target``), or ``fixed``.
    """

    rule: str = "threshold"
    thresholds: float | tuple[float, ...] = 0.5
    top_k: int = 1
    objective: str = "fixed"
    target: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("threshold", "top_k"):
            raise ImgclfError(f"decision rule must be threshold or top_k (got {self.rule!r})")
        object.__setattr__(self, "thresholds", _tuple(self.thresholds))

    def to_json(self) -> dict[str, Any]:
        return _listed(asdict(self))

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Decision:
        doc = doc or {}
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SingleLabelTask:
    """One class per image: softmax over K logits, cross-entropy or focal loss, argmax decision (plus the
    run's OOD rejection), one temperature for calibration.

    Args:
        loss: a name in ``losses.LOSSES``: ``ce``, ``focal``, ``logit_adjusted`` (Menon et al. 2021) or
            ``balanced_softmax`` (Ren et al. 2020).
        label_smoothing: for integer targets, in [0, 1).
        focal_gamma, focal_alpha: ``FocalLoss`` settings (used by ``loss="focal"``).
        class_weight: (K,) per-class loss weights (``losses.class_weights``: inverse frequency, its square root
            or the effective number of samples), None = 1.
        class_prior: (K,) training class frequencies, the prior that logit-adjusted losses offset by.
        la_tau: the logit adjustment's temperature tau (``logit_adjusted``).
    """

    kind: ClassVar[str] = "single_label"
    multi_label: ClassVar[bool] = False
    default_metric: ClassVar[str] = "top1"
    #: validation metrics that may pick the best checkpoint (``train.metric``)
    selection_metrics: ClassVar[tuple[str, ...]] = ("top1", "loss", "macro_f1", "top5", "balanced_accuracy")
    #: validation metrics in every epoch's history row (``val_<name>``)
    history_metrics: ClassVar[tuple[str, ...]] = ("loss", "top1", "macro_f1")
    loss: str = "ce"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    focal_alpha: float | tuple[float, ...] | None = None
    class_weight: tuple[float, ...] | None = None
    class_prior: tuple[float, ...] | None = None
    la_tau: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ImgclfError(f"train.loss: unknown loss {self.loss!r} for single-label data (known: "
                              f"{', '.join(LOSSES)})")  # fmt: skip
        for name in ("focal_alpha", "class_weight", "class_prior"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))

    def check(self, num_classes: int) -> None:
        """ImgclfError before training when per-class settings do not have ``num_classes`` values."""
        _check_per_class(self, ("focal_alpha", "class_weight", "class_prior"), num_classes)

    @classmethod
    def from_config(cls, train: Any, counts: np.ndarray | None = None) -> SingleLabelTask:
        """From a ``config.TrainConfig``; ``auto`` settings resolve to cross-entropy with label smoothing 0.1.
        ``train.class_weights`` and the logit-adjusted losses need the training ``counts`` per class (K,)."""
        loss = "ce" if train.loss == "auto" else train.loss
        s = 0.1 if train.label_smoothing is None else train.label_smoothing
        weight = prior = None
        scheme = train.class_weights
        needs = scheme != "none" or loss in ("logit_adjusted", "balanced_softmax")
        if needs and counts is None:
            raise ImgclfError(f"train.loss {loss} / train.class_weights {scheme} need the training class counts")
        if scheme != "none":
            from .losses import class_weights

            weight = tuple(round(w, 6) for w in class_weights(counts, scheme, train.cb_beta))
        if loss in ("logit_adjusted", "balanced_softmax"):
            n = np.asarray(counts, dtype=np.float64)
            prior = tuple(round(float(x), 8) for x in n / max(n.sum(), 1))
        return cls(loss, s, train.focal_gamma, train.focal_alpha, weight, prior, train.la_tau)

    def criterion(self) -> nn.Module:
        """The training loss: ``(logits (B, K), int (B,) or soft (B, K) targets) -> scalar``."""
        return LOSSES[self.loss](self)

    def eval_criterion(self) -> nn.Module:
        """The loss reported on validation/test data: the training loss without label smoothing."""
        return LOSSES[self.loss](dataclasses.replace(self, label_smoothing=0.0))

    def probs(self, logits: torch.Tensor, temperature: Calib = 1.0, bias: Any = None) -> torch.Tensor:
        """(N, K) logits -> (N, K) calibrated probabilities ``softmax(logits / T + b)``: ``b`` (K,) is the
        post-hoc prior shift ``log(deployment prior / the model's training prior)`` (``eval.priors``; None: no
        shift)."""
        z = logits.float() / temperature
        return (z if bias is None else z + _vec(bias, logits)).softmax(-1)

    def decide(self, probs: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        """(N, K) probabilities -> (N,) predicted class indices (argmax)."""
        return probs.argmax(-1)

    def confidence(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> (N,) confidence of the decision (the top probability); drift monitoring
        compares its distribution with the reference's."""
        return probs.max(-1).values

    def class_rates(self, probs: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        """(N, K) probabilities -> (K,) share of the N images decided for each class (sums to 1); drift
        monitoring compares it with the reference's by PSI."""
        return torch.bincount(self.decide(probs), minlength=probs.shape[-1]).double() / max(1, len(probs))

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor, names: list[str], *, loss: Any = None,
                probs: torch.Tensor | None = None, decision: Decision | None = None) -> dict[str, Any]:  # fmt: skip
        """``train.metrics.compute_metrics`` of (N, K) logits against (N,) class indices, decided by the argmax of
        ``probs`` when given (a prior shift moves decisions; a temperature does not), else of the logits;
        ``decision`` is unused."""
        from .metrics import compute_metrics

        return compute_metrics(logits, targets, names, loss=loss, scores=probs)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **_listed(asdict(self))}


@dataclass(frozen=True)
class MultiLabelTask:
    """Any set of classes per image (the empty set included): one sigmoid per class, a loss over the K binary
    problems, a decision threshold per class.

    Args:
        loss: a name in ``losses.MULTILABEL_LOSSES``: ``bce`` (binary cross-entropy), ``asl`` (asymmetric loss,
            Ridnik et al. 2021) or ``focal`` (sigmoid focal loss, Lin et al. 2017).
        label_smoothing: moves each binary target towards 0.5 (``y (1 - s) + s / 2``), in [0, 1).
        pos_weight: (K,) weight of each class's positive term (``train.pos_weight balanced``: negatives /
            positives in the training data), None = 1.
        asl_gamma_neg, asl_gamma_pos, asl_clip: asymmetric-loss settings.
        focal_gamma, focal_alpha: sigmoid focal loss settings (alpha: positive-term weight in (0, 1)).

    Targets are (B, K) float tensors of 0/1 (or mixed/smoothed values); ``probs`` are ``sigmoid(z / T + b)`` with
    a temperature ``T`` and a bias ``b`` per class (Platt scaling; ``b = 0``: per-class temperature scaling).
    """

    kind: ClassVar[str] = "multi_label"
    multi_label: ClassVar[bool] = True
    default_metric: ClassVar[str] = "map"
    selection_metrics: ClassVar[tuple[str, ...]] = ("map", "loss", "macro_f1", "micro_f1")
    history_metrics: ClassVar[tuple[str, ...]] = ("loss", "map", "macro_f1", "micro_f1")
    loss: str = "bce"
    label_smoothing: float = 0.0
    pos_weight: tuple[float, ...] | None = None
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    focal_gamma: float = 2.0
    focal_alpha: float | tuple[float, ...] | None = None
    # how many labels precision@k / recall@k look at (metrics)
    at_k: tuple[int, ...] = field(default=(1, 3))

    def __post_init__(self) -> None:
        if self.loss not in MULTILABEL_LOSSES:
            raise ImgclfError(f"train.loss: unknown loss {self.loss!r} for multi-label data (known: "
                              f"{', '.join(MULTILABEL_LOSSES)})")  # fmt: skip
        for name in ("pos_weight", "focal_alpha", "at_k"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        object.__setattr__(self, "at_k", tuple(int(k) for k in self.at_k))

    def check(self, num_classes: int) -> None:
        """ImgclfError before training when per-class settings do not have ``num_classes`` values."""
        _check_per_class(self, ("pos_weight", "focal_alpha"), num_classes)
        a = self.focal_alpha
        if a is not None and not all(0 < x < 1 for x in (a if isinstance(a, tuple) else (a,))):
            raise ImgclfError(f"train.focal_alpha must be in (0, 1) for the sigmoid focal loss (got {a})")

    @classmethod
    def from_config(cls, train: Any, positives: np.ndarray | None = None, n: int = 0) -> MultiLabelTask:
        """From a ``config.TrainConfig``; ``auto`` settings resolve to binary cross-entropy without label
        smoothing. ``train.pos_weight`` ``balanced`` / ``sqrt`` needs the training ``positives`` per class (K,)
        out of ``n`` images: ``(n - pos) / pos`` (or its square root), 1 for a class without positives,
        clipped to [1e-2, 1e3]."""
        if train.loss == "ce":
            raise ImgclfError("train.loss ce is for single-label data; multi-label data trains with bce, asl or "
                              "focal (default bce)")  # fmt: skip
        loss = "bce" if train.loss == "auto" else train.loss
        s = 0.0 if train.label_smoothing is None else train.label_smoothing
        pw = None
        if train.pos_weight != "none":
            pos = np.asarray(positives, dtype=np.float64)
            ratio = np.where(pos > 0, (n - pos) / np.maximum(pos, 1), 1.0)
            ratio = np.sqrt(ratio) if train.pos_weight == "sqrt" else ratio
            pw = tuple(round(float(x), 6) for x in np.clip(ratio, 1e-2, 1e3))
        return cls(loss, s, pw, train.asl_gamma_neg, train.asl_gamma_pos, train.asl_clip, train.focal_gamma,
                   train.focal_alpha)  # fmt: skip

    def criterion(self) -> nn.Module:
        """The training loss: ``(logits (B, K), targets (B, K)) -> scalar`` (summed over classes, batch mean)."""
        return MULTILABEL_LOSSES[self.loss](self)

    def eval_criterion(self) -> nn.Module:
        """The loss reported on validation/test data: the training loss without label smoothing."""
        return MULTILABEL_LOSSES[self.loss](dataclasses.replace(self, label_smoothing=0.0))

    def probs(self, logits: torch.Tensor, temperature: Calib = 1.0, bias: Any = None) -> torch.Tensor:
        """(N, K) logits -> (N, K) calibrated probabilities ``sigmoid(logits / T + b)``; ``temperature`` and
        ``bias`` are one value or (K,) (Platt scaling per class)."""
        z = logits.float() / _vec(temperature, logits)
        if bias is not None:
            z = z + _vec(bias, logits)
        return z.sigmoid()

    def decide(self, probs: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        """(N, K) probabilities -> (N, K) bool label sets by ``decision`` (default: threshold 0.5)."""
        d = decision or Decision()
        if d.rule == "top_k":
            k = min(d.top_k, probs.shape[-1])
            out = torch.zeros_like(probs, dtype=torch.bool)
            return out.scatter_(-1, probs.topk(k, dim=-1).indices, True)
        return probs >= _vec(d.thresholds, probs)

    def confidence(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> (N,) the largest per-label probability (drift monitoring)."""
        return probs.max(-1).values

    def class_rates(self, probs: torch.Tensor, decision: Decision | None = None) -> torch.Tensor:
        """(N, K) probabilities -> (K,) share of the N images whose decided label set holds each label (the
        per-label positive rates; they need not sum to 1); drift monitoring compares them by per-label PSI."""
        return self.decide(probs, decision).double().mean(0) if len(probs) else torch.zeros(probs.shape[-1])

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor, names: list[str], *, loss: Any = None,
                probs: torch.Tensor | None = None, decision: Decision | None = None) -> dict[str, Any]:  # fmt: skip
        """``train.metrics.multilabel_metrics`` of (N, K) ``probs`` (default ``sigmoid(logits)``) against (N, K)
        0/1 targets, decided by ``decision`` (default threshold 0.5); ``loss`` on the logits."""
        from .metrics import multilabel_metrics

        logits = logits.float()
        p = logits.sigmoid() if probs is None else probs
        d = decision or Decision()
        lv = float(loss(logits, targets.float())) if loss is not None and len(targets) else None
        return multilabel_metrics(p, targets, names, decided=self.decide(p, d), loss=lv, at_k=self.at_k)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **_listed(asdict(self))}


def _check_per_class(task: Any, names: tuple[str, ...], num_classes: int) -> None:
    """ImgclfError naming the field when a per-class setting of ``task`` has not ``num_classes`` values."""
    for name in names:
        v = getattr(task, name)
        if isinstance(v, tuple) and len(v) != num_classes:
            raise ImgclfError(f"train.{name} has {len(v)} values for {num_classes} classes (one per class, in "
                              "class-name order, or a single value)")  # fmt: skip


def _vec(v: Any, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(v, int | float):
        return float(v)
    return torch.as_tensor(v, dtype=torch.float32, device=like.device)


Task = SingleLabelTask | MultiLabelTask


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
TASKS: dict[str, type] = {SingleLabelTask.kind: SingleLabelTask, MultiLabelTask.kind: MultiLabelTask}


def task_from_json(doc: dict[str, Any] | None) -> Task:
    """The task stored in an artifact (None: a run saved before tasks were recorded: single-label CE)."""
    if doc is None:
        return SingleLabelTask()
    doc = dict(doc)
    kind = doc.pop("kind", SingleLabelTask.kind)
    if kind not in TASKS:
        raise ImgclfError(f"task kind {kind!r} is not known to this imgclf (known: {', '.join(TASKS)}); upgrade it")
    fields = TASKS[kind].__dataclass_fields__
    return TASKS[kind](**{k: v for k, v in doc.items() if k in fields})


def task_for_config(train: Any, samples: Any) -> Task:
    """The task of a training job: multi-label when the training ``samples`` (``data.sources.Samples``) hold
    (N, K) label sets, else single-label; settings from ``train`` (``config.TrainConfig``), checked against the
    classes, and ``train.metric`` checked against the task (ImgclfError naming the field)."""
    k = len(samples.class_names)
    if getattr(samples, "multi_label", False):
        if train.loss in ("logit_adjusted", "balanced_softmax") or train.class_weights != "none":
            raise ImgclfError("train.loss logit_adjusted / balanced_softmax and train.class_weights are for "
                              "single-label data; label sets are weighted by --train.pos_weight")  # fmt: skip
        task: Task = MultiLabelTask.from_config(train, samples.class_counts(usable=True), len(samples))
    else:
        if train.pos_weight != "none":
            raise ImgclfError("train.pos_weight applies to multi-label data (single-label data: use "
                              "--train.loss focal with --train.focal_alpha)")  # fmt: skip
        if train.loss in MULTILABEL_LOSSES and train.loss not in LOSSES:
            raise ImgclfError(f"train.loss {train.loss} is for multi-label data; single-label data trains with "
                              f"{', '.join(LOSSES)}")  # fmt: skip
        task = SingleLabelTask.from_config(train, samples.class_counts(usable=True))
    task.check(k)
    metric_of(task, train.metric)
    return task


def check_trust(trust: Any, task: Task) -> None:
    """ImgclfError before training when a ``config.TrustConfig`` setting does not apply to ``task`` (the
    multi-label calibration method and decision rules on single-label data)."""
    if task.multi_label:
        return
    if trust.calibration_method == "platt":
        raise ImgclfError("trust.calibration_method platt applies to multi-label data (single-label runs fit one "
                          "temperature)")  # fmt: skip
    if trust.threshold != "f1":
        raise ImgclfError(f"trust.threshold {trust.threshold} applies to multi-label data (single-label runs "
                          "decide by the most probable class)")  # fmt: skip


def metric_of(task: Task, metric: str) -> str:
    """``train.metric`` resolved for ``task`` (``auto``: the task's default); ImgclfError when the task does not
    compute it."""
    m = task.default_metric if metric == "auto" else metric
    if m not in task.selection_metrics:
        kind = task.kind.replace("_", "-")
        raise ImgclfError(f"train.metric {m} does not apply to {kind} data (choose from: "
                          f"{', '.join(task.selection_metrics)})")  # fmt: skip
    return m
