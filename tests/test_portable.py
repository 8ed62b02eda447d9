"""A run directory is self-sufficient: copied alone to another folder with its training data deleted, it
predicts (on the fast runtime), evaluates, exports, serves and reports; read-only commands never write into
it, and one ``predict`` reads its ``imgclf.json`` once and never the training data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import TINY, make_folder, make_image, run_cli
from .serving import Served, png


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A tiny run whose training data is gone, copied to a new folder."""
    tmp = tmp_path_factory.mktemp("portable")
    data = make_folder(tmp / "data", n_per_class=10)
    r = run_cli("train", "--data", data, "--epochs", "1", "--output", tmp / "runs", "--name", "r", *TINY)
    assert r.code == 0, r
    shutil.rmtree(data)
    dst = tmp / "elsewhere" / "r"
    shutil.copytree(tmp / "runs" / "r", dst)
    shutil.rmtree(tmp / "runs")
    return dst


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_read_only_commands_work_without_training_data_and_write_nothing(moved, cache, tmp_path, monkeypatch):
    import imgclf.data.splits as splits

    def no_training_data(*a, **k):
        raise AssertionError("a read-only command reached for the run's training data")

    original = splits.prepare_data
    monkeypatch.setattr(splits, "prepare_data", no_training_data)
    test = make_folder(tmp_path / "test", n_per_class=4, seed=3)
    img = tmp_path / "one.png"
    make_image(1, np.random.default_rng(0)).save(img)
    before = _snapshot(moved)
    r = run_cli("predict", moved, img, "--format", "json", "--workers", "0", "--no-progress")  # runtime auto
    assert r.code == 0, r
    assert len(json.loads(r.out)["predictions"]) == 1
    assert list(cache.glob("exports/*/model.xml")) or list(cache.glob("exports/*/model.onnx"))  # compiled there
    r = run_cli("eval", moved, "--data", test, "--workers", "0", "--no-progress", "--format", "json")
    assert r.code == 0 and json.loads(r.out)["n"] == 12, r
    r = run_cli("bench", moved, "--runtimes", "torch", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                "--no-progress")  # fmt: skip
    assert r.code == 0, r
    s = Served([moved, "--max-batch", "4"], tmp_path)
    try:
        st, doc = s.json(
            "POST", "/predict", png(make_image(2, np.random.default_rng(1))), {"Content-Type": "image/png"}
        )
        assert st == 200 and doc["predictions"][0]["top"], doc
    finally:
        assert s.stop() == 0, s.log()
    assert _snapshot(moved) == before  # nothing written into the run directory
    r = run_cli("export", moved, "--format", "onnx", "--data", test, "--verify-n", "12")
    assert r.code == 0 and (moved / "export" / "model.onnx").is_file(), r
    r = run_cli("export", moved, "--format", "openvino")  # no --data: generated pictures, with a warning
    assert r.code == 0 and "generated pictures" in r.err, r
    monkeypatch.setattr(splits, "prepare_data", original)  # report looks for the validation images (gone: warns)
    r = run_cli("report", moved, "--device", "cpu")  # a report without the top-loss gallery
    assert r.code == 0 and (moved / "report.html").is_file(), r


def test_one_predict_reads_the_artifact_once(moved, cache, tmp_path, monkeypatch):
    img = tmp_path / "one.png"
    make_image(0, np.random.default_rng(0)).save(img)
    reads = []
    original = Path.read_text

    def counting(self, *a, **k):
        if self.name == "imgclf.json":
            reads.append(str(self))
        return original(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", counting)
    for runtime in ("torch", "auto", "auto"):  # auto: compiled into the cache once, then found there
        reads.clear()
        r = run_cli("predict", moved, img, "--runtime", runtime, "--workers", "0", "--no-progress")
        assert r.code == 0, r
        assert len(reads) == 1, (runtime, reads)
