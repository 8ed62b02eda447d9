"""The artifact: safetensors + JSON, no pickle, loadable by plain timm, clear errors on damage."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from imgclf.artifact import META_FILE, WEIGHTS_FILE, load_artifact, read_artifact
from imgclf.errors import ImgclfError


def test_run_directory_holds_weights_json_config_and_logs(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {WEIGHTS_FILE, META_FILE, "config.yaml", "metrics.jsonl", "metrics.csv", "checkpoints"} <= names
    doc = json.loads((tiny_run / META_FILE).read_text())
    assert doc["arch"] == "test_efficientnet"
    assert doc["class_names"] == ["class_0", "class_1", "class_2"]
    assert doc["preprocessing"]["input_size"] == [3, 32, 32]
    assert doc["config"]["train"]["epochs"] == 4
    assert {"torch", "timm", "torchmetrics"} <= set(doc["versions"])
    assert 0 <= doc["metrics"]["val"]["top1"] <= 1
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    # no pickle anywhere in what a user would ship
    assert not list(tiny_run.glob("*.pt")) and not list(tiny_run.glob("*.pkl"))


def test_weights_load_in_plain_timm_with_identical_outputs(tiny_run):
    model, art = load_artifact(tiny_run)
    k = art.num_classes
    plain = timm.create_model(
        art.arch,
        pretrained=True,
        num_classes=k,
        pretrained_cfg_overlay=dict(file=str(tiny_run / WEIGHTS_FILE), num_classes=k),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-6)


def test_damaged_artifacts_give_one_line_errors(tmp_path, tiny_run):
    with pytest.raises(ImgclfError, match="run directory not found"):
        read_artifact(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclfError, match="not a finished imgclf run"):
        read_artifact(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / META_FILE).write_text("{not json")
    with pytest.raises(ImgclfError, match="cannot read run metadata"):
        read_artifact(bad)
    (bad / META_FILE).write_text(json.dumps({"arch": "x"}))
    with pytest.raises(ImgclfError, match="missing field"):
        read_artifact(bad)
    (bad / META_FILE).write_text("[1, 2]")
    with pytest.raises(ImgclfError, match="expected a JSON object"):
        read_artifact(bad)
    doc = {"format_version": "1", "arch": "x", "class_names": ["a"], "preprocessing": {}}
    (bad / META_FILE).write_text(json.dumps(doc))
    with pytest.raises(ImgclfError, match="wrong type: format_version"):
        read_artifact(bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text((tiny_run / META_FILE).read_text())
    (broken / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ImgclfError, match="cannot load weights"):
        load_artifact(broken)
