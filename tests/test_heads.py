"""Fine-grained heads (``model.head``): GeM, bilinear and compact bilinear pooling on timm CNNs; shapes, the
methods' defining properties, head parameters, a trained run that reloads, the probe cache, export and serve parity.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from imgclf.config import ModelConfig, build_config
from imgclf.errors import ImgclfError
from imgclf.models.factory import build_model, create_model
from imgclf.models.heads import BilinearPool, CompactBilinearPool, GeM, head_spec, set_head
from imgclf.models.inference import embedding_dim, forward_both
from imgclf.models.transfer import head_names, param_groups

from .conftest import TINY, run_cli

SMALL = {"bilinear_dim": 8, "compact_dim": 128}  # D' = 64 (bilinear), 128 (compact)


def _model(name: str, head: str, k: int = 3, **kw):
    model, _ = create_model(ModelConfig(name=name, weights="none", head=head, **{**SMALL, **kw}), k)
    return model.eval()


@pytest.mark.unit
@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_convnext"])
@pytest.mark.parametrize("head", ["gem", "bilinear", "compact_bilinear"])
def test_feature_and_logit_shapes(name, head):
    model = _model(name, head).to(memory_format=torch.channels_last)
    c = _model(name, "linear").num_features
    width = {"gem": c, "bilinear": 64, "compact_bilinear": 128}[head]
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits, feats = forward_both(model, x, logits=True, features=True)
    assert logits.shape == (2, 3) and feats.shape == (2, width)
    assert model.num_features == embedding_dim(model) == width
    clf = model.get_classifier()
    assert isinstance(clf, nn.Linear) and (clf.in_features, clf.out_features) == (width, 3)
    if head != "gem":
        assert torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)  # signed sqrt + L2: unit norm


@pytest.mark.unit
def test_bilinear_is_the_signed_sqrt_l2_of_the_mean_outer_product():
    torch.manual_seed(0)
    pool = BilinearPool(6, dim=4).eval()
    x = torch.randn(2, 6, 3, 5)
    with torch.no_grad():
        got = pool(x)
        f = pool.reduce(x).flatten(2)  # (2, 4, 15)
        b = torch.einsum("ncl,ndl->ncd", f, f).flatten(1) / 15
    z = b.sign() * (b.abs() + 1e-8).sqrt()
    assert torch.allclose(got, z / z.norm(dim=1, keepdim=True), atol=1e-6)
    # one location: <B(x), B(y)> before the square root is <x, y>^2
    u, v = torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)
    pool.reduce.weight.data = torch.eye(4)[:, :, None, None]
    bu, bv = pool.bilinear(u).flatten(1), pool.bilinear(v).flatten(1)
    assert torch.allclose((bu * bv).sum(), (u.flatten() @ v.flatten()) ** 2, rtol=1e-5)


def _count_sketch(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, d: int) -> torch.Tensor:
    """(N, c) -> (N, d): ``out[h[i]] += s[i] x[i]``."""
    return x.new_zeros(len(x), d).index_add(1, h, x * s)


@pytest.mark.unit
def test_compact_bilinear_is_the_tensor_sketch_of_gao_et_al():
    """Sketching the pooled bilinear matrix equals the mean over locations of Gao et al.'s FFT form
    ``IFFT(FFT(CS1(x)) * FFT(CS2(x)))``."""
    torch.manual_seed(0)
    pool = CompactBilinearPool(5, dim=6, sketch_dim=32).eval()
    x = torch.randn(2, 5, 3, 4)
    with torch.no_grad():
        f = pool.reduce(x).flatten(2).transpose(1, 2).reshape(-1, 6)  # (N * L, 6) local features
        got = pool.pooled(pool.bilinear(x))
    cs1, cs2 = (_count_sketch(f, getattr(pool, f"h{i}"), getattr(pool, f"s{i}"), 32) for i in (1, 2))
    ts = torch.fft.irfft(torch.fft.rfft(cs1) * torch.fft.rfft(cs2), n=32).reshape(2, 12, 32).mean(1)
    assert torch.allclose(got, ts, atol=1e-5)


@pytest.mark.unit
def test_tensor_sketch_approximates_the_bilinear_inner_product():
    """<TS(x (x) x), TS(y (x) y)> estimates <x (x) x, y (x) y> = <x, y>^2 without bias; the error shrinks with d."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = x + 0.7 * torch.randn(64, 16, generator=g)  # correlated pairs
    exact = (x * y).sum(1) ** 2
    scale = (x.norm(dim=1) * y.norm(dim=1)) ** 2  # |x (x) x| |y (x) y|

    def err(d: int) -> float:
        pool = CompactBilinearPool(16, dim=16, sketch_dim=d, seed=1)
        tx, ty = (pool.pooled(v[:, :, None] * v[:, None, :]) for v in (x, y))
        return float(((tx * ty).sum(1) - exact).abs().div(scale).mean())

    big, small = err(8192), err(64)
    assert big < 0.02 and big < small / 4


@pytest.mark.unit
def test_compact_bilinear_hashes_are_fixed_and_saved():
    a, b = CompactBilinearPool(4, 8, 64), CompactBilinearPool(4, 8, 64)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in ("seed", "h1", "h2", "s1", "s2"))
    other = CompactBilinearPool(4, 8, 64, seed=7)
    assert not torch.equal(other.h1, a.h1)
    a.load_state_dict(other.state_dict())  # a reload takes the stored hashes
    assert torch.equal(a.h1, other.h1) and int(a.seed) == 7


@pytest.mark.unit
def test_gem_with_p_1_is_average_pooling_and_large_p_approaches_max():
    x = torch.rand(2, 5, 4, 3) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean((2, 3)), atol=1e-6)
    assert torch.allclose(GeM(p=200.0)(x), x.amax((2, 3)), rtol=0.02)
    assert GeM(p=3.0, flatten=False)(x).shape == (2, 5, 1, 1)


@pytest.mark.unit
def test_refused_for_a_vit_and_for_layers_that_need_the_old_width():
    with pytest.raises(ImgclfError, match=r"model.head gem needs a CNN backbone .* test_vit has none"):
        _model("test_vit", "gem")
    m = _model("mobilenetv3_small_050", "gem")  # GeM keeps the width: MobileNetV3's conv_head still fits
    assert isinstance(m.global_pool, GeM)
    with pytest.raises(ImgclfError, match=r"head bilinear does not fit mobilenetv3_small_050.*use model.head gem"):
        _model("mobilenetv3_small_050", "bilinear")


@pytest.mark.unit
def test_head_config_is_validated_and_recorded():
    with pytest.raises(ImgclfError, match="model.gem_p"):
        build_config([{"model": {"gem_p": 0}}], ["test"])
    with pytest.raises(ImgclfError, match="model.head"):
        build_config([{"model": {"head": "nope"}}], ["test"])
    cfg = build_config([{"model": {"head": "compact_bilinear", "compact_dim": 2048}}], ["test"]).model
    assert head_spec(cfg) == {"kind": "compact_bilinear", "dim": 256, "sketch_dim": 2048, "seed": 0}
    assert head_spec(ModelConfig()) is None


@pytest.mark.unit
@pytest.mark.parametrize("head", ["gem", "bilinear"])
def test_pooling_parameters_train_with_the_head(head):
    model = _model("test_efficientnet", head)
    pool_params = {n for n, _ in model.named_parameters() if n.startswith("global_pool.")}
    assert pool_params == ({"global_pool.p"} if head == "gem" else {"global_pool.reduce.weight"})
    assert head_names(model) == pool_params | {"classifier.weight", "classifier.bias"}
    groups = param_groups(model, 0.05, backbone_lr_scale=0.1)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert all(scale[id(p)] == 1.0 for n, p in model.named_parameters() if n in pool_params)


@pytest.mark.unit
def test_backbone_weights_load_into_a_head_model(tmp_path):
    """A plain model's weights file fits a model with a pooling head: pooling keys are new layers, the classifier
    of another width is dropped and the new head starts at zero."""
    from safetensors.torch import save_file

    plain = _model("test_efficientnet", "linear", k=5)
    path = tmp_path / "w.safetensors"
    save_file(plain.state_dict(), str(path))
    model, source = create_model(ModelConfig(name="test_efficientnet", weights=str(path), head="bilinear", **SMALL), 3)
    assert source.startswith("file:") and torch.equal(model.conv_stem.weight, plain.conv_stem.weight)
    assert not model.classifier.weight.any() and model.classifier.in_features == 64
    rebuilt = build_model("test_efficientnet", 3, head=head_spec(ModelConfig(head="bilinear", **SMALL)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # the same structure from the recorded spec


@pytest.mark.unit
def test_set_head_keeps_the_model_a_timm_model():
    import timm

    m = timm.create_model("test_resnet", num_classes=4)
    assert set_head(m, None, "test_resnet") is False
    assert set_head(m, {"kind": "gem", "p": 2.0}, "test_resnet") is False  # same width: classifier kept
    assert float(m.global_pool.p.detach()) == 2.0 and m.fc.in_features == 96


# --------------------------------------------------------------------------- trained runs


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory, tiny_folder):
    """One epoch on the tiny folder with each pooling head, at 64 pixels (2 x 2 feature maps: at
    1 x 1 every pooling is the identity and GeM's p gets no gradient)."""
    out = tmp_path_factory.mktemp("head-runs")
    # compact bilinear at its defaults (65536 entries in 8192 bins): its ONNX export once failed parity only there
    heads = {"gem": [], "bilinear": ["--model.bilinear_dim", "8"], "compact_bilinear": []}
    for head, extra in heads.items():
        r = run_cli("train", "--data", tiny_folder, "--epochs", "1", "--output", out, "--name", head, *TINY,
                    "--input-size", "64", "--model.head", head, *extra, "--trust.report", "false")  # fmt: skip
        assert r.code == 0, r
    return out


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.parametrize("head", ["gem", "bilinear", "compact_bilinear"])
def test_a_trained_run_reloads_with_identical_logits(head_runs, head):
    from imgclf.artifact import load_artifact, read_artifact
    from imgclf.deploy.runtime import load_predictor, to_pixels
    from imgclf.eval.predictions import load_predictions
    from imgclf.rundir import VAL_PREDICTIONS

    run = head_runs / head
    art = read_artifact(run)
    assert art.head["kind"] == head and art.config["model"]["head"] == head
    model, _ = load_artifact(run)
    pools = {"gem": GeM, "bilinear": BilinearPool, "compact_bilinear": CompactBilinearPool}
    assert type(model.global_pool) is pools[head]
    saved = load_predictions(run / VAL_PREDICTIONS)  # logits of the trained model in memory
    from PIL import Image

    images = [Image.open(n).convert("RGB") for n in saved.names]
    logits, probs, feats = load_predictor(run, "torch")(to_pixels(images, art))  # serve's PyTorch runtime
    assert np.abs(logits - saved.logits.numpy()).max() < 1e-4
    assert feats.shape[1] == model.num_features == {"gem": 256, "bilinear": 64, "compact_bilinear": 8192}[head]
    if head == "gem":
        assert float(model.global_pool.p.detach()) != 3.0  # p learned


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.parametrize("head", ["gem", "bilinear", "compact_bilinear"])
def test_export_and_serving_runtimes_agree_with_pytorch(head_runs, tmp_path, tiny_test_folder, head):
    from imgclf.deploy.export import export_run, parity_ok
    from imgclf.deploy.runtime import load_predictor

    run = tmp_path / head
    shutil.copytree(head_runs / head, run)
    for fmt in ("onnx", "torchscript", "openvino"):
        v = export_run(run, fmt, data=str(tiny_test_folder))["verify"]
        assert parity_ok(v) and v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-4, (fmt, v)
    px = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    ref = load_predictor(run, "torch")(px)
    for runtime in ("onnxruntime", "openvino"):  # what `imgclf serve --runtime ...` answers with
        got = load_predictor(run, runtime)(px)
        # logits, probs, features; relative to each output's scale (bilinear features reach large magnitudes, and
        # the summation order of another CPU's kernels moves their last float bits: AMD Zen 5 vs Intel)
        # (features: 5e-4; onnxruntime's bilinear features were 1.08e-4 apart on AMD Zen 5, logits 1.2e-5)
        diffs = [float(np.abs(g - r).max() / max(1.0, np.abs(r).max())) for g, r in zip(got, ref)]
        assert diffs[0] < 1e-4 and diffs[1] < 1e-4 and diffs[2] < 5e-4, (runtime, diffs)


@pytest.mark.cli
@pytest.mark.slow
def test_cached_probe_features_are_keyed_by_the_head(tmp_path, tiny_folder):
    cache = tmp_path / "cache"
    probe = ["--strategy", "probe", "--probe.cache_dir", cache, "--trust.report", "false", "--trust.ood", "false"]
    for i, head in enumerate(["linear", "gem", "bilinear"]):
        r = run_cli("train", "--data", tiny_folder, "--output", tmp_path, "--name", head, *TINY, *probe,
                    "--model.head", head, "--model.bilinear_dim", "8")  # fmt: skip
        assert r.code == 0, r
        assert len(list(cache.glob("*.safetensors"))) == 2 * (i + 1)  # train + val features of each head


@pytest.mark.cli
def test_feature_ood_scores_refuse_wide_heads_before_training(tmp_path, tiny_folder):
    r = run_cli("train", "--data", tiny_folder, "--output", tmp_path, *TINY, "--model.head", "bilinear",
                "--trust.ood_score", "mahalanobis")  # fmt: skip
    assert r.code != 0 and "trust.ood_score mahalanobis needs feature statistics" in r.err
    assert "65536" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.cli
@pytest.mark.slow
def test_default_bilinear_trains_with_logit_ood_scores_and_predicts(tmp_path, tiny_folder, tiny_test_folder):
    """256 reduced channels: 65536 features, wider than the OOD feature statistics take; the run keeps the logit
    scores (energy by default) and no drift embedding reference."""
    from imgclf.artifact import read_artifact

    r = run_cli("train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "b", *TINY,
                "--model.head", "bilinear", "--trust.report", "false")  # fmt: skip
    assert r.code == 0, r
    art = read_artifact(tmp_path / "b")
    assert art.head == {"kind": "bilinear", "dim": 256} and "energy" in art.ood["thresholds"]
    assert "mahalanobis" not in art.ood["thresholds"] and "emb_mean" not in art.drift
    assert not (tmp_path / "b" / "ood.safetensors").exists()
    r = run_cli("predict", tmp_path / "b", tiny_test_folder, "--no-progress", "--workers", "0")
    assert r.code == 0, r
