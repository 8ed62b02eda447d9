"""``imgclf compress TEACHER --student ARCH``: distil -> calibrate -> int8 -> benchmark, and the accuracy budget.

A tiny real teacher (test_efficientnet, trained on generated colour images) and a real student (simplecnn_t);
the budget test makes the student certainly worse than the teacher (one epoch at lr 1e-6) so the refusal is
deterministic."""

from __future__ import annotations

import json

import pytest

from imgclf.errors import ImgclfError
from tests.conftest import TINY, run_cli

STUDENT = ("--student", "simplecnn_t", "--data.num_workers", "0", "--no-progress", "--batch-size", "16")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_folder, tiny_test_folder):
    out = tmp_path_factory.mktemp("compress")
    r = run_cli("train", "--data", tiny_folder, "--test-data", tiny_test_folder, "--epochs", "4", "--output", out,
                "--name", "teacher", *TINY)  # fmt: skip
    assert r.code == 0, r
    return out / "teacher"


def test_compress_chains_distillation_int8_and_the_benchmark_and_refuses_beyond_the_budget(teacher, tiny_test_folder):
    """One real chain (the student certainly worse: one epoch at lr 1e-6, budget 0): refused, with every figure."""
    out = teacher.parent
    r = run_cli("compress", teacher, *STUDENT, "--epochs", "1", "--lr", "1e-6", "--max-drop", "0", "--output", out,
                "--name", "refused", "--int8", "onnx-int8", "--runtime", "onnxruntime", "--batch-sizes", "1", "4",
                "--json", out / "c.json")  # fmt: skip
    assert r.code == 2, r
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("imgclf: error: the int8 student loses") and "--max-drop 0.0" in last
    assert "int8 student vs teacher" in r.out  # the figures are printed before the refusal
    run = out / "refused"
    doc = json.loads((run / "compress.json").read_text())
    assert doc == json.loads((out / "c.json").read_text())  # --json is written on refusal too
    assert doc["accepted"] is False and doc["within_budget"] is False and doc["forced"] is False
    assert not (run / "export" / "model.int8.onnx").exists()  # never left for --runtime auto to pick
    assert json.loads((run / "export" / "export.json").read_text())["onnx-int8"]["accepted"] is False
    assert (run / "model.safetensors").is_file()  # the trained student is kept
    assert doc["images"] == {"split": "test", "n": 24, "name": str(tiny_test_folder)}
    t, s, q = doc["rows"]
    assert [x["role"] for x in doc["rows"]] == ["teacher", "student", "int8 student"]
    assert (t["arch"], s["arch"], q["arch"]) == ("test_efficientnet", "simplecnn_t", "simplecnn_t")
    assert (t["runtime"], s["runtime"], q["runtime"]) == ("onnxruntime", "onnxruntime", "onnxruntime-int8")
    assert s["params"] == q["params"] and 250_000 < s["params"] < 350_000 and t["params"] < 200_000
    assert s["size_mb"] == pytest.approx((run / "model.safetensors").stat().st_size / 1e6, abs=1e-3)
    assert 0 < q["size_mb"] < s["size_mb"] / 2
    assert set(t["img_per_s"]) == set(q["img_per_s"]) == {"1", "4"} and min(q["img_per_s"].values()) > 0
    assert t["value"] == 1.0  # the tiny teacher separates the colours
    assert doc["int8_vs_teacher"]["drop_points"] == pytest.approx(100 * (t["value"] - q["value"]), abs=0.01)
    assert doc["int8_vs_teacher"]["size_ratio"] == pytest.approx(round(t["size_mb"] / q["size_mb"], 1))
    # the student is a distilled run like any other: the artifact records the teacher
    assert json.loads((run / "imgclf.json").read_text())["distill"]["teachers"][0]["arch"] == "test_efficientnet"
    # the teacher's figure is the one `imgclf eval` gives on the same images
    ev = run_cli("eval", teacher, "--data", tiny_test_folder, "--json", out / "t.json")
    assert ev.code == 0, ev
    assert json.loads((out / "t.json").read_text())["top1"] == pytest.approx(t["value"])


@pytest.mark.unit
def test_the_verdict_is_the_int8_students_drop_against_the_teacher():
    from imgclf.compress import _verdict

    def row(value, size, rate):
        return {"value": value, "size_mb": size, "img_per_s": {1: rate, 32: 4 * rate}, "metric": "top1"}

    rows = [row(0.914, 13.7, 1000.0), row(0.896, 1.18, 4000.0), row(0.896, 0.36, 3000.0)]
    v = _verdict(rows, max_drop=2.0, force=False)
    assert v["accepted"] and v["int8_vs_teacher"] == {"size_ratio": 38.1, "speedup": {1: 3.0, 32: 3.0},
                                                      "drop_points": 1.8}  # fmt: skip
    beyond = _verdict(rows, max_drop=1.0, force=True)
    assert not beyond["accepted"] and beyond["forced"]
    nan = _verdict([row(float("nan"), 1, 1.0), *rows[1:]], max_drop=100, force=False)
    assert not nan["accepted"]  # an undefined metric is never within the budget


def test_compress_refuses_bad_input_before_training(tmp_path, tiny_run):
    from imgclf.compress import int8_format

    r = run_cli("compress", tmp_path, "--student", "simplecnn_t")
    assert r.code == 2 and str(tmp_path) in r.err
    r = run_cli("compress", tiny_run, "--student", "simplecnn_t", "--teacher", tiny_run)
    assert r.code == 2 and "first argument" in r.err
    r = run_cli("compress", tiny_run, "--student", "simplecnn_t", "--seed", "3", "--data", tmp_path)
    assert r.code == 2 and "drop --data, --seed" in r.err  # the compared images must stay the teacher's held-out ones
    r = run_cli("compress", tiny_run, "--student", "simplecnn_t", "--max-drop", "-1")
    assert r.code == 2 and "--max-drop must be >= 0" in r.err
    with pytest.raises(ImgclfError, match="--int8 must be"):
        int8_format("tflite")
