"""Long-tailed data: post-hoc prior shift (eval.priors), decoupled rebalancing (cRT, tau-normalisation), the
report's recall-against-frequency view; against hand-computed values and scikit-learn."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score

from imgclf.errors import ImgclfError
from imgclf.eval.priors import logit_prior, parse_priors, shift
from imgclf.train.metrics import compute_metrics
from imgclf.train.rebalance import crt_head, tau_norm_head
from imgclf.train.tasks import SingleLabelTask

from .conftest import TINY, make_image, run_cli

NAMES = ["a", "b", "c"]


# --------------------------------------------------------------------------- priors


@pytest.mark.unit
def test_parse_priors_forms(tmp_path):
    assert parse_priors("uniform", NAMES) == pytest.approx([1 / 3] * 3)
    assert parse_priors("train", NAMES, [0.7, 0.2, 0.1]) == [0.7, 0.2, 0.1]
    assert parse_priors("2,1,1", NAMES) == pytest.approx([0.5, 0.25, 0.25])
    assert parse_priors("c=1, a=2,b=1", NAMES) == pytest.approx([0.5, 0.25, 0.25])
    (tmp_path / "p.json").write_text(json.dumps({"a": 1, "b": 1, "c": 2}))
    assert parse_priors(str(tmp_path / "p.json"), NAMES) == pytest.approx([0.25, 0.25, 0.5])
    (tmp_path / "p.csv").write_text("class,prior\na,3\nb,1\nc,1\n")
    assert parse_priors(str(tmp_path / "p.csv"), NAMES) == pytest.approx([0.6, 0.2, 0.2])


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec, msg",
    [("1,2", "2 values for 3 classes"), ("a=1,b=1", "no prior for class 'c'"), ("a=1,b=1,c=1,d=1", "unknown class 'd'"),
     ("1,0,1", "must be a positive number"), ("1,x,1", "must be a positive number"), ("nope.json", "not found")],
)  # fmt: skip
def test_parse_priors_errors(spec, msg):
    with pytest.raises(ImgclfError, match=msg):
        parse_priors(spec, NAMES)


@pytest.mark.unit
def test_logit_prior_of_each_objective():
    counts = np.array([80, 15, 5])
    pi = counts / counts.sum()
    ce = SingleLabelTask()
    assert logit_prior(ce, counts) == pytest.approx(pi)
    # class weights w: the expected weighted loss is minimised by the posterior under prior ∝ pi * w
    w = (1.0, 2.0, 4.0)
    want = pi * np.array(w) / (pi * np.array(w)).sum()
    assert logit_prior(SingleLabelTask(class_weight=w), counts) == pytest.approx(want, abs=1e-7)
    # logit-adjusted (tau) and balanced softmax: the logits learn pi^(1 - tau); tau 1 / balanced softmax: uniform
    la = SingleLabelTask("logit_adjusted", class_prior=tuple(pi), la_tau=0.5)
    assert logit_prior(la, counts) == pytest.approx(np.sqrt(pi) / np.sqrt(pi).sum(), abs=1e-7)
    bs = SingleLabelTask("balanced_softmax", class_prior=tuple(pi))
    assert logit_prior(bs, counts) == pytest.approx([1 / 3] * 3, abs=1e-7)
    # samplers: the drawing distribution replaces pi
    assert logit_prior(ce, counts, "balanced") == pytest.approx([1 / 3] * 3, abs=1e-7)
    sq = np.sqrt(counts) / np.sqrt(counts).sum()
    assert logit_prior(ce, counts, "sqrt") == pytest.approx(sq, abs=1e-7)
    assert logit_prior(ce, counts, "progressive", epoch=1, epochs=5) == pytest.approx(pi, abs=1e-7)
    assert logit_prior(ce, counts, "progressive", epoch=5, epochs=5) == pytest.approx([1 / 3] * 3, abs=1e-7)


@pytest.mark.unit
def test_shift_is_the_bayes_prior_correction():
    """softmax(z + log(pt/ps)) is p_s(y|x) pt/ps renormalised (Saerens et al. 2002)."""
    ps, pt = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.3, 0.5])
    z = torch.tensor([[1.0, 0.5, -0.3]])
    p_s = z.softmax(1).numpy()[0]
    want = p_s * pt / ps
    got = SingleLabelTask().probs(z, 1.0, shift(pt, ps).tolist()).numpy()[0]
    assert got == pytest.approx(want / want.sum(), abs=1e-6)


@pytest.mark.unit
def test_metrics_decide_by_shifted_scores_vs_sklearn():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(200, 3)), dtype=torch.float32)
    logits[:, 0] += 1.5  # a model favouring the frequent class
    y = torch.tensor(rng.integers(0, 3, 200))
    b = shift([1 / 3] * 3, [0.8, 0.15, 0.05])
    p = SingleLabelTask().probs(logits, 1.0, b.tolist())
    m = compute_metrics(logits, y, NAMES, scores=p)
    pred = (logits + torch.tensor(b, dtype=torch.float32)).argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert m["top1"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), abs=1e-6)  # raw logits


# --------------------------------------------------------------------------- cRT and tau-normalisation


def _long_tailed_features(seed: int = 0, counts=(400, 40, 8), d: int = 16):
    """Gaussian classes in feature space, a long-tailed training set and a balanced validation set."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.0, (len(counts), d))

    def draw(ns):
        x = np.concatenate([means[c] + rng.normal(0, 1.2, (n, d)) for c, n in enumerate(ns)])
        y = np.concatenate([np.full(n, c) for c, n in enumerate(ns)])
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    return (*draw(counts), *draw([200] * len(counts)))


@pytest.mark.unit
def test_crt_raises_balanced_accuracy_over_the_plain_head():
    from imgclf.train.probe import fit_lbfgs

    xtr, ytr, xva, yva = _long_tailed_features()
    w0, b0, _ = fit_lbfgs(xtr, ytr, xva, yva, 3, [1e-3], 200)
    w1, b1, info = crt_head(xtr, ytr, xva, yva, 3, [1e-2, 1e-3, 1e-4])
    plain = balanced_accuracy_score(yva, (xva @ w0.T + b0).argmax(1))
    crt = balanced_accuracy_score(yva, (xva @ w1.T + b1).argmax(1))
    assert crt > plain + 0.03, (plain, crt)
    assert info["wd"] in (1e-2, 1e-3, 1e-4) and len(info["grid"]) == 3
    # the rare class is no longer starved: its recall rises
    assert float(((xva @ w1.T + b1).argmax(1)[yva == 2] == 2).float().mean()) > float(
        ((xva @ w0.T + b0).argmax(1)[yva == 2] == 2).float().mean()
    )


@pytest.mark.unit
def test_crt_refuses_a_class_without_features():
    x, y = torch.randn(10, 4), torch.tensor([0] * 5 + [1] * 5)
    with pytest.raises(ImgclfError, match="class index 2 has none"):
        crt_head(x, y, x, y, 3, [1e-3])


@pytest.mark.unit
def test_tau_norm_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8]])  # norms 5 and 1
    x = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    y = torch.tensor([0, 1])
    w2, b2, info = tau_norm_head(w, x, y, taus=(0.0, 0.5, 1.0))
    # tau 0: class 0 wins both (balanced accuracy 0.5); tau 1: equal norms, a tie -> class 0 (argmax) -> 0.5;
    # the smallest tau among the best wins
    assert info["tau"] == 0.0 and [r["tau"] for r in info["grid"]] == [0.0, 0.5, 1.0]
    assert torch.equal(b2, torch.zeros(2))
    w3, _, _ = tau_norm_head(w, x, y, taus=(1.0,))
    assert w3.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    w4, _, _ = tau_norm_head(w, x, y, taus=(0.5,))
    assert w4.norm(dim=1).tolist() == pytest.approx([math.sqrt(5), 1.0])


# --------------------------------------------------------------------------- end to end


def _lt_folder(root: Path, counts: list[int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, n in enumerate(counts):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_image(c, rng).save(d / f"img_{i:03d}.png")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lt_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lt")
    train, test = _lt_folder(root / "train", [48, 16, 6], 0), _lt_folder(root / "test", [8, 8, 8], 1)
    r = run_cli("train", "--data", train, "--test-data", test, "--epochs", "2", "--output", root / "runs",
                "--name", "ce", "--trust.report", "false", *TINY)  # fmt: skip
    assert r.code == 0, r
    return root / "runs" / "ce", test


def test_rebalance_crt_changes_only_the_classifier(lt_run):
    run, _ = lt_run
    before = {p.name: _sha(p) for p in run.iterdir() if p.is_file()}
    r = run_cli("rebalance", run, "--method", "crt", "--no-progress")
    assert r.code == 0, r
    assert "crt (L2" in r.out and "picked by validation balanced accuracy" in r.out
    assert {p.name: _sha(p) for p in run.iterdir() if p.is_file()} == before  # the source run is untouched
    new = run.parent / "ce-crt"
    old_w, new_w = load_file(str(run / "model.safetensors")), load_file(str(new / "model.safetensors"))
    head = {k for k in old_w if k.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}
    for k in old_w:  # cRT freezes the representation: every other tensor (BatchNorm statistics too) is identical
        assert torch.equal(old_w[k], new_w[k]) == (k not in head), k
    doc = json.loads((new / "imgclf.json").read_text())
    assert doc["data"]["rebalance"] == "crt" and doc["data"]["logit_prior"] == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert doc["metrics"]["rebalance"]["from"] == str(run) and "test" in doc["metrics"]
    assert doc["data"]["class_counts"] == json.loads((run / "imgclf.json").read_text())["data"]["class_counts"]
    again = run_cli("rebalance", run, "--method", "crt", "--no-progress")
    assert again.code == 2 and "exists; pass another --name" in again.err


def test_tau_norm_run_has_no_prior_to_shift(lt_run):
    run, test = lt_run
    r = run_cli("rebalance", run, "--method", "tau_norm", "--name", "tn", "--no-progress")
    assert r.code == 0, r
    w = load_file(str(run.parent / "tn" / "model.safetensors"))
    assert torch.equal(w["classifier.bias"], torch.zeros(3))
    bad = run_cli("eval", run.parent / "tn", "--data", test, "--priors", "uniform", "--no-progress")
    assert bad.code == 2 and "tau-normalised" in bad.err


def test_priors_stored_and_applied_everywhere(lt_run, tmp_path):
    import shutil

    src, test = lt_run
    run = tmp_path / "ce"
    shutil.copytree(src, run)
    counts = json.loads((run / "imgclf.json").read_text())["data"]["class_counts"]
    r = run_cli("calibrate", run, "--data", test, "--split", "test", "--priors", "uniform", "--no-progress")
    assert r.code == 0, r
    assert "priors uniform stored" in r.out
    doc = json.loads((run / "imgclf.json").read_text())
    pi = np.array(counts) / sum(counts)
    want = np.log(1 / 3) - np.log(pi)
    assert doc["calibration"]["bias"] == pytest.approx(want.tolist(), abs=1e-5)
    assert doc["calibration"]["priors"]["spec"] == "uniform"

    from imgclf.api import evaluate, predict
    from imgclf.data.sources import open_source
    from imgclf.eval.inference import infer_run
    from imgclf.eval.trust import Trust

    # eval decides by argmax(z / T + b); "--priors none" for one call gives the plain argmax
    with_p = evaluate(run, str(test), progress=False)
    without = evaluate(run, str(test), priors="none", progress=False)
    out, art, _, _ = infer_run(run, lambda a, d: open_source(str(test), "test", d), progress=False)
    t = art.temperature
    pred_p = (out.logits / t + torch.tensor(want, dtype=torch.float32)).argmax(1)
    assert with_p["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(out.labels, pred_p), abs=1e-6)
    assert without["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(out.labels, out.logits.argmax(1)),
                                                         abs=1e-6)  # fmt: skip
    assert with_p["priors"]["spec"] == "uniform" and "priors" not in without
    # predict: the calibrated probabilities are softmax(z / T + b)
    img = sorted((test / "class_2").iterdir())[0]
    row = predict(run, [str(img)], top_k=3, progress=False).rows[0]
    trust = Trust.load(run, art)
    assert trust.bias == pytest.approx(want.tolist(), abs=1e-5)
    top = {d["label"]: d["prob"] for d in row["top"]}
    assert sum(top.values()) == pytest.approx(1.0, abs=1e-4)
    # export: the graph's probabilities carry the shift (verification compares them with PyTorch's)
    e = run_cli("export", run, "--format", "onnx", "--data", test)
    assert e.code == 0, e
    import onnxruntime as ort

    from imgclf.deploy.export.graph import to_input

    sess = ort.InferenceSession(str(run / "export" / "model.onnx"))
    pix = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    logits, probs, _ = sess.run(None, {sess.get_inputs()[0].name: to_input(pix, "nhwc", art)})
    ref = torch.softmax(torch.tensor(logits) / t + torch.tensor(want, dtype=torch.float32), 1)
    assert np.abs(probs - ref.numpy()).max() < 1e-5
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(run / "export" / "model.onnx")).metadata_props}
    assert json.loads(meta["imgclf.priors"])["spec"] == "uniform"


def test_priors_refused_for_multilabel_and_bad_spec(lt_run, tmp_path):
    run, test = lt_run
    r = run_cli("eval", run, "--data", test, "--priors", "1,2", "--no-progress")
    assert r.code == 2 and "2 values for 3 classes" in r.err
    r = run_cli("calibrate", run, "--priors", "a=1")
    assert r.code == 2 and "unknown class 'a'" in r.err


@pytest.mark.unit
def test_report_per_class_shows_imbalance():
    from imgclf.eval.report import _per_class

    m = {
        "per_class": {n: {"precision": 1.0, "recall": r, "f1": 1.0, "support": 5} for n, r in zip(NAMES, (1, 0.5, 0.1))}
    }
    body = _per_class(m, [600, 60, 6])
    assert "Imbalance ratio 100.0:1" in body and "imgclf rebalance" in body and "<img" in body
    assert "Imbalance ratio" not in _per_class(m, None)
