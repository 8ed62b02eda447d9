"""One Predictor interface over torch, ONNX Runtime and OpenVINO: same pixels in, same answers out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imgclf.errors import ImgclfError

from .conftest import make_image, run_cli


@pytest.fixture(scope="module")
def run(clear_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt") / "tiny"
    shutil.copytree(clear_run, d)
    return d


def test_every_runtime_gives_the_same_calibrated_probabilities(run, tiny_folder):
    from imgclf.deploy.export import export_run
    from imgclf.deploy.runtime import available_runtimes, cache_root, load_predictor, to_pixels

    rng = np.random.default_rng(0)
    ref = load_predictor(run, "torch")
    px = to_pixels([make_image(c % 3, rng) for c in range(6)], ref.art)
    assert px.shape == (6, 32, 32, 3) and px.dtype == np.uint8
    logits0, probs0, feats0 = ref(px)
    assert feats0.ndim == 2 and len(feats0) == 6
    assert probs0.argmax(1).tolist() == [0, 1, 2, 0, 1, 2]
    have = available_runtimes()
    assert {"torch", "torch-cl", "onnxruntime", "onnxruntime-int8", "openvino"} <= set(have)
    with pytest.raises(ImgclfError, match="no accepted onnx-int8 export; make one with `imgclf export"):
        load_predictor(run, "onnxruntime-int8")  # int8 is never made implicitly: it needs calibration images
    for fmt in ("onnx-int8", "openvino-int8"):
        export_run(run, fmt, data=str(tiny_folder), calib_data=str(tiny_folder), verify_n=48, calib_n=48, force=True)
    for rt in (r for r in have if not r.startswith(("executorch", "litert"))):  # edge runtimes: test_export.py
        logits, probs, feats = load_predictor(run, rt)(px)
        assert feats.shape == feats0.shape, rt
        tol = 0.05 if rt.endswith(("bf16", "int8")) else 1e-4
        assert np.abs(probs - probs0).max() < tol, rt
        assert (probs.argmax(1) == probs0.argmax(1)).all(), rt
    assert not (run / "export" / "model.onnx").exists()  # fp32 formats compiled into the user cache, not the run
    assert list(cache_root().glob("exports/*/model.onnx")) and list(cache_root().glob("exports/*/model.xml"))


def test_exports_are_reused_until_the_run_changes(run):
    import os
    import time

    from imgclf.deploy.runtime import load_predictor

    first = Path(load_predictor(run, "onnxruntime").path)
    mtime = first.stat().st_mtime
    assert Path(load_predictor(run, "onnxruntime").path) == first and first.stat().st_mtime == mtime  # reused
    doc = json.loads((run / "imgclf.json").read_text())
    doc["calibration"]["temperature"] = 2.0  # e.g. `imgclf calibrate` rewrote the temperature
    (run / "imgclf.json").write_text(json.dumps(doc))
    second = Path(load_predictor(run, "onnxruntime").path)
    assert second != first and second.is_file()  # a new content key: exported again
    r = run_cli("export", run, "--format", "onnx")  # the run's own export wins while it is current
    assert r.code == 0 and Path(load_predictor(run, "onnxruntime").path) == run / "export" / "model.onnx", r
    copy = run.parent / "copy"
    shutil.copytree(run, copy)  # a copy with new file times: still current (the export records the content)
    later = time.time() + 5
    os.utime(copy / "export" / "model.onnx", (later - 100, later - 100))  # older than the run's files
    assert Path(load_predictor(copy, "onnxruntime").path) == copy / "export" / "model.onnx"
    doc["calibration"]["temperature"] = 3.0  # the run changed after its export: stale, the cache is used
    (run / "imgclf.json").write_text(json.dumps(doc))
    os.utime(run / "export" / "model.onnx", (later, later))  # even when the export looks newer
    third = Path(load_predictor(run, "onnxruntime").path)
    assert third.parent != run / "export" and third.is_file()
    (third.parent / "model.onnx").write_bytes(b"damaged")  # a damaged cache entry is made again
    fixed = load_predictor(run, "onnxruntime")
    assert Path(fixed.path) == third and fixed(np.zeros((1, 32, 32, 3), np.uint8))[1].shape == (1, 3)


def test_bench_writes_throughput_and_latency_per_runtime_and_batch(run, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", run, "--runtimes", "torch", "onnxruntime", "--batch-sizes", "1", "4", "--repeats", "3",
                "--warmup", "1", "--json", out, "--no-progress")  # fmt: skip
    assert r.code == 0, r
    res = json.loads(out.read_text())
    rows = {(x["runtime"], x["batch"]): x for x in res["results"]}
    assert set(rows) == {("torch", 1), ("torch", 4), ("onnxruntime", 1), ("onnxruntime", 4)}
    for x in rows.values():
        assert x["img_per_s"] > 0 and x["latency_ms_median"] > 0 and x["latency_ms_p90"] >= x["latency_ms_median"]
        assert x["top1_agreement_with_first"] == 1.0
    assert rows[("torch", 4)]["speedup"] == 1.0
    assert "onnxruntime" in r.out and "img/s" in r.out
    r = run_cli("bench", run, "--runtimes", "tensorrt")
    assert r.code == 2 and "tensorrt" in r.err


def test_predict_runtime_flag_gives_the_same_answers(run, tiny_test_folder):
    outs = {}
    for rt in ("torch", "onnxruntime", "auto"):
        r = run_cli("predict", run, tiny_test_folder, "--runtime", rt, "--format", "json", "--no-progress",
                    "--workers", "0", "--top-k", "3")  # fmt: skip
        assert r.code == 0, r
        outs[rt] = json.loads(r.out)["predictions"]
    ref = outs["torch"]
    assert len(ref) == 24
    for rt, tol in (("onnxruntime", 1e-4), ("auto", 0.05)):
        assert [p["path"] for p in outs[rt]] == [p["path"] for p in ref]
        assert [p["top"][0]["label"] for p in outs[rt]] == [p["top"][0]["label"] for p in ref], rt
        diff = max(abs(a["prob"] - b["prob"]) for p, q in zip(outs[rt], ref) for a, b in zip(p["top"], q["top"]))
        assert diff < tol, (rt, diff)
    r = run_cli("predict", run, tiny_test_folder, "--runtime", "onnxruntime", "--tta", "flip", "--workers", "0")
    assert r.code == 2 and "--tta runs on PyTorch only" in r.err
    r = run_cli("predict", run, tiny_test_folder, "--tta", "flip", "--workers", "0", "--no-progress")  # auto -> torch
    assert r.code == 0, r


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_uint8_pixels_normalise_to_exactly_the_eval_transform(crop_mode):
    """The serving input (uint8 pixels, normalised in the graph) is the eval transform's tensor, for every crop
    mode (the border mode pads with the mean colour, which a [0, 1] view with mean 0 would get wrong)."""
    import timm.data
    import torch
    from PIL import Image

    from imgclf.data.preprocess import Preprocess

    pre = Preprocess((3, 40, 40), "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, crop_mode)
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    timm_eval = timm.data.create_transform(input_size=pre.input_size, interpolation=pre.interpolation, mean=pre.mean,
                                           std=pre.std, crop_pct=pre.crop_pct, crop_mode=crop_mode)  # fmt: skip
    rng = np.random.default_rng(0)
    for w, h in [(28, 28), (100, 57), (300, 400)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        px = pre.chw_pixels()(img)
        assert px.dtype == torch.uint8 and px.shape == (3, 40, 40)
        assert (pre.eval()(img) - (px.float() / 255 - mean) / std).abs().max() < 1e-5
        assert torch.equal(pre.eval()(img), timm_eval(img))  # timm's own eval transform, to the last bit
        assert torch.equal(pre.normalize()(px[None])[0], timm_eval(img))  # the graph's normalisation too


@pytest.mark.unit
def test_openvino_models_dropped_out_of_order_leave_no_dangling_signal_stack():
    """OpenVINO's CPU plugin points the thread's sigaltstack at its own buffer while a compiled model lives; dropped
    in another order than made (a served version swapped out), the thread kept an unmapped signal stack and the next
    handled signal (SIGCHLD, SIGTERM) died with SIGSEGV (seen on AMD Zen 5). keep_altstack gives the stack back."""
    import ctypes
    import gc
    import sys

    import torch

    ov = pytest.importorskip("openvino")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    from imgclf.deploy.export.openvino import _StackT, keep_altstack

    def stack() -> tuple[int, bool]:
        s = _StackT()
        assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s)) == 0
        sp = s.ss_sp or 0
        with open("/proc/self/maps") as f:
            spans = [line.split()[0].split("-") for line in f]
        return sp, any(int(a, 16) <= sp < int(b, 16) for a, b in spans)

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).eval()
    m(torch.zeros(1, 3, 8, 8))
    model = ov.convert_model(m, example_input=torch.zeros(1, 3, 8, 8))
    before = stack()
    with keep_altstack():
        a = ov.Core().compile_model(model, "CPU")
        a(np.zeros((1, 3, 8, 8), np.float32))
    with keep_altstack():
        b = ov.Core().compile_model(model, "CPU")
        b(np.zeros((1, 3, 8, 8), np.float32))
    del a
    gc.collect()
    del b
    gc.collect()
    assert stack() == before and (before[0] == 0 or before[1])
