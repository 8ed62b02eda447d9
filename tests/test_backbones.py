"""``imgclf models --benchmark``: parameters and GMACs against hand counts, the Pareto front and the budget choice,
and the measured table on tiny data (a real packaged backbone probed, a timm test model timed for speed only)."""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

from imgclf.backbones import choose, gmacs, pareto_front
from tests.conftest import run_cli


@pytest.mark.unit
def test_gmacs_counts_multiply_accumulates_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))  # fmt: skip
    conv = 8 * 3 * 3 * 3 * 16 * 16  # out channels x in channels x kernel area x output positions
    assert gmacs(model, (3, 16, 16)) * 1e9 == pytest.approx(conv + 8 * 5)


def _row(arch, ms, top1):
    return {"arch": arch, "latency_ms": {1: ms}, "probe_top1": top1}


@pytest.mark.unit
def test_pareto_front_and_the_choice_under_a_latency_budget():
    rows = [_row("fast", 1.0, 0.80), _row("mid", 2.0, 0.85), _row("slow_worse", 3.0, 0.84), _row("slow", 5.0, 0.90),
            _row("timed_only", 0.5, None)]  # fmt: skip
    assert pareto_front(rows) == ["fast", "mid", "slow"]
    assert choose(rows, 2.5)["arch"] == "mid" and choose(rows, 2.5)["fits"] == ["fast", "mid", "timed_only"]
    assert choose(rows, 10)["arch"] == "slow"
    none = choose(rows, 0.1)
    assert none["arch"] is None and "no architecture within" in none["why"]
    assert choose([_row("a", 1.0, None)], 2)["arch"] is None  # speed alone cannot rank


def test_models_benchmark_probes_offline_weights_and_times_the_rest(tmp_path, tiny_folder, tiny_test_folder):
    out = tmp_path / "bb"
    r = run_cli("models", "--benchmark", "tf_efficientnet_lite0", "test_resnet", "--data", tiny_folder,
                "--input-size", "32", "--runtime", "onnxruntime", "--latency-ms", "1000", "--repeats", "3",
                "--output", out, "--no-progress")  # fmt: skip
    assert r.code == 0, r
    doc = json.loads((out / "benchmark.json").read_text())
    rows = {x["arch"]: x for x in doc["rows"]}
    lite, test = rows["tf_efficientnet_lite0"], rows["test_resnet"]
    assert lite["weights"] == "packaged" and 0.5 <= lite["probe_top1"] <= 1.0 and lite["probe_split"] == "val"
    assert test["weights"] == "none" and test["probe_top1"] is None  # no offline weights: speed only, marked
    import timm

    ref = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    assert lite["params_m"] == pytest.approx(sum(p.numel() for p in ref.parameters()) / 1e6, abs=0.01)
    assert lite["gmacs"] == pytest.approx(gmacs(ref, (3, 32, 32)), rel=1e-3)
    assert {x["runtime"] for x in doc["rows"]} == {"onnxruntime"} and lite["input_size"] == 32
    assert set(lite["latency_ms"]) == {"1", "32"} and lite["img_per_s"]["32"] > 0
    assert doc["pareto"] == ["tf_efficientnet_lite0"] and doc["choice"]["arch"] == "tf_efficientnet_lite0"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed only" in r.out and "within 1000.0 ms at batch 1: tf_efficientnet_lite0" in r.out
    # the probe is a real run: it evaluates like any other
    ev = run_cli("eval", lite["run"], "--data", tiny_test_folder)
    assert ev.code == 0, ev
    assert (out / "test_resnet" / "model.safetensors").is_file()


def test_models_benchmark_refuses_bad_input(tmp_path):
    r = run_cli("models", "--benchmark")
    assert r.code == 2 and "name the architectures" in r.err
    r = run_cli("models", "--benchmark", "resnet18", "--latency-ms", "0", "--output", tmp_path)
    assert r.code == 2 and "--latency-ms must be > 0" in r.err
    r = run_cli("models", "--benchmark", "resnet", "--limit", "3", "--output", tmp_path)
    assert r.code == 2 and "architectures match" in r.err
    r = run_cli("models", "--benchmark", "resnet18", "--runtime", "onnxruntime-int8", "--output", tmp_path)
    assert r.code == 2 and "floating-point runtime" in r.err
