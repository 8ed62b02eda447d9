"""Any timm architecture (issue 12): fixed-size models at another input size, attention that the ONNX exporter
cannot translate fused, reparameterizable models, the relative parity check, per-format export failures,
bench keeping what it measured, and int8 calibration images disjoint from the held-out ones."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from imgclf.artifact import Artifact
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ImgclfError

from .conftest import TINY, make_folder, run_cli


def _art(model: nn.Module, arch: str, k: int = 3) -> Artifact:
    return Artifact(arch, [f"class_{i}" for i in range(k)], Preprocess.from_model(model))


@pytest.mark.cli
def test_a_fixed_size_vit_trains_and_predicts_at_another_input_size(tmp_path, tiny_folder):
    """``--input-size`` on a fixed-size ViT builds it for that size (timm ``img_size``); loading the run
    rebuilds it so. A size the model cannot take is one line, exit 2, and no half-made run folder."""
    tiny = ["--model", "test_vit", *TINY[2:]]  # TINY: test_efficientnet at 32 px
    r = run_cli("train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "vit", *tiny)
    assert r.code == 0, r.err[-800:]
    from imgclf.artifact import read_artifact

    assert read_artifact(tmp_path / "vit").model_kwargs == {"img_size": 32}  # how to rebuild it on load
    img = next((tiny_folder / "class_0").iterdir())
    p = run_cli("predict", tmp_path / "vit", img, "--runtime", "torch", "--format", "json", "--no-progress")
    assert p.code == 0, p.err[-500:]
    bad = run_cli("train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "bad", *tiny,
                  "--input-size", "36")  # fmt: skip
    assert bad.code == 2 and "cannot take 36x36 inputs" in bad.err and "Traceback" not in bad.err
    assert len(bad.err.strip().splitlines()) == 1, bad.err
    assert not (tmp_path / "bad").exists()


@pytest.mark.unit
def test_size_kwargs_only_for_fixed_size_models_at_another_size():
    from imgclf.models.factory import size_kwargs

    assert size_kwargs("test_vit", 32) == {"img_size": 32}
    assert size_kwargs("test_vit", 160) == {} and size_kwargs("test_vit", None) == {}
    assert size_kwargs("test_resnet", 32) == {}  # convolutional: any size
    assert size_kwargs("test_vit", (32, 48)) == {"img_size": (32, 48)}


@pytest.mark.unit
def test_runs_load_with_the_build_arguments_they_were_trained_with():
    """``Artifact.model_kwargs`` (JSON lists back to tuples); runs saved before it existed have none and build
    as they were trained (e.g. EfficientViT trained at 160 px on the default build)."""
    from imgclf.models.factory import build_model

    assert build_model("test_vit", 3).patch_embed.img_size == (160, 160)
    assert build_model("test_vit", 3, {"img_size": [32, 48]}).patch_embed.img_size == (32, 48)


def _tiny_hiera() -> nn.Module:
    """296k parameters; timm's fused attention here is a 5-D ``scaled_dot_product_attention``, which the ONNX
    exporter cannot translate (measured: "Refer to the full stack trace"); the explicit path exports."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", num_classes=3, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))
    nn.init.normal_(model.get_classifier().weight)  # timm starts Hiera's head at zero: logits would all be 0
    return model.eval()


@pytest.mark.unit
def test_attention_the_exporter_cannot_translate_fused_exports_unfused_and_matches(tmp_path):
    import onnxruntime as ort

    from imgclf.deploy.export.graph import ServingModel, unfused_attention
    from imgclf.deploy.export.onnx import _export_onnx, _export_program

    model = _tiny_hiera()
    with unfused_attention(model) as n:
        assert n > 0 and not any(getattr(m, "fused_attn", False) for m in model.modules())
    assert sum(getattr(m, "fused_attn", False) is True for m in model.modules()) == n  # restored
    art = _art(model, "hiera_tiny_224")
    serving = ServingModel(model, art, "none")
    with pytest.raises(Exception):  # noqa: B017 - the premise: the fused graph does not export
        _export_program(serving, torch.randn(2, 3, 224, 224), None)
    out = _export_onnx(serving, art, "none", tmp_path / "m.onnx", {"imgclf.run": "x"}, None)
    x = torch.randn(2, 3, 224, 224)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    assert float((torch.from_numpy(got) - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.unit
def test_an_export_the_format_cannot_express_is_one_line_naming_arch_format_and_operation(tmp_path, monkeypatch):
    """A stand-in for an exporter failure (mock: no tiny model fails both fused and unfused here)."""
    from imgclf.deploy.export import onnx as onnx_mod
    from imgclf.deploy.export.graph import ServingModel, export_failure

    def fails(*a, **k):
        raise RuntimeError("Traceback...\n  lots of frames\nno ONNX function for torch.ops.aten.frobnicate.default\n")

    monkeypatch.setattr(onnx_mod, "_export_program", fails)
    model = _tiny_hiera()
    art = _art(model, "hiera_tiny_224")
    with pytest.raises(ImgclfError) as e:
        onnx_mod._export_onnx(ServingModel(model, art, "none"), art, "none", tmp_path / "m.onnx", {}, None)
    msg = str(e.value)
    assert msg == "hiera_tiny_224 cannot be exported to onnx: unsupported operation torch.ops.aten.frobnicate.default"
    assert not (tmp_path / "m.onnx").exists()
    other = export_failure("a", "openvino", ValueError("x\nsee https://example\nshape (-1,) not supported"))
    assert other == "a cannot be exported to openvino: shape (-1,) not supported"


@pytest.mark.unit
def test_reparameterizable_models_infer_fused_and_equal_to_unfused():
    from imgclf.models.inference import REPARAM_RTOL, reparameterized

    for name in ("mobileone_s0", "repvit_m0_9"):
        model = timm.create_model(name, num_classes=3).eval()
        fused = reparameterized(model, (3, 64, 64))
        assert fused is not model
        n_before, n_after = (sum(isinstance(m, nn.BatchNorm2d) for m in x.modules()) for x in (model, fused))
        assert n_after < n_before, (name, n_before, n_after)  # branches and BatchNorms folded into convolutions
        x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref, got = model(x), fused(x)
        assert float((got - ref).abs().max() / ref.abs().max()) <= REPARAM_RTOL, name
    plain = timm.create_model("test_resnet", num_classes=3)
    assert reparameterized(plain, (3, 32, 32)) is plain  # nothing to fuse: the model itself


@pytest.mark.unit
def test_parity_is_judged_by_relative_logit_error_and_top1():
    """MobileOne-like logits of 1e10 with a 1e4 absolute difference agree; logits of 1e-3 off by 1e-4 do not."""
    from imgclf.deploy.export.verification import parity_ok, verify

    class Scaled(nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            logits = x.flatten(1)[:, :3].double() * self.scale
            return logits.float(), logits.softmax(1).float(), x.flatten(1)

    art = Artifact("test_resnet", ["a", "b", "c"], Preprocess((3, 4, 4), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0))
    px = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    batches = [(px, torch.full((8,), -1))]
    big = Scaled(1e10)
    v = verify(lambda x: big(torch.from_numpy(x))[0].numpy() + 1e4, big, batches, art, "none")
    assert v["max_abs_logit_diff"] >= 1e4 and v["max_rel_logit_diff"] < 1e-5 and parity_ok(v)
    small = Scaled(1e-3)
    v = verify(lambda x: small(torch.from_numpy(x))[0].numpy() * 1.1, small, batches, art, "none")
    assert v["max_abs_logit_diff"] < 1e-3 and v["max_rel_logit_diff"] > 0.05 and not parity_ok(v)


@pytest.mark.unit
def test_int8_calibration_and_held_out_images_are_disjoint(tmp_path):
    from imgclf.deploy.export.verification import _calibration_batches

    data = make_folder(tmp_path / "d", n_per_class=12, classes=3, seed=4)
    art = _art(timm.create_model("test_resnet", num_classes=3), "test_resnet")
    calib, held = _calibration_batches(tmp_path, art, str(data), n=20, held_n=100)
    key = [bytes(x.numpy()) for px, _ in calib for x in px]
    other = [bytes(x.numpy()) for px, _ in held for x in px]
    assert len(key) == 20 and len(other) == 36 - 20 and not set(key) & set(other)
    assert len(set(key + other)) == 36  # every generated image is distinct, so disjoint means disjoint files
    again, _ = _calibration_batches(tmp_path, art, str(data), n=20, held_n=0)
    assert [bytes(x.numpy()) for px, _ in again for x in px] == key  # the calibration set does not depend on held_n


@pytest.mark.cli
def test_one_failing_format_does_not_stop_the_others(tiny_run, tmp_path, monkeypatch):
    from imgclf.deploy.export import onnx as onnx_mod

    def fails(*a, **k):
        raise RuntimeError("no ONNX function for aten.frobnicate.default")

    monkeypatch.setattr(onnx_mod, "_export_program", fails)  # mock: an exporter that cannot translate the model
    r = run_cli("export", tiny_run, "--format", "onnx", "torchscript", "-o", tmp_path / "e", "--verify-n", "8")
    assert r.code == 2 and "cannot be exported to onnx: unsupported operation aten.frobnicate.default" in r.err
    assert "1 of 2 formats failed: onnx" in r.err and "Traceback" not in r.err
    assert "torchscript" in r.out and (tmp_path / "e" / "model.ts").is_file()


@pytest.mark.cli
def test_bench_keeps_the_rows_of_runtimes_that_worked(tiny_run, monkeypatch):
    from imgclf.deploy import bench

    real = bench.load_predictor

    def flaky(art, rt, *a, **k):
        if rt == "onnx":
            raise RuntimeError("onnxruntime could not load the model\nmore detail")  # mock: a runtime failure
        return real(art, rt, *a, **k)

    monkeypatch.setattr(bench, "load_predictor", flaky)
    res = bench.bench_run(tiny_run, ["torch", "onnx", "torch-cl"], (1, 2), warmup=0, repeats=1, progress=False)
    assert [(r["runtime"], r["batch"]) for r in res["results"]] == [("torch", 1), ("torch", 2), ("torch-cl", 1),
                                                                    ("torch-cl", 2)]  # fmt: skip
    assert res["skipped"] == {"onnx": "onnxruntime could not load the model"}
    assert [r["top1_agreement_with_first"] for r in res["results"]] == [1.0, 1.0, 1.0, 1.0]
    # the first runtime failing: nothing to compare with, not a silent comparison with the second
    res = bench.bench_run(tiny_run, ["onnx", "torch"], (1,), warmup=0, repeats=1, progress=False)
    assert [(r["runtime"], r["top1_agreement_with_first"], r["speedup"]) for r in res["results"]] == [
        ("torch", None, None)]  # fmt: skip
