"""Knowledge distillation (``imgclf train --teacher RUN``): the loss terms against hand-computed values, the
teacher's preprocessing of the student's batch, projector and stage shapes, the teacher left untouched, the
artifact's record, and the one-line refusals before training."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import imgclf.models.smallcnn  # noqa: F401 - registers simplecnn_*
from imgclf.artifact import Artifact
from imgclf.config import DistillConfig
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ImgclfError
from imgclf.train.distill import (
    Distiller,
    DistillModule,
    Teacher,
    _check_shapes,
    attention_kd,
    attention_map,
    class_order,
    hard_kd,
    logit_kd,
)
from tests.conftest import TINY, make_folder, make_multilabel_csv, run_cli

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _pre(size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear") -> Preprocess:
    return Preprocess((3, size, size), interpolation, mean, std, 1.0)


def _teacher(arch: str, size: int, student: Preprocess, features: bool = False, k: int = 3, **art_kw) -> Teacher:
    """A real (untrained) timm model wrapped as a teacher with an artifact describing it."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=k, **({"img_size": size} if "vit" in arch else {}))
    art = Artifact(arch, [f"class_{i}" for i in range(k)], _pre(size, *IMAGENET, interpolation="bicubic"), **art_kw)
    return Teacher(model.eval(), art, student, list(range(k)), features)


# ------------------------------------------------------------------------------------------ loss terms


@pytest.mark.unit
def test_logit_kd_is_the_kl_at_temperature_times_t_squared():
    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 4), torch.randn(5, 4), 4.0
    ps, pt = np.exp(s.numpy() / temp), np.exp(t.numpy() / temp)
    ps, pt = ps / ps.sum(1, keepdims=True), pt / pt.sum(1, keepdims=True)
    by_hand = (pt * np.log(pt / ps)).sum(1).mean() * temp**2  # Hinton et al.: KL(teacher || student) x T^2
    assert float(logit_kd(s, t, temp, multi_label=False)) == pytest.approx(by_hand, rel=1e-5)
    # sigmoid KD: each class's Bernoulli KL, averaged over batch and classes
    qs, qt = 1 / (1 + np.exp(-s.numpy() / temp)), 1 / (1 + np.exp(-t.numpy() / temp))
    bern = qt * np.log(qt / qs) + (1 - qt) * np.log((1 - qt) / (1 - qs))
    assert float(logit_kd(s, t, temp, multi_label=True)) == pytest.approx(bern.mean() * temp**2, rel=1e-5)
    assert float(logit_kd(t, t, temp, multi_label=False)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.unit
def test_hard_kd_is_cross_entropy_on_the_teachers_top1():
    s, t = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(hard_kd(s, t, False)) == pytest.approx(float(F.cross_entropy(s, torch.tensor([0, 2]))))
    bce = F.binary_cross_entropy_with_logits(s, (t > 0).float())
    assert float(hard_kd(s, t, True)) == pytest.approx(float(bce))


@pytest.mark.unit
def test_attention_transfer_follows_zagoruyko_and_komodakis():
    torch.manual_seed(0)
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8)
    q = a.pow(2).mean(1).view(2, -1)
    assert torch.allclose(attention_map(a), q / q.norm(dim=1, keepdim=True))
    pooled = F.adaptive_avg_pool2d(b.pow(2).mean(1, keepdim=True), (4, 4)).flatten(1)  # teacher map at 4x4
    by_hand = (attention_map(a) - pooled / pooled.norm(dim=1, keepdim=True)).pow(2).mean()
    assert float(attention_kd([a], [b])) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(attention_kd([a, a], [b, a])) == pytest.approx(float(by_hand), rel=1e-5)  # same maps add 0


@pytest.mark.unit
def test_classes_match_by_name_and_a_mismatch_names_the_difference():
    assert class_order([" Cat", "DOG"], ["dog", "cat"], "t") == [1, 0]
    with pytest.raises(ImgclfError, match=r"teacher runs/t: its classes are not the data's \(missing 'bird'; not in"):
        class_order(["cat", "dog"], ["cat", "bird"], "runs/t")


@pytest.mark.unit
def test_config_rejects_bad_terms_in_one_line():
    assert DistillConfig(methods="logit+feature").terms == ["logit", "feature"]
    for bad, said in [("logit+logit", "each once"), ("logit+hard", "logit or hard, not both"), ("soft", "terms of")]:
        with pytest.raises(ImgclfError, match=said):
            DistillConfig(methods=bad)


# ------------------------------------------------------------------------------------------ teachers


@pytest.mark.unit
def test_the_teacher_sees_the_same_pixels_its_own_way():
    student = _pre(28)
    x = torch.rand(2, 3, 28, 28) * 2 - 1  # normalised by the student's (0.5, 0.5)
    px = x * 0.5 + 0.5
    same_size = _teacher("test_efficientnet", 28, student)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    assert torch.allclose(same_size.inputs(x), (px - mean) / std, atol=1e-6)
    bigger = _teacher("test_efficientnet", 40, student)
    want = (F.interpolate(px, size=(40, 40), mode="bicubic", align_corners=False, antialias=True) - mean) / std
    assert torch.allclose(bigger.inputs(x), want, atol=1e-6)


@pytest.mark.unit
def test_an_ensemble_averages_calibrated_probabilities():
    student = _pre(28)
    t1 = _teacher("test_efficientnet", 28, student, calibration={"temperature": 2.0})
    t2 = _teacher("test_resnet", 32, student)
    d = Distiller(DistillConfig(teachers=["a", "b"]), [t1, t2], multi_label=False)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        z1, z2 = t1.model(t1.inputs(x)) / 2.0, t2.model(t2.inputs(x))
        mean_p = (z1.softmax(-1) + z2.softmax(-1)) / 2
    assert torch.allclose(d.targets(x).logits.softmax(-1), mean_p, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize(("student_arch", "teacher_arch", "dims"), [
    ("test_resnet", "test_efficientnet", (96, 256)),  # CNN -> CNN
    ("simplecnn_s", "test_vit", (256, 64)),  # ViT -> CNN
])  # fmt: skip
def test_the_feature_projector_maps_student_to_teacher_features(student_arch, teacher_arch, dims):
    student_pre = _pre(32)
    student = timm.create_model(student_arch, num_classes=3)
    teacher = _teacher(teacher_arch, 32, student_pre, features=True)
    d = Distiller(DistillConfig(teachers=["t"], methods="logit+feature"), [teacher], False, identities=[{"run": "t"}])
    _check_shapes(d, student, student_pre)
    assert (d.projector.in_features, d.projector.out_features) == dims
    assert d.student_tap is None and not student._forward_hooks  # the check leaves no hooks behind


@pytest.mark.unit
def test_attention_needs_cnn_stages_on_both_sides():
    student_pre = _pre(32)
    student = timm.create_model("test_resnet", num_classes=3)
    cnn = Distiller(DistillConfig(teachers=["t"], methods="logit+attention"),
                    [_teacher("test_efficientnet", 32, student_pre)], False, identities=[{"run": "t"}])  # fmt: skip
    _check_shapes(cnn, student, student_pre)
    vit = Distiller(DistillConfig(teachers=["t"], methods="attention"), [_teacher("test_vit", 32, student_pre)],
                    False, identities=[{"run": "runs/vit"}])  # fmt: skip
    with pytest.raises(ImgclfError, match=r"teacher runs/vit's are \[\(2, 5, 64\)"):
        _check_shapes(vit, student, student_pre)


@pytest.mark.unit
def test_the_teacher_output_cache_returns_the_teachers_own_answer_for_a_view_seen_before():
    from imgclf.train.distill import TeacherCache

    pre = _pre(32)
    teacher = _teacher("test_efficientnet", 32, pre, features=True)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    d = Distiller(DistillConfig(teachers=["t"], methods="logit+feature"), [teacher], False, identities=[{"run": "t"}])
    d.cache = TeacherCache("on", n_train=8, max_mb=1)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    first = d.targets(x)
    again = d.targets(x.clone())
    assert len(calls) == 1  # the second pass reads the cache
    assert torch.equal(first.logits, again.logits) and torch.equal(first.features, again.features)
    y = x.clone()
    y[2, 0, 5, 5] += 1e-3  # one pixel of one view differs: a new key, the teacher runs again
    changed = d.targets(y)
    assert len(calls) == 2 and not torch.equal(changed.logits[2], first.logits[2])
    # auto: after two passes over the training views with (nearly) no hits, it switches itself off
    d.cache = TeacherCache("auto", n_train=8, max_mb=1)
    for _ in range(4):
        d.targets(torch.randn(4, 3, 32, 32))  # random augmentation: every view new
    assert not d.cache.active and not d.cache.entries
    d.cache = TeacherCache("auto", n_train=8, max_mb=1)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    for _ in range(3):
        for v in views:  # deterministic augmentation: the same 8 views every epoch
            d.targets(v)
    assert d.cache.active and d.cache.mode == "on" and len(d.cache.entries) == 8 and d.cache.hits == 16
    full = TeacherCache("on", n_train=8, max_mb=0)  # the memory budget holds nothing: never stored, always computed
    full.put(full.keys(x), first)
    assert not full.entries


@pytest.mark.unit
def test_training_steps_leave_the_teacher_untouched_and_without_gradients():
    student_pre = _pre(32)
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=3)
    teacher = _teacher("test_efficientnet", 40, student_pre, features=True)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    d = Distiller(DistillConfig(teachers=["t"], methods="logit+feature+attention"), [teacher], False,
                  identities=[{"run": "t"}])  # fmt: skip
    _check_shapes(d, student, student_pre)
    d.tap(student)
    module = DistillModule(student, torch.nn.CrossEntropyLoss(), d)
    opt = torch.optim.SGD([*student.parameters(), *d.projector.parameters()], lr=0.1)
    student.train()
    for _ in range(2):
        loss, logits = module(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logits.shape == (4, 3) and math.isfinite(float(loss.detach()))
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training  # BatchNorm statistics not updated either
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    assert d.projector.weight.grad is not None and student.fc.weight.grad is not None
    assert "projector.weight" in dict(module.named_parameters()) and "teacher" not in str(list(module.state_dict()))


# ------------------------------------------------------------------------------------------ end to end


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.cli
def test_train_with_a_teacher_records_it_and_compares_student_and_teacher(tmp_path, tiny_run, tiny_folder,
                                                                          tiny_test_folder):  # fmt: skip
    weights = _sha(tiny_run / "model.safetensors")
    r = run_cli("train", "--data", tiny_folder, "--test-data", tiny_test_folder, "--teacher", tiny_run,
                "--distill.methods", "logit+feature+attention", "--epochs", "2", "--output", tmp_path, "--name", "kd",
                *TINY, "--model", "test_resnet", "--input-size", "28")  # fmt: skip
    assert r.code == 0, r
    assert _sha(tiny_run / "model.safetensors") == weights
    art = json.loads((tmp_path / "kd" / "imgclf.json").read_text())
    t = art["distill"]["teachers"][0]
    assert t["run"] == str(tiny_run) and t["arch"] == "test_efficientnet" and len(t["content_key"]) >= 16
    assert art["distill"]["methods"] == "logit+feature+attention" and art["distill"]["temperature"] == 4.0
    row = art["metrics"]["teachers"][0]  # the teacher on this run's images, its own preprocessing
    assert row["val"]["top1"] > 0.5 and 0 <= row["test"]["top1"] <= 1 and row["params"] > 0
    assert "distillation" in r.out and "student (this run)" in r.out and "test_efficientnet" in r.out
    report = (tmp_path / "kd" / "report.html").read_text()
    assert "Student vs teacher" in report and 'href="#distillation"' in report
    r = run_cli("eval", tmp_path / "kd", "--data", tiny_test_folder, "--no-progress", "--workers", "0")
    assert r.code == 0, r  # the student stands alone: no teacher needed after training


@pytest.mark.cli
def test_bad_teachers_are_one_line_errors_before_training(tmp_path, tiny_run):
    two = make_folder(tmp_path / "two", n_per_class=6, classes=2)
    cases = [
        (two, [tiny_run], "its classes are not the data's (not in the data 'class_2')"),
        (two, [tmp_path], "not a trained run directory (no imgclf.json)"),
    ]
    support = make_folder(tmp_path / "support", n_per_class=3, classes=3, seed=3)
    r = run_cli("knn", "build", support, "--name", "idx", "--output", tmp_path / "runs", "--model", "test_efficientnet",
                "--weights", "none", "--input-size", "32", "--workers", "0", "--no-progress")  # fmt: skip
    assert r.code == 0, r
    cases.append((support, [tmp_path / "runs" / "idx"], "a k-NN index cannot teach"))
    ml_csv = make_multilabel_csv(tmp_path / "ml", n=24)
    r = run_cli("train", "--data", ml_csv, "--epochs", "1", "--output", tmp_path / "runs", "--name", "ml", *TINY)
    assert r.code == 0, r
    cases.append((support, [tmp_path / "runs" / "ml"], "is multi-label, the data single-label"))
    cases.append((support, [tiny_run, tiny_run], "feature and attention take one teacher"))
    for data, teachers, said in cases:
        extra = ["--distill.methods", "logit+feature"] if len(teachers) > 1 else []
        r = run_cli("train", "--data", data, "--teacher", *teachers, *extra, "--epochs", "1", "--output",
                    tmp_path / "out", *TINY)  # fmt: skip
        assert r.code != 0 and said in r.err and "Traceback" not in r.err, (said, r)
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("model.safetensors"))


class _Killed(Exception):
    pass


@pytest.mark.cli
def test_a_distilled_run_resumes_exactly_projector_included(tmp_path, tiny_run, monkeypatch):
    import imgclf.train.trainer as trainer_mod
    from imgclf.api import make_config, resume_config, train

    data = make_folder(tmp_path / "d", 12, 3, seed=4)
    over = {"model.name": "test_resnet", "model.weights": "none", "data.input_size": 28, "data.batch_size": 8,
            "data.num_workers": 0, "run.progress": False, "train.epochs": 3, "optim.lr": 0.01,
            "run.output": str(tmp_path / "runs"), "distill.teachers": [str(tiny_run)],
            "distill.methods": "logit+feature"}  # fmt: skip
    full = train(make_config(data, overrides={**over, "run.name": "full"}))
    real_save = trainer_mod._save

    def save_then_die(run_dir, loop, state):
        real_save(run_dir, loop, state)
        if state.epoch == 2:
            raise _Killed

    monkeypatch.setattr(trainer_mod, "_save", save_then_die)
    with pytest.raises(_Killed):
        train(make_config(data, overrides={**over, "run.name": "killed"}))
    monkeypatch.setattr(trainer_mod, "_save", real_save)
    resumed = train(resume_config(tmp_path / "runs", "killed"), resume=True)
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5) and a["val_loss"] == pytest.approx(
            b["val_loss"], abs=1e-5
        ), (a, b)
