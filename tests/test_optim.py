"""Unit: optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import pytest
import timm

from imgclf.config import OptimConfig, SchedConfig
from imgclf.train.optim import build_optimizer, build_scheduler


def test_weight_decay_skips_norms_and_biases():
    model = timm.create_model("test_resnet", num_classes=3)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    by_wd = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(by_wd) == {0.0, 0.05}
    assert all(p.ndim <= 1 for p in by_wd[0.0]) and all(p.ndim > 1 for p in by_wd[0.05])


@pytest.mark.parametrize(("nesterov", "expected"), [(True, True), (False, False)])
def test_sgd_momentum_and_nesterov(nesterov, expected):
    model = timm.create_model("test_resnet", num_classes=3)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.8, nesterov=nesterov))
    g = opt.param_groups[0]
    assert g["momentum"] == 0.8 and g["nesterov"] is expected


def test_cosine_with_warmup_hits_its_endpoints():
    model = timm.create_model("test_resnet", num_classes=3)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    per_epoch, epochs = 10, 5
    sched = build_scheduler(
        opt, SchedConfig(warmup_epochs=1, warmup_lr_ratio=0.01, min_lr_ratio=0.01), per_epoch, epochs
    )
    lrs = []
    for step in range(per_epoch * epochs + 1):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-5)  # warmup start
    assert lrs[per_epoch] == pytest.approx(1e-3)  # peak right after warmup
    assert all(a >= b for a, b in zip(lrs[per_epoch:], lrs[per_epoch + 1 :]))  # cosine only decreases
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-3)  # ends at lr * min_lr_ratio
