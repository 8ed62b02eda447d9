"""Numeric checks of the metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from imgclf.cli.output import confusion_table, metrics_table
from imgclf.train.metrics import compute_metrics


def _logits(preds: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), k).float() * 5


def test_known_confusion_gives_known_numbers():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    m = compute_metrics(_logits(p, 3), y, ["a", "b", "c"])
    assert m["top1"] == pytest.approx(0.7)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [1, 0, 3]]
    # per class: a P=3/4 R=3/4, b P=1/2 R=1/2, c P=3/4 R=3/4
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.75)
    assert m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["support"] == 4
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    assert "top5" not in m  # only reported with more than five classes


def test_top5_with_many_classes():
    k = 8
    logits = torch.arange(k, dtype=torch.float32).repeat(4, 1)  # ranking 7 > 6 > ... > 0
    y = torch.tensor([7, 3, 2, 0])  # ranks 1, 5, 6, 8
    m = compute_metrics(logits, y, [str(i) for i in range(k)])
    assert m["top1"] == pytest.approx(0.25) and m["top5"] == pytest.approx(0.5)


def test_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    m = compute_metrics(logits, y, ["a", "b"])
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))


def test_tables_show_every_class():
    m = compute_metrics(_logits([0, 1, 1], 2), torch.tensor([0, 1, 0]), ["cat", "dog"])
    t = metrics_table(m, "val")
    assert "top1" in t and "66.67 %" in t and "cat" in t and "dog" in t
    assert "0 cat" in confusion_table(m, ["cat", "dog"])


def test_balanced_accuracy_and_macro_f1_match_sklearn_definitions_with_an_absent_class():
    # class 2 never occurs in the targets but is predicted once
    y = torch.tensor([0, 0, 1, 1])
    m = compute_metrics(_logits([0, 0, 1, 2], 3), y, ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)  # sklearn.balanced_accuracy_score: 0.75
    # sklearn f1_score(average="macro") over labels present in y_true or y_pred: (1 + 2/3 + 0) / 3
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
