"""Transfer strategies: what each one freezes, its optimizer groups, LLRD, MixUp/CutMix, schedules, augmentation."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import imgclf.models.smallcnn  # noqa: F401 - registers simplecnn_*
from imgclf.config import AugmentConfig, Config, SchedConfig
from imgclf.data.loader import ImageDataset, make_loader
from imgclf.data.preprocess import Preprocess
from imgclf.data.sources import Samples
from imgclf.dist import Dist
from imgclf.models.transfer import head_names, layer_scales, stage_groups
from imgclf.train.loop import set_train_mode
from imgclf.train.optim import build_optimizer, build_scheduler
from imgclf.train.strategy import phase_at, plan
from imgclf.train.trainer import build_loop, enter_phase

MODELS = ["test_efficientnet", "test_vit", "test_convnext", "simplecnn_s"]


def _loop(arch: str, strategy: str, **transfer):
    cfg = Config()
    cfg.model.name, cfg.model.weights = arch, "auto"  # not "none": discriminative rates apply
    cfg.transfer.strategy = strategy
    cfg.probe.solver = "sgd"  # the uncached probe (through the training loop) trains its head with optim.*
    cfg.train.epochs = 5
    for k, v in transfer.items():
        setattr(cfg.transfer, k, v)
    model = timm.create_model(arch, num_classes=3)
    return build_loop(cfg, Dist(torch.device("cpu")), model, updates_per_epoch=4, num_classes=3), cfg


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _in_optimizer(loop) -> set[str]:
    ids = {id(p) for g in loop.opt.param_groups for p in g["params"]}
    return {n for n, p in loop.model.named_parameters() if id(p) in ids}


def _scale_of(loop) -> dict[str, float]:
    by_id = {id(p): g["lr_scale"] for g in loop.opt.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in loop.model.named_parameters() if id(p) in by_id}


def _bn_training(loop) -> list[bool]:
    set_train_mode(loop)
    return [m.training for m in loop.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("arch", MODELS)
def test_finetune_trains_everything_with_a_slower_backbone(arch):
    loop, _ = _loop(arch, "finetune", backbone_lr_scale=0.1)
    every = {n for n, _ in loop.model.named_parameters()}
    assert _trainable(loop.model) == every == _in_optimizer(loop)
    scales = _scale_of(loop)
    head = head_names(loop.model)
    assert all(scales[n] == 1.0 for n in head)
    assert all(scales[n] == pytest.approx(0.1) for n in every - head)
    loop.sched.step_update(4)  # after warmup: the head at optim.lr, the backbone at a tenth
    lrs = sorted({g["lr"] for g in loop.opt.param_groups})
    assert lrs == pytest.approx([0.1 * loop.cfg.optim.lr, loop.cfg.optim.lr])


@pytest.mark.parametrize("arch", MODELS)
def test_freeze_stages_freezes_the_stem_and_first_k_stages(arch):
    loop, _ = _loop(arch, "finetune", freeze_stages=1)
    groups = stage_groups(loop.model)
    frozen = set(groups[0]) | set(groups[1])
    trainable = _trainable(loop.model)
    assert not (frozen & trainable) and not (frozen & _in_optimizer(loop))
    assert trainable == {n for n, _ in loop.model.named_parameters()} - frozen
    # BatchNorm layers whose parameters are frozen (and only those) stay in eval mode during training
    _bn_training(loop)
    for name, m in loop.model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            assert (m in loop.frozen) == (f"{name}.weight" in frozen) == (not m.training)


@pytest.mark.parametrize("arch", MODELS)
def test_staged_trains_the_head_then_unfreezes(arch):
    loop, cfg = _loop(arch, "staged", head_epochs=2, unfreeze_stages=None, backbone_lr_scale=0.05)
    head = head_names(loop.model)
    assert _trainable(loop.model) == head == _in_optimizer(loop)
    assert not any(_bn_training(loop))  # backbone BatchNorm statistics frozen while only the head trains
    phases = plan(cfg)
    assert [(p.name, p.start, p.end) for p in phases] == [("head", 0, 2), ("unfrozen", 2, 5)]
    enter_phase(loop, phase_at(phases, 2))
    every = {n for n, _ in loop.model.named_parameters()}
    assert _trainable(loop.model) == every == _in_optimizer(loop)
    assert all(_bn_training(loop))
    scales = _scale_of(loop)
    assert all(scales[n] == pytest.approx(0.05) for n in every - head)


@pytest.mark.parametrize("arch", MODELS)
def test_staged_can_unfreeze_only_the_top_stages(arch):
    loop, cfg = _loop(arch, "staged", head_epochs=1, unfreeze_stages=1)
    enter_phase(loop, phase_at(plan(cfg), 1))
    top = set(stage_groups(loop.model)[-1])
    assert _trainable(loop.model) == top | head_names(loop.model) == _in_optimizer(loop)


@pytest.mark.parametrize("arch", MODELS)
def test_probe_trains_only_the_head_and_scratch_everything_at_one_rate(arch):
    loop, _ = _loop(arch, "probe")
    assert _trainable(loop.model) == head_names(loop.model) == _in_optimizer(loop)
    assert not any(_bn_training(loop))
    loop, _ = _loop(arch, "scratch")
    assert set(_scale_of(loop).values()) == {1.0}
    assert _trainable(loop.model) == {n for n, _ in loop.model.named_parameters()}


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "test_vit", "test_convnext"])
def test_layer_decay_gives_smaller_rates_towards_the_stem(arch):
    model = timm.create_model(arch, num_classes=3)
    scales = layer_scales(model, 0.75)
    order = [n for g in stage_groups(model) for n in g]  # forward order, stem first
    seq = [scales[n] for n in order]
    assert all(a <= b for a, b in zip(seq, seq[1:]))  # monotonically non-decreasing towards the head
    assert seq[0] < seq[-1] <= 1.0
    assert all(scales[n] == 1.0 for n in head_names(model))
    # and the optimizer really runs them at those rates
    loop, _ = _loop(arch, "finetune", layer_decay=0.75, backbone_lr_scale=1.0)
    loop.sched.step_update(4)
    lr_of = {id(p): g["lr"] for g in loop.opt.param_groups for p in g["params"]}
    params = dict(loop.model.named_parameters())
    lrs = [lr_of[id(params[n])] for n in order]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(lrs, lrs[1:])) and lrs[0] < lrs[-1]


def test_mixup_cutmix_targets_are_distributions_and_mix():
    loop, _ = _loop("test_resnet", "finetune")
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=3)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    seen_mixed = False
    for _ in range(10):
        xm, ym = mix(x.clone(), y.clone())
        assert ym.shape == (8, 3) and torch.allclose(ym.sum(1), torch.ones(8))
        assert (ym >= 0).all()
        seen_mixed |= bool(((ym > 0.05) & (ym < 0.9)).sum(1).ge(2).any())
    assert seen_mixed
    loss, _ = loop.wrapped(x, ym)  # the task takes soft targets
    assert torch.isfinite(loss)


def test_training_mixes_batches_and_stops_mixing_for_the_last_epochs(tmp_path, tiny_folder, monkeypatch):
    """Through imgclf's loop: soft (B, K) targets summing to 1 while mixing, hard labels in the final epoch."""
    from imgclf.train import tasks as task_mod

    from .conftest import TINY, run_cli

    seen = []
    real = task_mod.TaskModule.forward

    def spy(self, images, targets):
        if self.training:
            seen.append(
                (
                    targets.ndim,
                    bool(torch.allclose(targets.sum(1), torch.ones(len(targets)))) if targets.ndim == 2 else None,
                )
            )
        return real(self, images, targets)

    monkeypatch.setattr(task_mod.TaskModule, "forward", spy)
    r = run_cli("train", "--data", tiny_folder, "--epochs", "3", "--output", tmp_path, "--name", "m", *TINY,
                "--aug.mixup", "0.4", "--aug.cutmix", "1.0", "--aug.mix_off_epochs", "1")  # fmt: skip
    assert r.code == 0, r
    per_epoch = len(seen) // 3
    assert per_epoch >= 2
    assert all(nd == 2 and sums for nd, sums in seen[: 2 * per_epoch])  # epochs 1-2: mixed soft targets
    assert all(nd == 1 for nd, _ in seen[2 * per_epoch :])  # epoch 3: MixUp/CutMix off


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer steps in this schedule-only test
def test_onecycle_and_restarts_schedules():
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, Config().optim)
    sched = build_scheduler(opt, SchedConfig(name="onecycle", warmup_epochs=1, warmup_lr_ratio=0.04), 10, 5)
    lrs = []
    for i in range(51):
        sched.step_update(i)
        lrs.append(opt.param_groups[0]["lr"])
    peak = max(range(51), key=lambda i: lrs[i])
    assert lrs[0] == pytest.approx(4e-5, rel=1e-3) and 9 <= peak <= 11 and lrs[peak] == pytest.approx(1e-3, rel=1e-2)
    assert lrs[-1] == pytest.approx(1e-5)  # lr x min_lr_ratio
    opt = build_optimizer(model, Config().optim)
    sched = build_scheduler(opt, SchedConfig(name="cosine_restarts", warmup_epochs=0, cycles=3), 10, 6)
    lrs = []
    for i in range(60):
        sched.step_update(i)
        lrs.append(opt.param_groups[0]["lr"])
    restarts = [i for i in range(1, 60) if lrs[i] > lrs[i - 1] * 1.5]
    assert restarts == [20, 40]


def test_augmentation_options_build_the_expected_pipeline():
    pre = Preprocess((3, 32, 32), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0)
    aug = AugmentConfig(rotation=10, translate=0.1, shear=5, perspective=0.2, auto_augment="trivialaugment",
                        grayscale=0.1, re_prob=0.25, color_jitter=0.3)  # fmt: skip
    names = [type(t).__name__ for t in pre.train(aug).transforms]
    for want in ("RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandomAffine", "RandomPerspective",
                 "TrivialAugmentWide", "RandomErasing", "Normalize"):  # fmt: skip
        assert want in names, names
    for spec, op in [("rand-m9-n2-mstd0.5", "RandAugment"), ("augmix-m5-w4-d2", "AugMixAugment"),
                     ("original", "AutoAugment")]:  # fmt: skip
        t = pre.train(AugmentConfig(auto_augment=spec))
        assert op in [type(x).__name__ for x in t.transforms]
        assert t(Image.new("RGB", (40, 30), (90, 20, 200))).shape == (3, 32, 32)


def test_repeated_augmentation_repeats_each_image():
    s = Samples(list(range(12)), torch.zeros(12, dtype=torch.long).numpy(), ["a"], "arr",
                torch.zeros(12, 8, 8, 3, dtype=torch.uint8).numpy())  # fmt: skip
    loader = make_loader(ImageDataset(s, lambda im: torch.zeros(1)), 3, train=True, num_workers=0, repeats=3)
    loader.sampler.set_epoch(1)
    order = [int(i) for b in loader for i in b.indices]
    assert len(order) == 12
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 12, 3))


def test_uncached_probe_refuses_lbfgs_and_scratch_refuses_freezing():
    from imgclf.errors import ImgclfError

    cfg = Config()
    cfg.transfer.strategy = "probe"
    with pytest.raises(ImgclfError, match="set probe.solver sgd"):
        plan(cfg)
    cfg.transfer.strategy, cfg.transfer.freeze_stages = "scratch", 1
    with pytest.raises(ImgclfError, match="freeze random weights"):
        plan(cfg)


def test_unfreezing_more_stages_than_exist_unfreezes_all():
    loop, cfg = _loop("test_resnet", "staged", head_epochs=1, unfreeze_stages=99)
    enter_phase(loop, phase_at(plan(cfg), 1))
    assert _trainable(loop.model) == {n for n, _ in loop.model.named_parameters()}
