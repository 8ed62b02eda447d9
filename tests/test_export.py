"""Exports checked with the real runtimes: onnxruntime, OpenVINO and TorchScript against PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from .conftest import run_cli


@pytest.fixture(scope="module")
def run(clear_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(clear_run, d)
    return d


def _torch_reference(run, pixels_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and calibrated probabilities of the PyTorch model for uint8 NHWC pixels at the input size."""
    from imgclf import api

    model, art = api.load(run)
    x = torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(art.preprocessing.mean), torch.tensor(art.preprocessing.std)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    t = art.temperature
    with torch.no_grad():
        logits = model(x)
    return logits.numpy(), (logits / t).softmax(1).numpy()


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_onnx_has_preprocessing_calibration_and_metadata_in_the_graph(run, tiny_test_folder):
    import onnx
    import onnxruntime as ort

    r = run_cli("export", run, "--format", "onnx", "--data", tiny_test_folder)
    assert r.code == 0, r
    rec = json.loads((run / "export" / "export.json").read_text())["onnx"]
    assert rec["verify"]["images"] == 24 and rec["verify"]["top1_agreement"] == 1.0
    assert rec["verify"]["max_abs_logit_diff"] < 1e-4
    path = run / "export" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["imgclf.labels"]) == ["class_0", "class_1", "class_2"]
    assert json.loads(meta["imgclf.preprocessing"])["input_size"] == [3, 32, 32] and meta["imgclf.pixels"] == "nhwc"
    assert set(json.loads(meta["imgclf.ood"])["thresholds"]) >= {"energy", "msp"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    for n in (1, 5):  # dynamic batch
        px = _pixels(n, seed=n)
        logits, probs, feats = sess.run(["logits", "probs", "features"], {"input": px})
        ref_logits, ref_probs = _torch_reference(run, px)
        assert logits.shape == (n, 3) and feats.ndim == 2 and len(feats) == n
        assert np.abs(logits - ref_logits).max() < 1e-4 and np.abs(probs - ref_probs).max() < 1e-5
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert "onnx" in r.out and "100.00 %" in r.out


@pytest.mark.parametrize("pixels", ["nchw", "none"])
def test_onnx_other_input_layouts(run, tmp_path, pixels, tiny_test_folder):
    r = run_cli("export", run, "--format", "onnx", "--pixels", pixels, "-o", tmp_path, "--data", tiny_test_folder)
    assert r.code == 0, r
    v = json.loads((tmp_path / "export.json").read_text())["onnx"]["verify"]
    assert v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-4


def test_torchscript_and_openvino_agree_with_pytorch(run, tmp_path, tiny_test_folder):
    import openvino as ov

    r = run_cli("export", run, "--format", "torchscript", "openvino", "-o", tmp_path, "--data", tiny_test_folder)
    assert r.code == 0, r
    rec = json.loads((tmp_path / "export.json").read_text())
    for fmt in ("torchscript", "openvino"):
        assert rec[fmt]["verify"]["top1_agreement"] == 1.0 and rec[fmt]["verify"]["max_abs_logit_diff"] < 1e-3, fmt
    assert (tmp_path / "model.xml").is_file() and (tmp_path / "model.bin").is_file()
    assert not (tmp_path / "model.onnx").exists()  # the intermediate ONNX is not left behind
    compiled = ov.Core().compile_model(str(tmp_path / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    px = _pixels(4, seed=3)
    ref_logits, ref_probs = _torch_reference(run, px)
    assert np.abs(compiled(px)[compiled.output("probs")] - ref_probs).max() < 1e-4
    with pytest.warns(FutureWarning):  # TorchScript is deprecated upstream: pt2 is its successor (next test)
        ts = torch.jit.load(str(tmp_path / "model.ts"))
    assert np.abs(ts(torch.from_numpy(px))[0].detach().numpy() - ref_logits).max() < 1e-4


def test_pt2_is_a_torch_export_program_with_a_dynamic_batch(run, tmp_path, tiny_test_folder):
    r = run_cli("export", run, "--format", "pt2", "-o", tmp_path, "--data", tiny_test_folder)
    assert r.code == 0, r
    v = json.loads((tmp_path / "export.json").read_text())["pt2"]["verify"]
    assert v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-4 and v["images"] == 24
    extra = {"imgclf.labels": "", "imgclf.pixels": ""}
    program = torch.export.load(str(tmp_path / "model.pt2"), extra_files=extra)  # a file this test just made
    assert json.loads(extra["imgclf.labels"]) == ["class_0", "class_1", "class_2"] and extra["imgclf.pixels"] == "nhwc"
    module = program.module()
    for n in (1, 5):  # any batch size, one graph
        px = _pixels(n, seed=n)
        ref_logits, ref_probs = _torch_reference(run, px)
        with torch.no_grad():
            logits, probs, _ = (t.numpy() for t in module(torch.from_numpy(px)))
        assert np.abs(logits - ref_logits).max() < 1e-4 and np.abs(probs - ref_probs).max() < 1e-5


def test_executorch_pte_fp32_and_int8_run_on_executorchs_runtime(run, tmp_path, tiny_folder, tiny_test_folder):
    pytest.importorskip("executorch")
    from imgclf.deploy.export.executorch import PTE_MAX_BATCH
    from imgclf.deploy.runtime import load_predictor

    r = run_cli("export", run, "--format", "executorch", "executorch-int8", "--data", tiny_test_folder,
                "--calib-data", tiny_folder, "--int8-tolerance", "100")  # fmt: skip
    assert r.code == 0, r
    rec = json.loads((run / "export" / "export.json").read_text())
    fp, q = rec["executorch"]["verify"], rec["executorch-int8"]["verify"]
    assert fp["top1_agreement"] == 1.0 and fp["max_rel_logit_diff"] < 1e-4 and fp["images"] == 24
    assert q["top1_agreement"] >= 0.9 and rec["executorch-int8"]["calibration_images"] == 48
    assert (run / "export" / "model.int8.pte").stat().st_size < (run / "export" / "model.pte").stat().st_size / 2
    for rt in ("executorch", "executorch-int8"):
        pred = load_predictor(run, rt)
        for n in (1, PTE_MAX_BATCH + 3):  # beyond the planned batch: run in chunks
            px = _pixels(n, seed=n)
            logits, probs, feats = pred(px)
            ref_logits, ref_probs = _torch_reference(run, px)
            assert logits.shape == ref_logits.shape and len(feats) == n
            if rt == "executorch":
                assert np.abs(probs - ref_probs).max() < 1e-4
            else:  # int8 on noise pictures: the same answers mostly (the real images' figures are checked above)
                assert (
                    np.allclose(probs.sum(1), 1, atol=1e-4) and (probs.argmax(1) == ref_probs.argmax(1)).mean() >= 0.75
                )


def test_litert_tflite_agrees_with_pytorch_on_its_interpreter(run, tmp_path, tiny_test_folder):
    import importlib.util
    import sys

    if importlib.util.find_spec("litert_torch") is None:  # not importorskip: importing it loads JAX here
        pytest.skip("litert-torch is not installed")
    from imgclf.deploy.runtime import load_predictor

    r = run_cli("export", run, "--format", "litert", "--data", tiny_test_folder)
    assert r.code == 0, r
    assert "jax" not in sys.modules  # the conversion ran in a child process: no JAX threads here before a fork
    rec = json.loads((run / "export" / "export.json").read_text())["litert"]
    assert rec["batch"] == 1 and rec["verify"]["top1_agreement"] == 1.0 and rec["verify"]["max_rel_logit_diff"] < 1e-4
    pred = load_predictor(run, "litert")
    for n in (1, 5):  # batch 1 per call: larger batches run image by image
        px = _pixels(n, seed=10 + n)
        logits, probs, feats = pred(px)
        ref_logits, ref_probs = _torch_reference(run, px)
        assert len(feats) == n and np.abs(probs - ref_probs).max() < 1e-4 and np.abs(logits - ref_logits).max() < 1e-3


def test_coreml_package_has_the_serving_graph_and_says_it_is_unverified_off_apple(run, tmp_path):
    ct = pytest.importorskip("coremltools")
    import sys

    r = run_cli("export", run, "--format", "coreml", "-o", tmp_path, "--verify-n", "4")
    assert r.code == 0, r
    rec = json.loads((tmp_path / "export.json").read_text())["coreml"]
    if sys.platform != "darwin":  # Core ML runs only on Apple platforms: never reported as checked
        assert rec["verify"]["images"] == 0 and "Apple" in rec["verify"]["skipped"] and "not verified" in r.out
    spec = ct.utils.load_spec(str(tmp_path / "model.mlpackage"))
    assert [o.name for o in spec.description.output][:2] and len(spec.description.output) == 3
    (inp,) = spec.description.input
    ranges = inp.type.multiArrayType.shapeRange.sizeRanges
    assert [(d.lowerBound, d.upperBound) for d in ranges][0] == (1, 64)  # flexible batch
    assert [d.lowerBound for d in ranges][1:] == [32, 32, 3]  # NHWC pixels at the input size
    assert json.loads(spec.description.metadata.userDefined["imgclf.labels"]) == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("fmt", ["onnx-int8", "openvino-int8"])
def test_int8_reports_its_drop_and_refuses_beyond_the_tolerance(run, tmp_path, tiny_folder, tiny_test_folder, fmt):
    r = run_cli("export", run, "--format", fmt, "-o", tmp_path, "--data", tiny_test_folder,
                "--calib-data", tiny_folder, "--int8-tolerance", "100")  # fmt: skip
    assert r.code == 0, r
    rec = json.loads((tmp_path / "export.json").read_text())[fmt]
    assert rec["calibration_images"] == 48 and rec["verify"]["images"] == 24
    assert rec["verify"]["top1_agreement"] >= 0.9  # 3 separable colour classes survive 8 bits
    if fmt == "onnx-int8":
        import onnx

        graph = onnx.load(rec["path"]).graph
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    else:
        import openvino as ov

        model = ov.Core().read_model(rec["path"])
        assert "FakeQuantize" in {op.get_type_name() for op in model.get_ops()}
        assert json.loads(model.get_rt_info(["imgclf", "labels"]).astype(str)) == ["class_0", "class_1", "class_2"]
    # a tolerance nothing can meet: refused with one line, the int8 file removed
    out2 = tmp_path / "strict"
    r = run_cli("export", run, "--format", fmt, "-o", out2, "--data", tiny_test_folder,
                "--calib-data", tiny_folder, "--int8-tolerance", "-1")  # fmt: skip
    assert r.code == 2 and "int8 model loses" in r.err and "Traceback" not in r.err
    left = [p for p in out2.iterdir() if p.name != "export.json"] if out2.exists() else []
    assert not left, left  # nothing half-made left behind


def test_triton_repository_layout(run, tmp_path, tiny_test_folder):
    r = run_cli("export", run, "--format", "triton", "-o", tmp_path, "--data", tiny_test_folder)
    assert r.code == 0, r
    repo = tmp_path / "triton" / "tiny"
    assert (repo / "1" / "model.onnx").is_file()
    cfg = (repo / "config.pbtxt").read_text()
    for text in ('name: "tiny"', 'platform: "onnxruntime_onnx"', "max_batch_size: 64", "TYPE_UINT8",
                 "dims: [32, 32, 3]", "dims: [ 3 ]", "dynamic_batching"):  # fmt: skip
        assert text in cfg, text
    assert (repo / "labels.txt").read_text().split() == ["class_0", "class_1", "class_2"]


def test_export_errors_are_one_line(run, tmp_path):
    r = run_cli("export", tmp_path / "missing", "--format", "onnx")
    assert r.code == 2 and "not found" in r.err and "Traceback" not in r.err
    r = run_cli("export", run, "--format", "onnx", "--data", tmp_path / "nope", "-o", tmp_path)
    assert r.code == 2 and "nope" in r.err
