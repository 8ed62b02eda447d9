"""Robustness before deployment: the common corruptions (seeded, monotone in severity) and
``imgclf eval RUN --shift`` (per corruption x severity top-1 recomputed by hand, summary means, robustness.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.errors import ImgclfError
from imgclf.eval.shift import CORRUPTIONS, corrupt

from .conftest import run_cli


def _textured(size: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    x = rng.integers(30, 225, (size, size, 3))  # detail at every pixel: something to blur, pixelate, compress
    return Image.fromarray(x.astype(np.uint8))


@pytest.mark.unit
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_seeded_and_grows_with_severity(name):
    img = _textured()
    a, b = corrupt(img, name, 3, seed=1, index=7), corrupt(img, name, 3, seed=1, index=7)
    assert a.size == img.size and a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    ref = np.asarray(img, dtype=np.float64)
    err = [float(np.abs(np.asarray(corrupt(img, name, s, seed=1), dtype=np.float64) - ref).mean()) for s in range(1, 6)]
    assert err[0] > 0 and err[4] > err[0], err  # every severity changes the image, the worst the most
    if name.endswith("noise"):  # another image index, other noise
        assert not np.array_equal(np.asarray(a), np.asarray(corrupt(img, name, 3, seed=1, index=8)))


@pytest.mark.unit
def test_bad_corruption_and_severity_are_errors():
    with pytest.raises(ImgclfError, match="unknown corruption 'snow'"):
        corrupt(_textured(), "snow", 1)
    with pytest.raises(ImgclfError, match="severity must be 1-5"):
        corrupt(_textured(), "contrast", 6)


@pytest.mark.cli
def test_eval_shift_reports_each_corruption_and_severity(tiny_run, tiny_folder, tmp_path):
    import shutil

    from imgclf.artifact import load_artifact
    from imgclf.data.sources import open_source

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = run_cli("eval", str(run), "--data", str(tiny_folder), "--shift", "gaussian_noise,pixelate", "--severities",
                "1", "5", "--workers", "0", "--no-progress")  # fmt: skip
    assert r.code == 0, r
    assert "mean corruption accuracy" in r.out and "pixelate" in r.out
    doc = json.loads((run / "robustness.json").read_text())
    assert [(x["corruption"], x["severity"]) for x in doc["rows"]] == [
        ("gaussian_noise", 1), ("gaussian_noise", 5), ("pixelate", 1), ("pixelate", 5)]  # fmt: skip

    # one cell by hand: the corrupted images through the run's own eval transform
    model, art = load_artifact(run)
    src = open_source(str(tiny_folder)).remap_to(art.class_names)
    ev = art.preprocessing.eval()
    x = torch.stack([ev(corrupt(src.load(i), "gaussian_noise", 5, 0, i)) for i in range(len(src))])
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert doc["rows"][1]["top1"] == pytest.approx(float((pred == src.labels).mean()), abs=1e-6)
    per = doc["per_corruption"]
    assert per["pixelate"]["top1"] == pytest.approx((doc["rows"][2]["top1"] + doc["rows"][3]["top1"]) / 2)
    assert doc["mca"] == pytest.approx((per["pixelate"]["top1"] + per["gaussian_noise"]["top1"]) / 2)
    assert doc["relative_drop"] == pytest.approx(1 - doc["mca"] / doc["clean"]["top1"])
    assert all(0 <= x["ece"] <= 1 and (x["rejected"] is None or 0 <= x["rejected"] <= 1) for x in doc["rows"])

    assert run_cli("report", str(run)).code == 0  # the report grows a robustness section (heatmap)
    page = (run / "report.html").read_text()
    assert 'id="robustness"' in page and "could not be read" not in page.split('id="robustness"')[1][:400]

    bad = run_cli("eval", str(run), "--data", str(tiny_folder), "--shift", "snow", "--no-progress")
    assert bad.code == 2 and "unknown corruption 'snow'" in bad.err and len(bad.err.strip().splitlines()) == 1
