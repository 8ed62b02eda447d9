"""The task seam: losses by name, the task recorded in the artifact, every stage asking it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgclf.errors import ImgclfError
from imgclf.train.losses import CrossEntropyLoss, FocalLoss
from imgclf.train.tasks import SingleLabelTask, task_from_json

from .conftest import TINY, run_cli


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.unit
def test_focal_loss_matches_the_hand_computed_value():
    z, gamma = [1.0, 0.0, -1.0], 2.0
    p = _softmax(z)  # p0 = e / (e + 1 + 1/e) = 0.665241
    assert p[0] == pytest.approx(0.665241, abs=1e-6)
    by_hand = -((1 - p[0]) ** gamma) * math.log(p[0])  # 0.045678
    assert by_hand == pytest.approx(0.045678, abs=1e-6)
    x, y = torch.tensor([z]), torch.tensor([0])
    assert float(FocalLoss(gamma)(x, y)) == pytest.approx(by_hand, rel=1e-5)
    assert float(FocalLoss(gamma, alpha=[0.25, 1.0, 1.0])(x, y)) == pytest.approx(0.25 * by_hand, rel=1e-5)
    assert float(FocalLoss(gamma, alpha=0.5)(x, y)) == pytest.approx(0.5 * by_hand, rel=1e-5)
    s = 0.1  # label smoothing: y = (1 - s) onehot + s / K
    ys = [(1 - s) + s / 3, s / 3, s / 3]
    smooth = sum(-ys[k] * (1 - p[k]) ** gamma * math.log(p[k]) for k in range(3))
    assert float(FocalLoss(gamma, label_smoothing=s)(x, y)) == pytest.approx(smooth, rel=1e-5)
    soft = torch.tensor([[0.6, 0.4, 0.0]])  # MixUp targets are used as they are
    by_hand_soft = sum(-soft[0, k].item() * (1 - p[k]) ** gamma * math.log(p[k]) for k in range(3))
    assert float(FocalLoss(gamma, label_smoothing=s)(x, soft)) == pytest.approx(by_hand_soft, rel=1e-5)


@pytest.mark.unit
def test_gamma_zero_is_cross_entropy_and_ce_matches_torch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    for s in (0.0, 0.1):
        ref = F.cross_entropy(x, y, label_smoothing=s)
        assert float(FocalLoss(0.0, label_smoothing=s)(x, y)) == pytest.approx(float(ref), rel=1e-5)
        assert float(CrossEntropyLoss(s)(x, y)) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="3 values for 5 classes"):
        FocalLoss(2.0, alpha=[1, 1, 1])(x, y)


@pytest.mark.unit
def test_task_json_round_trip_and_old_runs():
    t = SingleLabelTask(loss="focal", label_smoothing=0.05, focal_gamma=1.5, focal_alpha=[1.0, 2.0])
    assert task_from_json(json.loads(json.dumps(t.to_json()))) == t
    assert task_from_json(None) == SingleLabelTask()  # a run saved before tasks were recorded
    with pytest.raises(ImgclfError, match="unknown loss 'dice'"):
        SingleLabelTask(loss="dice")
    with pytest.raises(ImgclfError, match="not known to this imgclf"):
        task_from_json({"kind": "segmentation"})


@pytest.mark.cli
def test_training_with_focal_loss_records_the_task_and_reports_its_loss(tmp_path, tiny_folder):
    r = run_cli("train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "f", *TINY,
                "--train.loss", "focal", "--train.focal_gamma", "2", "--train.label_smoothing", "0")  # fmt: skip
    assert r.code == 0, r
    art = json.loads((tmp_path / "f" / "imgclf.json").read_text())
    assert art["task"] == {"kind": "single_label", "loss": "focal", "label_smoothing": 0.0, "focal_gamma": 2.0,
                           "focal_alpha": None, "class_weight": None, "class_prior": None, "la_tau": 1.0}  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(x["train_loss"]) for x in rows)
    r = run_cli("train", "--data", tiny_folder, "--train.loss", "dice", *TINY)
    assert r.code == 2 and "train.loss" in r.err and "Traceback" not in r.err
    r = run_cli("train", "--data", tiny_folder, "--output", tmp_path, "--name", "a2", *TINY, "--train.loss", "focal",
                "--train.focal_alpha", "[1, 2]")  # fmt: skip
    assert r.code == 2 and "2 values for 3 classes" in r.err and not (tmp_path / "a2").exists(), r
    r = run_cli("train", "--data", tiny_folder, *TINY, "--train.loss", "focal", "--train.focal_alpha", "0")
    assert r.code == 2 and "train.focal_alpha" in r.err, r
    r = run_cli("train", "--data", tiny_folder, *TINY, "--train.focal_alpha", "0.5")  # with the default ce loss
    assert r.code == 2 and "applies to train.loss focal only" in r.err, r


@pytest.mark.unit
def test_drift_statistics_ask_the_task_what_a_decision_and_its_confidence_are():
    """Drift's class distribution and confidence come from the run's task (``class_rates``, ``confidence``),
    not from a hard-coded argmax: a task deciding by another rule changes the class statistics."""
    import dataclasses

    import numpy as np

    from imgclf.eval.drift import drift_scores, reference_stats
    from imgclf.train.tasks import SingleLabelTask

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    task = SingleLabelTask()
    assert task.class_rates(torch.from_numpy(probs)).tolist() == [0.5, 0.25, 0.25]
    assert task.confidence(torch.from_numpy(probs)).tolist() == [0.7, 0.8, 0.6, 0.5]
    ref = reference_stats(probs, task=task)
    assert ref["class_dist"] == [0.5, 0.25, 0.25] and ref == reference_stats(probs)  # single-label is the default

    @dataclasses.dataclass(frozen=True)
    class Lowest(SingleLabelTask):  # a stand-in rule: decide for the least likely class
        def decide(self, p: torch.Tensor) -> torch.Tensor:
            return p.argmin(-1)

    assert reference_stats(probs, task=Lowest())["class_dist"] == [0.5, 0.0, 0.5]  # argmin ties: first index
    assert drift_scores(ref, probs, task=Lowest())["psi_class"] > drift_scores(ref, probs)["psi_class"] == 0.0


@pytest.mark.unit
def test_class_weights_match_their_definitions():
    from imgclf.train.losses import class_weights

    n = [100, 10, 1]
    inv = [1 / 100, 1 / 10, 1.0]
    assert class_weights(n, "inverse") == pytest.approx([3 * w / sum(inv) for w in inv])
    sq = [1 / math.sqrt(v) for v in n]
    assert class_weights(n, "sqrt_inverse") == pytest.approx([3 * w / sum(sq) for w in sq])
    beta = 0.99  # Cui et al. 2019: (1 - beta) / (1 - beta^n)
    eff = [(1 - beta) / (1 - beta**v) for v in n]
    assert class_weights(n, "effective", beta) == pytest.approx([3 * w / sum(eff) for w in eff])
    assert class_weights([5, 0, 5], "inverse") == pytest.approx([1.0, 1.0, 1.0])  # absent: the largest other
    with pytest.raises(ValueError, match="unknown class weighting"):
        class_weights(n, "median")


@pytest.mark.unit
def test_weighted_and_logit_adjusted_cross_entropy_match_hand_computed_values():
    x, y = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([0, 2])
    w = [0.5, 1.0, 2.0]
    p = [_softmax(r) for r in x.tolist()]
    by_hand = (0.5 * -math.log(p[0][0]) + 2.0 * -math.log(p[1][2])) / (0.5 + 2.0)  # PyTorch's weighted mean
    assert float(CrossEntropyLoss(weight=w)(x, y)) == pytest.approx(by_hand, rel=1e-6)
    assert float(CrossEntropyLoss(weight=w)(x, F.one_hot(y, 3).float())) == pytest.approx(by_hand, rel=1e-6)
    prior, tau = [0.7, 0.2, 0.1], 1.5  # logit adjustment (Menon et al. 2021): softmax(z + tau log prior)
    adj = [_softmax([v + tau * math.log(q) for v, q in zip(r, prior)]) for r in x.tolist()]
    by_hand = -(math.log(adj[0][0]) + math.log(adj[1][2])) / 2
    t = SingleLabelTask(loss="logit_adjusted", label_smoothing=0.0, class_prior=prior, la_tau=tau)
    assert float(t.criterion()(x, y)) == pytest.approx(by_hand, rel=1e-6)
    bs = SingleLabelTask(loss="balanced_softmax", class_prior=prior, la_tau=tau)  # tau is 1 for balanced softmax
    one = [_softmax([v + math.log(q) for v, q in zip(r, prior)]) for r in x.tolist()]
    assert float(bs.criterion()(x, y)) == pytest.approx(-(math.log(one[0][0]) + math.log(one[1][2])) / 2, rel=1e-6)
    # focal with class weights: alpha_k = focal_alpha x class weight
    f = SingleLabelTask(loss="focal", label_smoothing=0.0, focal_gamma=2.0, focal_alpha=0.5, class_weight=w)
    ref = FocalLoss(2.0, [0.25, 0.5, 1.0])(x, y)
    assert float(f.criterion()(x, y)) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.unit
def test_task_from_config_resolves_weights_and_priors_from_training_counts():
    from imgclf.config import TrainConfig
    from imgclf.train.tasks import task_for_config

    counts = np.array([300, 30, 3])
    samples = type("S", (), {"multi_label": False, "class_names": ["a", "b", "c"],
                             "class_counts": lambda self, usable=False: counts})()  # fmt: skip
    t = task_for_config(TrainConfig(loss="logit_adjusted", class_weights="inverse", la_tau=0.5), samples)
    assert t.class_prior == pytest.approx([300 / 333, 30 / 333, 3 / 333], rel=1e-6)
    assert t.class_weight == pytest.approx([3 * (1 / 300) / (1 / 300 + 1 / 30 + 1 / 3), 3 * (1 / 30) / (1 / 300 + 1 / 30
                                            + 1 / 3), 3 * (1 / 3) / (1 / 300 + 1 / 30 + 1 / 3)], rel=1e-5)  # fmt: skip
    assert t.la_tau == 0.5 and task_from_json(json.loads(json.dumps(t.to_json()))) == t
    plain = task_for_config(TrainConfig(), samples)
    assert plain == SingleLabelTask("ce", 0.1) and plain.class_weight is None and plain.class_prior is None
    ml = type("S", (), {"multi_label": True, "class_names": ["a", "b"], "__len__": lambda self: 4,
                        "class_counts": lambda self, usable=False: np.array([1, 3])})()  # fmt: skip
    with pytest.raises(ImgclfError, match="label sets are weighted by --train.pos_weight"):
        task_for_config(TrainConfig(class_weights="effective"), ml)


@pytest.mark.cli
def test_training_with_class_weights_and_logit_adjustment_records_them(tmp_path):
    from .conftest import make_folder

    data = make_folder(tmp_path / "lt", n_per_class=12, classes=3)
    for i in range(8):  # a long tail: 12, 12, 4 images
        (data / "class_2" / f"img_{i:03d}.png").unlink()
    r = run_cli(
        "train",
        "--data",
        data,
        "--epochs",
        "1",
        "--output",
        tmp_path,
        "--name",
        "la",
        *TINY,
        "--train.loss",
        "logit_adjusted",
        "--train.class_weights",
        "effective",
        "--train.cb_beta",
        "0.9",
    )
    assert r.code == 0, r
    task = json.loads((tmp_path / "la" / "imgclf.json").read_text())["task"]
    train_counts = [11, 11, 3]  # 10 % stratified validation: one image of each class
    assert task["class_prior"] == pytest.approx([n / 25 for n in train_counts], rel=1e-6)
    eff = [(1 - 0.9) / (1 - 0.9**n) for n in train_counts]
    assert task["class_weight"] == pytest.approx([3 * w / sum(eff) for w in eff], rel=1e-5)
