"""The run report of multi-label runs (its own sections: thresholds, precision-recall curves, label co-occurrence,
per-class calibration), and the single-label report kept as it was."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.eval.predictions import Saved
from imgclf.eval.report import MULTILABEL_SECTIONS, SECTIONS
from imgclf.eval.report_multilabel import class_thresholds, decision_text, multilabel_top_losses, pr_curve_data
from imgclf.eval.trust import Trust
from imgclf.train.tasks import Decision, MultiLabelTask

from .conftest import TINY, make_multilabel_csv, run_cli


class _Page(HTMLParser):
    """Section ids, embedded images (alt -> src) and card texts (value, label) of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
        if tag == "img" and a.get("class") == "plot":
            self.imgs[a.get("alt", "")] = a.get("src", "")


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def _png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    img.load()
    return img


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> Path:
    """A multi-label run (3 labels, empty sets included) with a test split, trained once for this module."""
    root = tmp_path_factory.mktemp("mlreport")
    train = make_multilabel_csv(root / "train", n=80, seed=0)
    test = make_multilabel_csv(root / "test", n=24, seed=1)
    r = run_cli("train", "--data", train, "--test-data", test, "--epochs", "2", "--output", root / "runs",
                "--name", "m", *TINY)  # fmt: skip
    assert r.code == 0, r
    return root / "runs" / "m"


def _check_multilabel_page(run: Path) -> None:
    doc = json.loads((run / "imgclf.json").read_text())
    page = (run / "report.html").read_text()
    p = _parse(page)
    assert p.ids == list(MULTILABEL_SECTIONS)
    assert "confusion" not in p.ids and "confused-pairs" not in p.ids and "Confusion matrix" not in page
    for alt in ("training curves", "precision-recall curves", "label co-occurrence", "reliability"):
        assert _png(p.imgs[alt]).size[0] > 100, alt
    # the mAP card shows the test split's mAP as the page formats percentages
    m = doc["metrics"]["test"]
    assert f"<b>{100 * m['map']:.2f} %</b><span>test mAP</span>" in page
    assert f"<b>{100 * m['exact_match']:.2f} %</b><span>exact match</span>" in page
    # the per-class table lists each class's tuned threshold, worst AP first
    per_class = page[page.index('id="per-class"') : page.index('id="thresholds"')]
    rows = re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", per_class)
    assert [name for name, _ in rows] == sorted(doc["class_names"], key=lambda n: m["per_class"][n]["ap"])
    for name, t in zip(doc["class_names"], doc["decision"]["thresholds"]):
        row = dict(rows)[name]
        assert row.endswith(f"<td>{t:.3f}</td>"), (name, row)
    # the decision-rule comparison has the run's rule and both alternatives, with their numbers
    rules = page[page.index('id="thresholds"') : page.index('id="pr-curves"')]
    assert "this run: tuned (F1)" in rules and "fixed 0.5" in rules and "top-" in rules
    for alt in m["alternatives"].values():
        assert f"{100 * alt['micro_f1']:.2f} %" in rules
    assert "per-class thresholds tuned for F1 on validation" in page
    assert "Platt (per class)" in page  # calibration card


@pytest.mark.cli
def test_multilabel_run_report_has_its_own_sections(ml_run):
    _check_multilabel_page(ml_run)
    page = (ml_run / "report.html").read_text()
    assert "(multi-label)" in page  # the header names the task
    calibration = page[page.index('id="calibration"') : page.index('id="ood"')]
    cal = json.loads((ml_run / "imgclf.json").read_text())["calibration"]
    for t, e in zip(cal["temperature"], cal["val"]["after"]["ece_per_class"]):  # per-class T and ECE
        assert f"<td>{t:.3f}</td>" in calibration and f"<td>{100 * e:.2f} %</td>" in calibration


@pytest.mark.cli
def test_report_command_rewrites_a_multilabel_report(ml_run, tmp_path):
    run = tmp_path / "m"
    shutil.copytree(ml_run, run)
    (run / "report.html").unlink()
    r = run_cli("report", run, "--device", "cpu")  # reliability recomputed from the saved validation predictions
    assert r.code == 0, r
    _check_multilabel_page(run)


@pytest.mark.cli
def test_single_label_report_keeps_its_confusion_matrix(tiny_run):
    page = (tiny_run / "report.html").read_text()
    p = _parse(page)
    assert p.ids == list(SECTIONS)
    assert "Confusion matrix" in page and "confusion matrix" in p.imgs
    assert "(multi-label)" not in page and "pr-curves" not in page


@pytest.mark.unit
def test_decision_rule_descriptions_and_thresholds():
    tuned = Decision("threshold", (0.2, 0.7), objective="f1").to_json()
    assert decision_text(tuned) == ("tuned (F1)", "per-class thresholds tuned for F1 on validation")
    assert class_thresholds(tuned, 2) == pytest.approx([0.2, 0.7])
    prec = Decision("threshold", (0.3, 0.4), objective="precision", target=0.9).to_json()
    assert decision_text(prec)[0] == "tuned (precision ≥ 0.90)"
    assert decision_text(Decision().to_json())[0] == "fixed 0.5"
    assert class_thresholds(Decision().to_json(), 3) == [0.5, 0.5, 0.5]
    top = Decision("top_k", top_k=2, objective="top_k").to_json()
    assert decision_text(top)[0] == "top-2" and class_thresholds(top, 2) == [None, None]
    assert decision_text(None)[0] == "fixed 0.5"


@pytest.mark.unit
def test_pr_curves_match_scikit_learn_and_mark_the_operating_point():
    from sklearn.metrics import average_precision_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.random((50, 3)) < 0.4
    y[:, 2] = False  # a class without positives gets no curve
    p = torch.tensor(np.clip(y * 0.4 + rng.random((50, 3)) * 0.6, 0, 1), dtype=torch.float32)
    decided = p >= torch.tensor([0.5, 0.6, 0.5])
    curves, micro, missing = pr_curve_data(p, torch.tensor(y, dtype=torch.float32), decided, ["a", "b", "c"])
    assert [c["name"] for c in curves] == ["a", "b"] and missing == ["c"]
    for k, c in enumerate(curves):
        assert c["ap"] == pytest.approx(average_precision_score(y[:, k], p[:, k].numpy()))
        r, pr = c["point"]
        assert r == pytest.approx(recall_score(y[:, k], decided[:, k].numpy()))
        assert pr == pytest.approx(precision_score(y[:, k], decided[:, k].numpy()))
    assert micro["ap"] == pytest.approx(average_precision_score(y.ravel(), p.numpy().ravel()))
    # many classes: only the half of max_classes with the lowest AP
    yy = torch.tensor(rng.random((40, 30)) < 0.5, dtype=torch.float32)
    pp = torch.rand(40, 30)
    many, _, _ = pr_curve_data(pp, yy, pp >= 0.5, [f"c{i}" for i in range(30)], max_classes=20)
    aps = sorted(average_precision_score(yy[:, k].numpy(), pp[:, k].numpy()) for k in range(30))
    assert [c["ap"] for c in many] == pytest.approx(aps[:10])


@pytest.mark.unit
def test_multilabel_top_losses_rank_wrong_label_sets_by_cross_entropy():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0], [3.0, 3.0], [-1.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # rows 2 and 3 wrong
    saved = Saved(logits, labels, torch.arange(4), [f"im{i}.png" for i in range(4)])
    trust = Trust(task=MultiLabelTask(), decision=Decision())
    out = multilabel_top_losses(saved, ["x", "y"], 5, trust)
    assert [t["row"] for t in out] == [2, 3]  # row 2: a confident false alarm costs more than row 3's miss
    assert out[0]["worst"] == "x" and out[0]["worst_kind"] == "false alarm"
    assert [n for n, _ in out[0]["pred"]] == ["x", "y"] and [n for n, _ in out[0]["true"]] == ["y"]
    assert out[1]["worst"] == "x" and out[1]["worst_kind"] == "missed" and out[1]["pred"] == []
    sp = torch.nn.functional.softplus
    assert out[0]["bce"] == pytest.approx(float(sp(torch.tensor(3.0)) + sp(torch.tensor(-3.0))), rel=1e-5)
