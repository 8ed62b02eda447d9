"""Class-aware samplers: class frequencies match their definitions, epochs are seeded, ranks split one draw."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.data.samplers import ClassBalancedSampler
from imgclf.errors import ImgclfError

from .conftest import TINY, make_folder, run_cli

pytestmark = pytest.mark.unit

LABELS = [0] * 800 + [1] * 150 + [2] * 50  # a long tail: 800 / 150 / 50


def _class_freq(s: ClassBalancedSampler, epochs: range) -> np.ndarray:
    y = np.asarray(LABELS)
    counts = np.zeros(3)
    for e in epochs:
        s.set_epoch(e)
        counts += np.bincount(y[list(s)], minlength=3)
    return counts / counts.sum()


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("instance", [0.8, 0.15, 0.05]),
        ("sqrt", list(np.sqrt([800, 150, 50]) / np.sqrt([800, 150, 50]).sum())),
        ("balanced", [1 / 3, 1 / 3, 1 / 3]),
    ],
)
def test_class_frequencies_match_their_definitions(mode, expected):
    s = ClassBalancedSampler(LABELS, mode, seed=3)
    assert len(s) == 1000 and np.allclose(s.class_probs(), expected)
    assert _class_freq(s, range(1, 21)) == pytest.approx(expected, abs=0.01)  # 20,000 draws


def test_progressive_moves_from_instance_to_balanced():
    s = ClassBalancedSampler(LABELS, "progressive", seed=0, epochs=5)
    s.set_epoch(1)
    assert np.allclose(s.class_probs(), [0.8, 0.15, 0.05])
    s.set_epoch(3)
    assert np.allclose(s.class_probs(), 0.5 * np.array([0.8, 0.15, 0.05]) + 0.5 / 3)
    s.set_epoch(5)
    assert np.allclose(s.class_probs(), [1 / 3] * 3)


def test_epochs_are_seeded_and_ranks_split_one_draw():
    a, b = ClassBalancedSampler(LABELS, "balanced", seed=1), ClassBalancedSampler(LABELS, "balanced", seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)  # a resumed run re-creates the same epoch
    b.set_epoch(5)
    assert list(a) != list(b)
    ranks = [ClassBalancedSampler(LABELS, "balanced", seed=1, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(4)
    merged = [None] * 1000
    for r, s in enumerate(ranks):
        merged[r::3] = list(s)
    assert merged == list(a) and sum(len(s) for s in ranks) == 1000


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ImgclfError, match="data.sampler must be one of"):
        ClassBalancedSampler(LABELS, "oversample")
    with pytest.raises(ImgclfError, match="one class per image"):
        ClassBalancedSampler(np.zeros((4, 2)), "balanced")
    data = make_folder(tmp_path / "d", n_per_class=4, classes=2)
    r = run_cli("train", "--data", data, *TINY, "--output", tmp_path, "--data.sampler", "balanced",
                "--aug.repeats", "2")  # fmt: skip
    assert r.code == 2 and "aug.repeats > 1 both choose the training order" in r.err and "Traceback" not in r.err
    r = run_cli("train", "--data", data, *TINY, "--output", tmp_path, "--aug.oversampled", "trivialaugment")
    assert r.code == 2 and "aug.oversampled augments the classes a class-aware sampler repeats" in r.err
    r = run_cli("train", "--data", data, *TINY, "--output", tmp_path, "--aug.oversampled", "strong")
    assert r.code == 2 and "aug.oversampled" in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("mode, expected", [("balanced", {1, 2}), ("sqrt", {1, 2}), ("progressive", {1, 2}),
                                            ("instance", set())])  # fmt: skip
def test_oversampled_classes_are_those_drawn_above_their_share(mode, expected):
    from imgclf.data.samplers import oversampled_classes

    assert oversampled_classes(LABELS, mode) == expected
    # sqrt on 900 / 90 / 10: shares 0.9 / 0.09 / 0.01, sqrt draws 0.69 / 0.22 / 0.07 -> classes 1 and 2
    assert oversampled_classes([0] * 900 + [1] * 90 + [2] * 10, "sqrt") == {1, 2}


def test_oversampled_classes_get_the_strong_transform(tmp_path):
    from imgclf.data.loader import ImageDataset
    from imgclf.data.sources import open_source

    data = make_folder(tmp_path / "d", n_per_class=3, classes=3)
    s = open_source(str(data), "train")
    ds = ImageDataset(s, lambda img: "plain", strong=lambda img: "strong", strong_classes=frozenset({2}))
    got = {int(s.labels[i]): ds[i][0] for i in range(len(s))}
    assert got == {0: "plain", 1: "plain", 2: "strong"}
