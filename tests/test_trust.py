"""Calibration, OOD scores, TTA, ensembles, CAMs and the report: numbers cross-checked against
scikit-learn / direct computation, and end to end through the CLI on the tiny run."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from imgclf.data.preprocess import Preprocess
from imgclf.eval.calibration import brier, calibration_metrics, ece_equal_mass, ece_equal_width, fit_temperature
from imgclf.eval.ood import detection_metrics, fit_feature_stats, logit_scores, threshold_for_tpr
from imgclf.eval.report import SECTIONS
from imgclf.eval.tta import merge_views, tta_transform

from .conftest import TINY, make_folder, make_image, run_cli


def synthetic(n: int = 3000, k: int = 5, t_true: float = 1.0, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / t_true): the right temperature is t_true."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g) * 2.5
    labels = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    return base * t_true, labels


def _sk_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int, strategy: str) -> float:
    """Top-label ECE from scikit-learn's calibration_curve and the matching bin counts."""
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=n_bins, strategy=strategy)
    if strategy == "uniform":
        bins = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        bins = np.percentile(conf, np.linspace(0, 100, n_bins + 1))
    counts = np.bincount(np.searchsorted(bins[1:-1], conf), minlength=len(bins) - 1)
    counts = counts[counts > 0]
    return float(np.sum(counts / len(conf) * np.abs(prob_true - prob_pred)))


def test_calibration_metrics_match_scikit_learn():
    logits, y = synthetic(n=1500, t_true=1.7)
    probs = logits.double().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == y).numpy().astype(int)
    assert ece_equal_width(probs, y) == pytest.approx(_sk_ece(conf.numpy(), correct, 15, "uniform"), abs=1e-5)
    assert ece_equal_mass(probs, y) == pytest.approx(_sk_ece(conf.numpy(), correct, 15, "quantile"), abs=1e-5)
    assert brier(probs, y) == pytest.approx(skm.brier_score_loss(y.numpy(), probs.numpy(), labels=range(5)), rel=1e-5)
    m = calibration_metrics(logits, y)
    assert m["nll"] == pytest.approx(skm.log_loss(y.numpy(), probs.numpy(), labels=range(5)), rel=1e-4)
    # overconfident logits (true temperature 1.7) are worse calibrated than the same logits scaled back
    assert calibration_metrics(logits, y, 1.7)["ece"] < m["ece"]


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(t_true):
    logits, y = synthetic(n=20000, t_true=t_true, seed=1)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(t_true, rel=0.05)
    before, after = calibration_metrics(logits, y), calibration_metrics(logits, y, t)
    assert after["nll"] <= before["nll"] + 1e-6
    assert after["ece"] < 0.02


@pytest.mark.parametrize("scale", [1.0, 300.0])  # Mahalanobis-like magnitudes must not saturate
def test_ood_detection_metrics_match_scikit_learn(scale):
    g = torch.Generator().manual_seed(0)
    ind, ood = torch.randn(700, generator=g) + 1.2, torch.randn(400, generator=g)
    ind, ood = ind * scale - 2 * scale, ood * scale - 2 * scale  # at scale 300 all far below 0: no sigmoid
    m = detection_metrics(ind, ood)
    s = torch.cat([ind, ood]).numpy()
    y = np.r_[np.ones(700), np.zeros(400)]
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-5)
    assert m["aupr"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-4)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert m["fpr_at_95_tpr"] == pytest.approx(fpr[tpr >= 0.95].min(), abs=1e-6)
    t = threshold_for_tpr(ind, 0.95)
    assert float((ind >= t).float().mean()) == pytest.approx(0.95, abs=0.003)


def test_logit_scores_are_the_published_formulas():
    z = torch.tensor([[3.0, 1.0, -1.0], [0.2, 0.1, 0.0]])
    s = logit_scores(z, temperature=2.0)
    assert torch.allclose(s["msp"], (z / 2).softmax(1).max(1).values)
    assert torch.allclose(s["max_logit"], torch.tensor([3.0, 0.2]))
    assert torch.allclose(s["energy"], 2 * torch.log(torch.exp(z / 2).sum(1)))
    assert s["energy"][0] > s["energy"][1] and s["msp"][0] > s["msp"][1]


def test_mahalanobis_on_synthetic_gaussians():
    """Three classes sharing one anisotropic covariance: the fitted score is minus the squared
    Mahalanobis distance to the nearest class mean, it separates a shifted cloud, and it uses the
    covariance (a point far along the low-variance axis scores worse than one as far along the wide axis)."""
    rng = np.random.default_rng(0)
    d, k = 8, 3
    scales = np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.2])
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    cov = rot @ np.diag(scales**2) @ rot.T
    means = rng.normal(0, 6, (k, d))
    y = rng.integers(0, k, 6000)
    x = means[y] + rng.multivariate_normal(np.zeros(d), cov, 6000)
    st = fit_feature_stats(torch.tensor(x, dtype=torch.float32), torch.tensor(y), k, knn_k=5)
    assert np.allclose(st.means.numpy(), means, atol=0.3)
    assert np.allclose(np.linalg.inv(st.precision.double().numpy()), cov, rtol=0.15, atol=0.3)
    q = means[0] + rng.multivariate_normal(np.zeros(d), cov, 50)
    prec = st.precision.double().numpy()
    expected = -np.min([[(v - m) @ prec @ (v - m) for m in st.means.double().numpy()] for v in q], axis=1)
    assert np.allclose(st.mahalanobis(torch.tensor(q, dtype=torch.float32)).numpy(), expected, rtol=1e-3, atol=1e-2)
    # in-distribution vs. a cloud shifted off every class mean along the narrow directions
    ind = means[rng.integers(0, k, 500)] + rng.multivariate_normal(np.zeros(d), cov, 500)
    shift = rot[:, -3:] @ np.array([3.0, 3.0, 3.0])
    out = means[rng.integers(0, k, 500)] + shift + rng.multivariate_normal(np.zeros(d), cov, 500)
    s_in = st.mahalanobis(torch.tensor(ind, dtype=torch.float32))
    s_out = st.mahalanobis(torch.tensor(out, dtype=torch.float32))
    assert detection_metrics(s_in, s_out)["auroc"] > 0.99
    # the Euclidean-equal step along the widest axis stays in-distribution
    wide = means[0] + rot[:, 0] * 4.0
    narrow = means[0] + rot[:, -1] * 4.0
    s = st.mahalanobis(torch.tensor(np.stack([wide, narrow]), dtype=torch.float32))
    assert s[0] > s[1] + 100


def test_merge_views_and_tta_views():
    z = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # one image, two views
    assert torch.allclose(merge_views(z, "mean_logits"), torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(merge_views(z, "mean_probs").exp(), torch.tensor([[0.5, 0.5]]), atol=1e-6)
    pre = Preprocess((3, 32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    v = tta_transform(pre, "flip")(img)
    assert v.shape == (2, 3, 32, 32) and torch.equal(v[1], v[0].flip(-1))
    assert tta_transform(pre, "ten_crop")(img).shape == (10, 3, 32, 32)
    assert tta_transform(pre, "flip_multiscale")(img).shape == (6, 3, 32, 32)


def test_trained_run_carries_calibration_ood_and_report(tiny_run):
    doc = json.loads((tiny_run / "imgclf.json").read_text())
    cal, ood = doc["calibration"], doc["ood"]
    assert 0.05 <= cal["temperature"] <= 20
    assert cal["val"]["after"]["nll"] <= cal["val"]["before"]["nll"] + 1e-6
    assert set(ood["thresholds"]) == {"msp", "max_logit", "energy", "mahalanobis", "knn"}
    assert (tiny_run / "ood.safetensors").is_file() and (tiny_run / "report.html").is_file()


def test_eval_with_tta_equals_mean_of_flipped_views(tiny_run, tiny_test_folder):
    from imgclf import api

    m_plain = api.evaluate(tiny_run, str(tiny_test_folder), num_workers=0, progress=False)
    m_tta = api.evaluate(tiny_run, str(tiny_test_folder), num_workers=0, progress=False, tta="flip")
    assert m_tta["tta"]["mode"] == "flip" and m_tta["n"] == m_plain["n"] == 24
    model, art = api.load(tiny_run)
    img = Image.open(next(iter(sorted(tiny_test_folder.rglob("*.png"))))).convert("RGB")
    x = art.preprocessing.eval()(img)[None]
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
    preds = api.predict(tiny_run, [str(tiny_test_folder / "class_0" / "img_000.png")], tta="flip",
                        num_workers=0, progress=False, top_k=3)  # fmt: skip
    t = json.loads((tiny_run / "imgclf.json").read_text())["calibration"]["temperature"]
    want = (expected / t).softmax(1)[0]
    got = {d["label"]: d["prob"] for d in preds.rows[0]["top"]}
    assert got == {n: pytest.approx(float(want[i]), abs=1e-4) for i, n in enumerate(art.class_names)}
    # mean of the views' calibrated probabilities; OOD scores still come from the mean logits
    preds = api.predict(tiny_run, [str(tiny_test_folder / "class_0" / "img_000.png")], tta="flip",
                        tta_merge="mean_probs", num_workers=0, progress=False, top_k=3)  # fmt: skip
    with torch.no_grad():
        want = ((model(x) / t).softmax(1) + (model(x.flip(-1)) / t).softmax(1))[0] / 2
    got = {d["label"]: d["prob"] for d in preds.rows[0]["top"]}
    assert got == {n: pytest.approx(float(want[i]), abs=1e-4) for i, n in enumerate(art.class_names)}
    energy = t * torch.logsumexp(expected[0] / t, 0)
    assert preds.rows[0]["ood_score"] == pytest.approx(float(energy), abs=1e-3)


def test_eval_with_ood_data_reports_every_score(tiny_run, tiny_test_folder, tmp_path):
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(3)
    for i in range(20):  # grey noise: far from the colour classes
        Image.fromarray(rng.integers(100, 156, (24, 24, 3), dtype=np.uint8)).save(ood / f"n{i}.png")
    out = tmp_path / "m.json"
    r = run_cli("eval", tiny_run, "--data", tiny_test_folder, "--ood-data", ood, "--json", out, "--no-progress",
                "--workers", "0")  # fmt: skip
    assert r.code == 0, r
    m = json.loads(out.read_text())
    rep = m["ood"]["metrics"]
    assert set(rep) == {"msp", "max_logit", "energy", "mahalanobis", "knn"} and m["ood"]["n"] == 20
    assert max(v["auroc"] for v in rep.values()) >= 0.9  # grey noise vs. saturated colours
    assert "AUROC" in r.out
    assert {"before", "after", "temperature"} <= set(m["calibration"])


def test_predict_answers_unknown_below_the_threshold(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    img = tiny_run.parent / "x.png"
    make_image(1, np.random.default_rng(9)).save(img)
    r = run_cli("predict", run, img, "--format", "json", "--no-progress", "--workers", "0")
    row = json.loads(r.out)["predictions"][0]
    assert r.code == 0 and row["unknown"] is False and row["label"] == "class_1" and "ood_score" in row
    doc = json.loads((run / "imgclf.json").read_text())
    doc["ood"]["thresholds"]["energy"] = row["ood_score"] + 1.0  # now the image scores below the threshold
    (run / "imgclf.json").write_text(json.dumps(doc))
    row = json.loads(run_cli("predict", run, img, "--format", "json", "--no-progress").out)["predictions"][0]
    assert row["unknown"] is True and row["label"] == "unknown" and row["top"][0]["label"] == "class_1"
    row = json.loads(run_cli("predict", run, img, "--format", "json", "--no-progress", "--no-reject").out)
    assert row["predictions"][0]["unknown"] is False
    for score in ("mahalanobis", "knn", "msp"):
        r = run_cli("predict", run, img, "--format", "json", "--no-progress", "--ood-score", score)
        assert r.code == 0 and "ood_score" in json.loads(r.out)["predictions"][0], r


def test_calibrate_refits_temperature_and_eval_applies_it(tiny_run, tiny_test_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = run_cli("calibrate", run, "--data", tiny_test_folder, "--no-progress", "--workers", "0")
    assert r.code == 0, r
    doc = json.loads((run / "imgclf.json").read_text())
    t = doc["calibration"]["temperature"]
    assert doc["calibration"]["refit"]["n"] == 24 and t == pytest.approx(doc["calibration"]["refit"]["temperature"])
    assert doc["calibration"]["refit"]["after"]["nll"] <= doc["calibration"]["refit"]["before"]["nll"] + 1e-6
    assert doc["ood"]["thresholds_data"].endswith("test")
    m = json.loads(run_cli("eval", run, "--data", tiny_test_folder, "--format", "json", "--no-progress").out)
    assert m["calibration"]["temperature"] == pytest.approx(t)
    r = run_cli("calibrate", run, "--data", tmp_path / "nope")
    assert r.code != 0 and "nope" in r.err and "Traceback" not in r.err


def test_ensemble_of_two_runs_averages_calibrated_probabilities(tiny_run, tiny_folder, tiny_test_folder, tmp_path):
    from imgclf import api

    r = run_cli("train", "--data", tiny_folder, "--epochs", "2", "--output", tmp_path, "--name", "b", "--seed", "7",
                *TINY)  # fmt: skip
    assert r.code == 0, r
    ens = api.evaluate_ensemble([tiny_run, tmp_path / "b"], str(tiny_test_folder), num_workers=0, progress=False)
    assert len(ens["members"]) == 2 and ens["ensemble"]["n"] == 24
    best = max(m["top1"] for m in ens["members"].values())
    assert ens["gain"]["top1_points"] == pytest.approx(100 * (ens["ensemble"]["top1"] - best), abs=1e-3)
    # the mean of the members' calibrated probabilities, checked image by image through predict
    imgs = [str(p) for p in sorted(tiny_test_folder.rglob("*.png"))[:4]]
    one = [api.predict(run, imgs, num_workers=0, progress=False, top_k=3) for run in (tiny_run, tmp_path / "b")]
    both = api.predict(tiny_run, imgs, ensemble=[str(tmp_path / "b")], num_workers=0, progress=False, top_k=3)
    for i in range(4):
        p = [{d["label"]: d["prob"] for d in o.rows[i]["top"]} for o in one]
        got = {d["label"]: d["prob"] for d in both.rows[i]["top"]}
        assert got == {k: pytest.approx((p[0][k] + p[1][k]) / 2, abs=2e-6) for k in got}
    r = run_cli("eval", tiny_run, tmp_path / "b", "--data", tiny_test_folder, "--no-progress", "--workers", "0")
    assert r.code == 0 and "ensemble" in r.out.lower(), r
    other = make_folder(tmp_path / "two", n_per_class=6, classes=2)
    r = run_cli("train", "--data", other, "--epochs", "1", "--output", tmp_path, "--name", "c", *TINY)
    assert r.code == 0, r
    r = run_cli("eval", tiny_run, tmp_path / "c", "--data", other, "--no-progress")
    assert r.code != 0 and "classes differ" in r.err and "Traceback" not in r.err


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_explain_writes_an_overlay_png(tiny_run, tmp_path, method):
    img = tmp_path / "in.png"
    make_image(2, np.random.default_rng(4)).save(img)
    out = tmp_path / f"cam_{method}.png"
    r = run_cli("explain", tiny_run, img, "--method", method, "-o", out)
    assert r.code == 0, r
    w, h = _png_size(out)
    assert w > h > 100
    r = run_cli("explain", tiny_run, img, "--target", "no_such_class", "-o", out)
    assert r.code != 0 and "no_such_class" in r.err


def test_cams_for_a_cnn_and_a_vit_point_at_the_object():
    """A model whose logit is the brightness of the top-left quadrant: the CAM must be hot there."""
    import timm

    from imgclf.eval.explain import cam_maps

    x = torch.zeros(1, 3, 32, 32)
    x[:, :, :16, :16] = 1.0
    for name in ("test_resnet", "test_vit"):
        model = timm.create_model(name, pretrained=False, num_classes=2, img_size=32) if "vit" in name else \
            timm.create_model(name, pretrained=False, num_classes=2)  # fmt: skip
        cam = cam_maps(model.eval(), x, [0], "gradcam")
        assert cam.shape == (1, 32, 32) and np.isfinite(cam).all() and 0 <= cam.min() <= cam.max() <= 1


class _Sections(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if key not in a:
                continue
            v = a[key] or ""
            if v.startswith(("http:", "https:", "//")) or (key == "src" and not v.startswith("data:")):
                self.external.append(v)


def test_report_is_self_contained_with_every_section(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ood = make_folder(tmp_path / "ood", n_per_class=4, classes=4, seed=11)  # class 3 (yellow) is unseen
    r = run_cli("report", run, "--ood-data", ood)
    assert r.code == 0, r
    page = (run / "report.html").read_text()
    p = _Sections()
    p.feed(page)
    assert p.ids == list(SECTIONS)
    assert not p.external, p.external
    # training curves, confusion, reliability, OOD histograms + top-loss CAMs: all embedded PNGs that decode
    assert len(p.imgs) >= 4
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for text in ("AUROC", "temperature", "class_2", "top-1"):
        assert text in page


@pytest.mark.unit
def test_tta_crops_resize_with_the_runs_own_interpolation():
    """five_crop used to map lanczos/box/hamming to bicubic silently; now the run's interpolation or an error."""
    from PIL import Image
    from torchvision.transforms import v2

    from imgclf.errors import ImgclfError
    from imgclf.eval.tta import tta_transform

    pre = Preprocess((3, 32, 32), "lanczos", (0.5,) * 3, (0.5,) * 3, 0.875)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    views = tta_transform(pre, "five_crop")(img)
    resized = v2.Resize(36, interpolation=v2.InterpolationMode.LANCZOS)(img)
    ref = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])
    assert torch.allclose(views[0], ref(v2.FiveCrop(32)(resized)[0]), atol=1e-6)  # v2 multiplies by 1/255
    with pytest.raises(ImgclfError, match="'random' is not a known resize"):  # never a silent substitute
        Preprocess.from_json({**pre.to_json(), "interpolation": "random"})
