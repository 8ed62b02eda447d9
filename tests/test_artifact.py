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


@pytest.mark.unit
def test_typed_sections_round_trip_and_unknown_keys_survive(tmp_path):
    """Sections are typed fields (absent when empty, so old files stay as they were); keys a newer imgclf wrote
    stay in ``extra`` and are written back; a section of the wrong type is a one-line error naming the file."""
    from imgclf.artifact import Artifact, save_artifact
    from imgclf.data.preprocess import Preprocess

    model = timm.create_model("test_efficientnet", num_classes=2)
    pre = Preprocess((3, 32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    art = Artifact("test_efficientnet", ["a", "b"], pre, calibration={"temperature": 1.7}, extra={"future": [1, 2]})
    run = save_artifact(tmp_path / "r", model, art)
    doc = json.loads((run / META_FILE).read_text())
    assert doc["calibration"] == {"temperature": 1.7} and doc["future"] == [1, 2] and doc["kind"] == "classifier"
    assert not {"task", "ood", "drift", "data"} & set(doc)
    back = read_artifact(run)
    assert back.temperature == 1.7 and back.extra == {"future": [1, 2]} and back.preprocessing == pre
    assert back.preprocessing.decode.pixel_range == "auto"
    with pytest.raises(ImgclfError, match="already holds a run"):
        save_artifact(run, model, art, overwrite=False)
    (run / META_FILE).write_text(json.dumps({**doc, "ood": [1]}))
    with pytest.raises(ImgclfError, match=r"imgclf.json: field ood should be a dict, got list"):
        read_artifact(run)
    old = {k: v for k, v in doc.items() if k not in ("kind", "calibration")}
    old["preprocessing"] = {k: v for k, v in doc["preprocessing"].items() if k != "decode"}  # before decode was stored
    (run / META_FILE).write_text(json.dumps(old))
    back = read_artifact(run)
    assert back.kind == "classifier" and back.temperature == 1.0 and back.preprocessing.decode.pixel_range == "legacy"
    (run / META_FILE).write_text(json.dumps({**old, "preprocessing": {**old["preprocessing"], "interpolation": "x"}}))
    with pytest.raises(ImgclfError, match=r"imgclf.json: preprocessing.*interpolation: 'x' is not a known resize"):
        read_artifact(run)


@pytest.mark.unit
def test_preprocess_refuses_inconsistent_values():
    from imgclf.data.preprocess import Preprocess

    ok = dict(input_size=(3, 8, 8), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    cases = [({"mean": (0.5,)}, "mean"), ({"std": (0.5, 0.5, 0.0)}, "std"), ({"crop_mode": "x"}, "crop_mode"),
             ({"input_size": (3, 0, 8)}, "input_size"), ({"crop_pct": 0}, "crop_pct")]  # fmt: skip
    for change, field in cases:
        with pytest.raises(ImgclfError, match=f"preprocessing.{field}"):
            Preprocess(**{**ok, **change})
    with pytest.raises(ImgclfError, match="missing field"):
        Preprocess.from_json({"input_size": [3, 8, 8]})
