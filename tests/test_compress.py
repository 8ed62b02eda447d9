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


def test_compress_refuses_a_student_beyond_the_budget(teacher):
    out = teacher.parent
    r = run_cli("compress", teacher, *STUDENT, "--epochs", "1", "--lr", "1e-6", "--max-drop", "0", "--output", out,
                "--name", "refused", "--int8", "onnx-int8", "--runtime", "onnxruntime")  # fmt: skip
    assert r.code == 2, r
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("imgclf: error: the int8 student loses") and "--max-drop 0.0" in last
    run = out / "refused"
    doc = json.loads((run / "compress.json").read_text())
    assert doc["accepted"] is False and doc["within_budget"] is False and doc["forced"] is False
    assert not (run / "export" / "model.int8.onnx").exists()  # never left for --runtime auto to pick
    assert (run / "model.safetensors").is_file()  # the trained student is kept
    t, s, q = doc["rows"]
    assert t["value"] == 1.0  # the tiny teacher separates the colours
    assert doc["int8_vs_teacher"]["drop_points"] == pytest.approx(100 * (t["value"] - q["value"]), abs=0.01)
    assert "model" in r.out and "int8 student" in r.out  # the figures are printed before the refusal
    rec = json.loads((run / "export" / "export.json").read_text())["onnx-int8"]
    assert rec["accepted"] is False


def test_compress_chains_distillation_int8_and_the_benchmark(teacher, tiny_test_folder):
    out = teacher.parent
    r = run_cli("compress", teacher, *STUDENT, "--epochs", "2", "--max-drop", "100", "--output", out, "--name",
                "st", "--int8", "onnx-int8", "--runtime", "onnxruntime", "--batch-sizes", "1", "4")  # fmt: skip
    assert r.code == 0, r
    run = out / "st"
    doc = json.loads((run / "compress.json").read_text())
    assert doc["accepted"] and doc["images"] == {"split": "test", "n": 24, "name": str(tiny_test_folder)}
    t, s, q = doc["rows"]
    assert [x["role"] for x in doc["rows"]] == ["teacher", "student", "int8 student"]
    assert (t["arch"], s["arch"], q["arch"]) == ("test_efficientnet", "simplecnn_t", "simplecnn_t")
    assert (t["runtime"], s["runtime"], q["runtime"]) == ("onnxruntime", "onnxruntime", "onnxruntime-int8")
    assert s["params"] == q["params"] and 250_000 < s["params"] < 350_000 and t["params"] < 200_000
    assert s["size_mb"] == pytest.approx((run / "model.safetensors").stat().st_size / 1e6, abs=1e-3)
    int8 = run / "export" / "model.int8.onnx"
    assert q["size_mb"] == pytest.approx(int8.stat().st_size / 1e6, abs=1e-3) and q["size_mb"] < s["size_mb"] / 2
    assert set(t["img_per_s"]) == set(q["img_per_s"]) == {"1", "4"} and min(q["img_per_s"].values()) > 0
    # the student run is a distilled run like any other: the artifact records the teacher
    art = json.loads((run / "imgclf.json").read_text())
    assert art["distill"]["teachers"][0]["arch"] == "test_efficientnet"
    # the teacher's figure is the one `imgclf eval` gives on the same images
    ev = run_cli("eval", teacher, "--data", tiny_test_folder, "--json", out / "t.json")
    assert ev.code == 0, ev
    assert json.loads((out / "t.json").read_text())["top1"] == pytest.approx(t["value"])
    rec = json.loads((run / "export" / "export.json").read_text())["onnx-int8"]
    assert rec["accepted"] is True  # compress's verdict: --runtime auto may pick it
    v = doc["int8_vs_teacher"]
    assert v["size_ratio"] == pytest.approx(round(t["size_mb"] / q["size_mb"], 1))
    assert "int8 student vs teacher" in r.out


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
