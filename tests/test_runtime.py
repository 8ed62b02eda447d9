"""One Predictor interface over torch, ONNX Runtime and OpenVINO: same pixels in, same answers out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import make_image, run_cli


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt") / "tiny"
    shutil.copytree(tiny_run, d)
    return d


def test_every_runtime_gives_the_same_calibrated_probabilities(run):
    from imgclf.deploy.runtime import available_runtimes, load_predictor, to_pixels

    rng = np.random.default_rng(0)
    ref = load_predictor(run, "torch")
    px = to_pixels([make_image(c % 3, rng) for c in range(6)], ref.art)
    assert px.shape == (6, 32, 32, 3) and px.dtype == np.uint8
    logits0, probs0 = ref(px)
    assert probs0.argmax(1).tolist() == [0, 1, 2, 0, 1, 2]
    have = available_runtimes()
    assert {"torch", "torch-cl", "onnxruntime", "onnxruntime-int8", "openvino"} <= set(have)
    for rt in have:
        logits, probs = load_predictor(run, rt)(px)
        tol = 0.05 if rt.endswith(("bf16", "int8")) else 1e-4
        assert np.abs(probs - probs0).max() < tol, rt
        assert (probs.argmax(1) == probs0.argmax(1)).all(), rt
    assert (run / "export" / "model.onnx").is_file() and (run / "export" / "model.xml").is_file()


def test_exports_are_reused_until_the_run_changes(run):
    import os
    import time

    from imgclf.deploy.runtime import load_predictor

    load_predictor(run, "onnxruntime")
    onnx = run / "export" / "model.onnx"
    first = onnx.stat().st_mtime
    load_predictor(run, "onnxruntime")
    assert onnx.stat().st_mtime == first  # reused
    later = time.time() + 5
    os.utime(run / "imgclf.json", (later, later))  # e.g. `imgclf calibrate` rewrote the temperature
    load_predictor(run, "onnxruntime")
    assert onnx.stat().st_mtime > first  # re-exported


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
