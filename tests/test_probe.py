"""The cached linear probe: L-BFGS fitting, the feature cache, and the probe artifact."""

from __future__ import annotations

import json

import pytest
import torch

import imgclf.train.probe as probe
from imgclf.api import make_config, train

from .conftest import make_folder

TINY = {
    "model.name": "test_efficientnet", "model.weights": "none", "data.input_size": 32, "data.batch_size": 16,
    "data.num_workers": 0, "run.progress": False, "transfer.strategy": "probe",
}  # fmt: skip


@pytest.fixture
def calls(monkeypatch) -> list:
    """The ``desc`` of every backbone feature extraction the probe runs."""
    seen: list = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda *a, **k: seen.append(k.get("desc")) or real(*a, **k))
    return seen


def test_lbfgs_separates_gaussian_clusters_and_folds_the_standardisation():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3 + 10  # far from zero mean: standardisation matters
    y = torch.arange(4).repeat_interleave(50)
    x = centers[y] + torch.randn(200, 16, generator=g)
    yv = torch.arange(4).repeat_interleave(10)
    xv = centers[yv] + torch.randn(40, 16, generator=g)
    w, b, rows = probe.fit_lbfgs(x, y, xv, yv, 4, [1e-1, 1e-3], max_iter=100)
    assert w.shape == (4, 16) and b.shape == (4,)
    assert [r["wd"] for r in rows] == [1e-1, 1e-3]  # strongest first
    assert ((xv @ w.T + b).argmax(1) == yv).float().mean() == 1.0  # raw features, folded head


def test_probe_caches_features_and_reuses_them(tmp_path, calls):
    data = make_folder(tmp_path / "d", n_per_class=10, classes=3)
    base = {**TINY, "run.output": str(tmp_path / "runs"), "probe.cache_dir": str(tmp_path / "cache")}
    r1 = train(make_config(data, overrides={**base, "run.name": "a", "probe.wd_grid": [1e-3]}))
    assert calls == ["features train", "features val"]
    r2 = train(make_config(data, overrides={**base, "run.name": "b", "probe.wd_grid": [1e-1, 1e-4]}))
    assert calls == ["features train", "features val"]  # second run: all from the cache
    assert len(r2.history) == 2 and len(r1.history) == 1
    train(make_config(data, overrides={**base, "run.name": "c", "probe.aug_passes": 1}))
    assert calls[2:] == ["features train-aug1"]  # only the new augmented view is computed
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    doc = json.loads((tmp_path / "runs" / "b" / "imgclf.json").read_text())
    assert doc["config"]["transfer"]["strategy"] == "probe" and doc["metrics"]["val"]["top1"] > 0.6


def test_probe_artifact_predicts_like_its_cached_head(tmp_path):
    """The head folded into the model reproduces the validation score measured on cached features."""
    data = make_folder(tmp_path / "d", n_per_class=10, classes=3)
    over = {**TINY, "run.output": str(tmp_path / "runs"), "run.name": "p", "probe.cache_dir": str(tmp_path / "c")}
    res = train(make_config(data, overrides=over))
    best = max(res.history, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert res.val_metrics["top1"] == pytest.approx(best["val_top1"], abs=1e-6)
    assert res.val_metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-3)


def test_changed_data_or_weights_miss_the_cache(tmp_path, calls):
    from PIL import Image

    data = make_folder(tmp_path / "d", n_per_class=6, classes=2)
    base = {**TINY, "run.output": str(tmp_path / "runs"), "probe.cache_dir": str(tmp_path / "cache")}
    train(make_config(data, overrides={**base, "run.name": "a"}))
    assert len(calls) == 2
    img = data / "class_0" / "img_000.png"
    Image.new("RGB", (24, 24), (1, 2, 3)).save(img)  # same path, new content (size and mtime change)
    train(make_config(data, overrides={**base, "run.name": "b"}))
    assert calls[2:] == ["features train"] or calls[2:] == ["features val"]  # the split holding it is recomputed
    train(make_config(data, overrides={**base, "run.name": "c", "train.seed": 1}))  # other random init
    assert len(calls) >= 5
