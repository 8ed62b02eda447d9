"""Multi-label classification: losses, metrics, thresholds, calibration, OOD and drift against hand-computed
values and scikit-learn; and the whole chain train -> eval -> predict -> export -> serve -> report."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from imgclf.errors import ImgclfError
from imgclf.train.losses import asl_loss, bce_loss, sigmoid_focal_loss
from imgclf.train.metrics import multilabel_metrics
from imgclf.train.tasks import Decision, MultiLabelTask, SingleLabelTask, metric_of, task_for_config, task_from_json

from .conftest import ML_CLASSES, TINY, make_multilabel_csv, make_multilabel_image, run_cli
from .serving import Served, multipart, png


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


X = torch.tensor([[2.0, -1.0, 0.5]])
Y = torch.tensor([[1.0, 0.0, 1.0]])


@pytest.mark.unit
def test_bce_with_pos_weight_and_smoothing_matches_the_hand_computed_value():
    p = [_sig(v) for v in X[0].tolist()]
    by_hand = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(p[2]))  # summed over classes, batch mean
    assert float(bce_loss()(X, Y)) == pytest.approx(by_hand, rel=1e-6)
    pw = [2.0, 3.0, 0.5]  # scales the positive term of each class
    by_hand = -(2.0 * math.log(p[0]) + math.log(1 - p[1]) + 0.5 * math.log(p[2]))
    assert float(bce_loss(pos_weight=pw)(X, Y)) == pytest.approx(by_hand, rel=1e-6)
    s = 0.2  # y -> y (1 - s) + s / 2: 1 -> 0.9, 0 -> 0.1
    ys = [0.9, 0.1, 0.9]
    by_hand = -sum(y * math.log(q) + (1 - y) * math.log(1 - q) for y, q in zip(ys, p))
    assert float(bce_loss(label_smoothing=s)(X, Y)) == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.unit
def test_asl_and_sigmoid_focal_match_hand_computed_values_and_torchvision():
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    p = [_sig(v) for v in X[0].tolist()]
    gn, gp, clip = 4.0, 1.0, 0.05
    pm = min(1.0, 1 - p[1] + clip)  # the negative's shifted probability of "not this class"
    by_hand = -((1 - p[0]) ** gp * math.log(p[0]) + (1 - pm) ** gn * math.log(pm) + (1 - p[2]) ** gp * math.log(p[2]))
    assert float(asl_loss(gn, gp, clip)(X, Y)) == pytest.approx(by_hand, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) < 0.4).float()
    for gamma, alpha in ((2.0, 0.25), (1.0, 0.6), (0.0, None)):
        ref = tv_focal(x, y, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="sum") / len(x)
        assert float(sigmoid_focal_loss(gamma, alpha)(x, y)) == pytest.approx(float(ref), rel=1e-5)
    assert float(sigmoid_focal_loss(0.0)(x, y)) == pytest.approx(float(bce_loss()(x, y)), rel=1e-5)  # gamma 0: BCE


@pytest.mark.unit
def test_metrics_match_scikit_learn():
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        hamming_loss,
        label_ranking_average_precision_score,
    )

    g = torch.Generator().manual_seed(1)
    y = (torch.rand(200, 6, generator=g) < 0.3).long()
    y[:10] = 0  # empty label sets are real
    p = (0.5 * y + 0.6 * torch.rand(200, 6, generator=g)).clamp(0, 1)
    th = torch.tensor([0.5, 0.4, 0.6, 0.5, 0.3, 0.7])
    d = p >= th
    m = multilabel_metrics(p, y, list("abcdef"), decided=d)
    yn, pn, dn = y.numpy(), p.numpy(), d.numpy().astype(int)
    assert m["map"] == pytest.approx(average_precision_score(yn, pn, average="macro"), abs=1e-5)
    assert m["map_micro"] == pytest.approx(average_precision_score(yn, pn, average="micro"), abs=1e-5)
    per = average_precision_score(yn, pn, average=None)
    assert [m["per_class"][c]["ap"] for c in "abcdef"] == pytest.approx(list(per), abs=1e-5)
    for avg in ("micro", "macro", "samples"):
        assert m[f"{avg}_f1"] == pytest.approx(f1_score(yn, dn, average=avg, zero_division=1), abs=1e-6), avg
    assert m["hamming_loss"] == pytest.approx(hamming_loss(yn, dn), abs=1e-6)
    assert m["exact_match"] == pytest.approx(accuracy_score(yn, dn), abs=1e-6)
    assert m["lrap"] == pytest.approx(label_ranking_average_precision_score(yn, pn), abs=1e-5)
    has = yn.sum(1) > 0  # precision@k / recall@k by hand, over images with at least one label
    top3 = np.argsort(-pn, 1)[:, :3]
    hits = np.take_along_axis(yn, top3, 1).sum(1)
    assert m["precision@3"] == pytest.approx((hits[has] / 3).mean(), abs=1e-6)
    assert m["recall@3"] == pytest.approx((hits[has] / yn.sum(1)[has]).mean(), abs=1e-6)
    assert m["label_cardinality"]["true"] == pytest.approx(yn.sum(1).mean())


@pytest.mark.unit
def test_threshold_tuning_recovers_a_known_optimum():
    from sklearn.metrics import f1_score

    from imgclf.eval.thresholds import tune_thresholds

    # class 0: positives score in [0.3, 1), negatives in [0, 0.2): any threshold in (0.2, 0.3] is perfect;
    # class 1: scores carry no information below 0.6 and above it everything is positive
    rng = np.random.default_rng(0)
    y0 = rng.random(400) < 0.3
    s0 = np.where(y0, 0.3 + 0.7 * rng.random(400), 0.2 * rng.random(400))
    y1 = rng.random(400) < 0.5
    s1 = np.where(y1 & (rng.random(400) < 0.5), 0.6 + 0.4 * rng.random(400), 0.6 * rng.random(400))
    p, y = torch.tensor(np.stack([s0, s1], 1)), torch.tensor(np.stack([y0, y1], 1).astype(np.int64))
    t = tune_thresholds(p, y)
    assert 0.2 < t.thresholds[0] <= 0.3 + 1e-9 and t.per_class[0]["f1"] == 1.0
    grid = np.unique(s1)  # brute force: the best F1 over every threshold equals the tuned one
    best = max(f1_score(y1, s1 >= g) for g in grid)
    assert t.per_class[1]["f1"] == pytest.approx(best, abs=1e-9)
    assert f1_score(y1, s1 >= t.thresholds[1]) == pytest.approx(best, abs=1e-9)
    from sklearn.metrics import precision_score, recall_score

    tp = tune_thresholds(p, y, "precision", 0.95)  # the most recall at precision >= 0.95, by brute force
    ok = [g for g in grid if precision_score(y1, s1 >= g) >= 0.95]
    assert tp.per_class[1]["recall"] == pytest.approx(max(recall_score(y1, s1 >= g) for g in ok), abs=1e-9)
    assert precision_score(y1, s1 >= tp.thresholds[1]) >= 0.95
    tr = tune_thresholds(p, y, "recall", 0.99)
    assert tr.per_class[1]["recall"] >= 0.99
    none = tune_thresholds(p, torch.zeros_like(y))  # no positives: the fallback, said so
    assert none.thresholds == (0.5, 0.5) and len(none.notes) == 2
    with pytest.raises(ImgclfError, match="needs a target"):
        tune_thresholds(p, y, "precision")


@pytest.mark.unit
def test_per_class_platt_recovers_temperature_and_bias_and_lowers_ece():
    from imgclf.eval.calibration import fit_per_class, multilabel_calibration_metrics

    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 3, generator=g) * 3
    t_true, b_true = torch.tensor([2.5, 1.0, 0.5]), torch.tensor([0.0, 1.0, -1.0])
    y = (torch.rand(20000, 3, generator=g) < torch.sigmoid(z / t_true + b_true)).float()
    t, b = fit_per_class(z, y, "platt")
    assert t == pytest.approx(t_true.tolist(), rel=0.08) and b == pytest.approx(b_true.tolist(), abs=0.08)
    before, after = multilabel_calibration_metrics(z, y), multilabel_calibration_metrics(z, y, t, b)
    assert after["ece"] < 0.02 < before["ece"] and after["nll"] < before["nll"]
    assert len(after["ece_per_class"]) == 3
    t_only, none = fit_per_class(z, y, "temperature")
    assert none is None and t_only[0] == pytest.approx(2.5, rel=0.08)


@pytest.mark.unit
def test_task_decisions_json_and_errors():
    t = MultiLabelTask(loss="asl", pos_weight=[1.0, 2.0, 3.0])
    assert task_from_json(json.loads(json.dumps(t.to_json()))) == t
    p = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.3, 0.1]])
    assert t.decide(p).tolist() == [[True, True, False], [False, False, False]]  # the empty set is an answer
    assert t.decide(p, Decision(thresholds=(0.95, 0.5, 0.05))).tolist() == [[False, True, True], [False, False, True]]
    assert t.decide(p, Decision("top_k", top_k=1)).tolist() == [[True, False, False], [False, True, False]]
    assert t.class_rates(p).tolist() == [0.5, 0.5, 0.0]
    assert metric_of(t, "auto") == "map" and metric_of(SingleLabelTask(), "auto") == "top1"
    with pytest.raises(ImgclfError, match="train.metric top1 does not apply to multi-label"):
        metric_of(t, "top1")
    with pytest.raises(ImgclfError, match="pos_weight has 2 values for 3 classes"):
        MultiLabelTask(pos_weight=[1.0, 2.0]).check(3)
    from imgclf.config import TrainConfig

    samples = type("S", (), {"multi_label": True, "class_names": ["a", "b"], "__len__": lambda self: 4,
                             "class_counts": lambda self, usable=False: np.array([1, 3])})()  # fmt: skip
    task = task_for_config(TrainConfig(pos_weight="balanced"), samples)
    assert task.multi_label and task.loss == "bce" and task.label_smoothing == 0.0
    assert task.pos_weight == (3.0, pytest.approx(1 / 3, rel=1e-5))  # negatives / positives
    with pytest.raises(ImgclfError, match="ce is for single-label"):
        task_for_config(TrainConfig(loss="ce"), samples)
    single = type("S", (), {"multi_label": False, "class_names": ["a", "b"],
                            "class_counts": lambda self, usable=False: np.array([3, 1])})()  # fmt: skip
    with pytest.raises(ImgclfError, match="bce is for multi-label"):
        task_for_config(TrainConfig(loss="bce"), single)
    assert task_for_config(TrainConfig(), single) == SingleLabelTask("ce", 0.1)  # the defaults are unchanged


@pytest.mark.unit
def test_trust_settings_for_label_sets_are_refused_on_single_label_data_and_auto_runtime_skips_bf16(monkeypatch):
    from imgclf.artifact import Artifact
    from imgclf.config import TrustConfig
    from imgclf.deploy import runtime
    from imgclf.train.tasks import check_trust

    with pytest.raises(ImgclfError, match="calibration_method platt applies to multi-label"):
        check_trust(TrustConfig(calibration_method="platt"), SingleLabelTask())
    with pytest.raises(ImgclfError, match="trust.threshold precision applies to multi-label"):
        check_trust(TrustConfig(threshold="precision"), SingleLabelTask())
    check_trust(TrustConfig(calibration_method="temperature", threshold="top_k"), MultiLabelTask())
    monkeypatch.setattr(runtime, "available_runtimes", lambda: ["torch", "openvino-bf16", "openvino", "onnxruntime"])
    pre = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
           "crop_pct": 1.0}  # fmt: skip
    single = Artifact("test_efficientnet", ["a", "b"], pre)
    multi = Artifact("test_efficientnet", ["a", "b"], pre, task=MultiLabelTask().to_json())
    assert runtime.default_runtime(single) == "openvino-bf16"
    assert runtime.default_runtime(multi) == "openvino"  # thresholds were tuned on fp32 probabilities


@pytest.mark.unit
def test_multilabel_ood_scores_and_drift_per_label():
    from imgclf.eval.drift import drift_scores, reference_stats
    from imgclf.eval.ood import logit_scores
    from imgclf.eval.trust import Trust

    z = torch.tensor([[2.0, -1.0], [-3.0, -4.0]])
    s = logit_scores(z, [2.0, 1.0], [0.5, 0.0], multi_label=True)
    c = [[2 / 2 + 0.5, -1.0], [-3 / 2 + 0.5, -4.0]]
    energy = [sum(math.log1p(math.exp(v)) for v in row) for row in c]  # joint energy (Wang et al. 2021)
    assert s["energy"].tolist() == pytest.approx(energy, rel=1e-6)
    assert s["msp"].tolist() == pytest.approx([_sig(1.5), _sig(-1.0)], rel=1e-6)
    trust = Trust(task=MultiLabelTask(), decision=Decision(thresholds=0.5))
    rng = np.random.default_rng(0)
    ref_p = np.stack([rng.random(500) * 0.4 + (rng.random(500) < 0.3) * 0.6, rng.random(500)], 1).astype(np.float32)
    ref = reference_stats(ref_p, None, trust)
    assert ref["class_dist"] == pytest.approx(list((ref_p >= 0.5).mean(0)), abs=1e-6)  # per-label positive rates
    live = ref_p.copy()
    live[:, 0] = np.clip(live[:, 0] + 0.25, 0, 1)  # label 0 turns on far more often; label 1 as before
    d = drift_scores(ref, live, None, trust)
    e, a = ref["class_dist"][0], float((live[:, 0] >= 0.5).mean())
    by_hand = (a - e) * math.log(a / e) + ((1 - a) - (1 - e)) * math.log((1 - a) / (1 - e))
    assert d["psi_class"] == pytest.approx(by_hand, rel=1e-3)  # the most shifted label's PSI
    assert drift_scores(ref, ref_p, None, trust)["psi_class"] < 0.01


@pytest.mark.cli
def test_multilabel_chain_train_eval_predict_export_serve_report(tmp_path):
    """The whole chain on a tiny multi-label set (3 colour labels, all 8 label sets including the empty one)."""
    train_csv = make_multilabel_csv(tmp_path / "train", 160, seed=0)
    test_csv = make_multilabel_csv(tmp_path / "test", 48, seed=1)
    r = run_cli("train", "--data", train_csv, "--test-data", test_csv, "--epochs", "4", "--output", tmp_path,
                "--name", "ml", *TINY, "--aug.mixup", "0.2")  # fmt: skip
    assert r.code == 0, r
    run = tmp_path / "ml"
    art = json.loads((run / "imgclf.json").read_text())
    assert art["task"]["kind"] == "multi_label" and art["task"]["loss"] == "bce"
    assert art["decision"]["objective"] == "f1" and len(art["decision"]["thresholds"]) == 3
    assert art["calibration"]["method"] == "platt" and len(art["calibration"]["bias"]) == 3
    test_m = art["metrics"]["test"]
    assert test_m["multi_label"] and test_m["map"] > 0.9 and test_m["macro_f1"] > 0.8, test_m
    assert "map" in r.out and "exact_match" in r.out and "fixed 0.5" in r.out  # the tables
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_map" in x for x in rows if "train_loss" in x)

    r = run_cli("eval", run, "--data", test_csv, "--json", tmp_path / "e.json", "--no-progress")
    assert r.code == 0, r
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["map"] == pytest.approx(test_m["map"], abs=1e-6) and ev["macro_f1"] == pytest.approx(test_m["macro_f1"])
    assert ev["calibration"]["after"]["ece"] == pytest.approx(art["calibration"]["test"]["after"]["ece"], abs=1e-6)

    # exported before predict: --runtime auto (OpenVINO for label sets) then runs the run's own current export
    # instead of compiling the same graph once more into the user cache
    r = run_cli("export", run, "--format", "onnx", "openvino", "--data", test_csv)
    assert r.code == 0, r
    for fmt in ("onnx", "openvino"):
        v = json.loads((run / "export" / "export.json").read_text())[fmt]["verify"]
        assert v["decision"] == "label set" and v["top1_agreement"] >= 0.999 and v["images"] == 48, (fmt, v)

    rng = np.random.default_rng(9)
    sets = [[], [0], [1, 2], [0, 1, 2]]
    imgs = [make_multilabel_image(s, rng) for s in sets]
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"q{i}.png")
    r = run_cli("predict", run, *[tmp_path / f"q{i}.png" for i in range(4)], "--format", "json", "--no-reject",
                "--no-progress")  # fmt: skip
    assert r.code == 0, r
    preds = json.loads(r.out)["predictions"]
    got = [sorted(t["label"] for t in p["labels"]) for p in preds]
    assert got == [sorted(ML_CLASSES[k] for k in s) for s in sets], got  # the empty set included

    cal = tmp_path / "cal"  # re-fitting calibration and thresholds on other labelled data (a copy of the run)
    shutil.copytree(run, cal)
    r = run_cli("calibrate", cal, "--data", test_csv, "--no-progress")
    assert r.code == 0 and "decision thresholds re-tuned" in r.out, r
    refit = json.loads((cal / "imgclf.json").read_text())
    assert refit["calibration"]["refit"]["n"] == 48 and len(refit["decision"]["thresholds"]) == 3
    assert refit["decision"]["thresholds"] != art["decision"]["thresholds"]

    s = Served([f"ml={run}", "--runtime", "onnxruntime"], tmp_path)
    try:
        body, headers = multipart([(f"{i}.png", png(im)) for i, im in enumerate(imgs)])
        st, doc = s.json("POST", "/predict", body, headers)
        assert st == 200
        assert [sorted(t["label"] for t in p["labels"]) for p in doc["predictions"]] == got
        import tritonclient.http as httpclient

        from imgclf.deploy.runtime import load_predictor, to_pixels

        px = to_pixels(imgs, load_predictor(run, "onnxruntime").art)
        c = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
        inp = httpclient.InferInput("input", list(px.shape), "UINT8")
        inp.set_data_from_numpy(px)
        res = c.infer("ml", [inp], outputs=[httpclient.InferRequestedOutput("probs", class_count=3)])
        labels = [sorted(t.decode().split(":")[2] for t in row if t) for row in res.as_numpy("probs")]
        assert labels == got  # the classification extension answers the label sets (padded with empty strings)
    finally:
        assert s.stop() == 0, s.log()

    html = (run / "report.html").read_text()
    assert "co-occurrence" in html.lower() and "confusion matrix" not in html.lower()
