"""End to end through ``main(argv)`` on tiny generated data with timm's tiny test models."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from .conftest import TINY, make_folder, make_image, run_cli


def test_train_learns_separable_tiny_data(tiny_run):
    doc = json.loads((tiny_run / "imgclf.json").read_text())
    assert doc["metrics"]["val"]["top1"] >= 0.8  # 3 colour classes; chance is 0.33
    assert doc["metrics"]["epochs_run"] == 4


def test_eval_reports_metrics_on_unseen_data(tiny_run, tiny_test_folder, tmp_path):
    out = tmp_path / "m.json"
    r = run_cli("eval", tiny_run, "--data", tiny_test_folder, "--json", out, "--no-progress", "--workers", "0")
    assert r.code == 0, r
    assert "top1" in r.out and "class_2" in r.out and "confusion matrix" in r.out
    m = json.loads(out.read_text())
    assert m["n"] == 24 and m["top1"] >= 0.8
    assert sum(map(sum, m["confusion_matrix"])) == 24


def test_eval_json_format_on_stdout(tiny_run, tiny_test_folder):
    r = run_cli("eval", tiny_run, "--data", tiny_test_folder, "--format", "json", "--no-progress", "--workers", "0")
    assert r.code == 0 and json.loads(r.out)["num_classes"] == 3


def test_predict_skips_corrupt_and_text_files_and_reports_them(tiny_run, tmp_path):
    folder = make_folder(tmp_path / "p", n_per_class=2, classes=3, seed=5)
    (folder / "class_0" / "notes.txt").write_text("not an image")
    good = folder / "class_1" / "img_000.png"
    (folder / "broken.png").write_bytes(good.read_bytes()[:50])
    r = run_cli("predict", tiny_run, folder, "--format", "json", "--no-progress", "--workers", "0")
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert len(doc["predictions"]) == 6
    assert {s["path"].rsplit("/", 1)[-1] for s in doc["skipped"]} == {"notes.txt", "broken.png"}
    assert "skipped 2 unreadable file(s)" in r.err
    right = sum(p["top"][0]["label"] == p["path"].split("/")[-2] for p in doc["predictions"])
    assert right >= 5
    for p in doc["predictions"]:
        probs = [t["prob"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)


def test_predict_csv_and_table_and_output_file(tiny_run, tmp_path):
    folder = make_folder(tmp_path / "q", n_per_class=1, classes=3, seed=6)
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "\n".join(f"q/class_{c}/img_000.png" for c in range(3)) + "\n")
    out = tmp_path / "preds.csv"
    r = run_cli("predict", tiny_run, listing, "--format", "csv", "--top-k", "2", "-o", out, "--no-progress")
    assert r.code == 0, r
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 3
    assert set(rows[0]) == {"path", "label", "unknown", "ood_score", "label_1", "prob_1", "label_2", "prob_2"}
    r = run_cli("predict", tiny_run, folder / "class_2" / "img_000.png", "--no-progress")
    assert r.code == 0 and "top1" in r.out and "%" in r.out


def test_train_on_csv_and_npz_sources(tmp_path):
    folder = make_folder(tmp_path / "imgs", n_per_class=10, classes=2)
    listing = tmp_path / "train.csv"
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
    listing.write_text("path,label\n" + "\n".join(rows) + "\n")
    r = run_cli("train", "--data", listing, "--epochs", "1", "--output", tmp_path / "runs", "--name", "csv", *TINY)
    assert r.code == 0, r
    doc = json.loads((tmp_path / "runs" / "csv" / "imgclf.json").read_text())
    assert doc["class_names"] == ["class_0", "class_1"]
    assert doc["data"]["n_train"] + doc["data"]["n_val"] == 20 and doc["data"]["train"] == str(listing)
    imgs = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))])
    npz = tmp_path / "arr.npz"
    np.savez(npz, images=imgs, labels=np.repeat([0, 1], 10), class_names=np.array(["red", "green"]))
    r = run_cli("train", "--data", npz, "--epochs", "1", "--output", tmp_path / "runs", "--name", "npz", *TINY)
    assert r.code == 0, r
    doc = json.loads((tmp_path / "runs" / "npz" / "imgclf.json").read_text())
    assert doc["class_names"] == ["red", "green"] and doc["data"]["n_train"] + doc["data"]["n_val"] == 20


def test_training_skips_bad_files_and_lists_them(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8, classes=2)
    (folder / "class_0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "class_1" / "readme.txt").write_text("hello")
    r = run_cli("train", "--data", folder, "--epochs", "1", "--output", tmp_path / "r", "--name", "x", *TINY)
    assert r.code == 0, r
    assert "skipped 2 unreadable file(s)" in r.err and "corrupt.png" in r.err and "readme.txt" in r.err
    doc = json.loads((tmp_path / "r" / "x" / "imgclf.json").read_text())
    assert len(doc["metrics"]["skipped_files"]) == 2
    strict = run_cli(
        "train", "--data", folder, "--epochs", "1", "--output", tmp_path / "r", "--name", "y", "--strict-images", *TINY
    )
    assert strict.code == 2 and ("corrupt.png" in strict.err or "readme.txt" in strict.err)


@pytest.mark.parametrize(
    "extra",
    [
        ["--optim.name", "sgd", "--lr", "0.1", "--optim.accum_steps", "2", "--optim.clip_grad", "1.0"],
        ["--train.amp", "bf16", "--train.ema", "true", "--model", "test_convnext"],
        ["--model", "test_vit", "--aug.auto_augment", "rand-m9-mstd0.5", "--aug.re_prob", "0.25"],
    ],
    ids=["sgd-accum-clip", "bf16-ema-convnext", "vit-randaugment-erasing"],
)
def test_training_options_run_and_learn(tmp_path, tiny_folder, extra):
    r = run_cli(
        "train",
        "--data",
        tiny_folder,
        "--epochs",
        "5",
        "--output",
        tmp_path,
        "--name",
        "o",
        *TINY,
        "--batch-size",
        "8",
        *extra,
    )
    assert r.code == 0, r
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    doc = json.loads((tmp_path / "o" / "imgclf.json").read_text())
    assert doc["metrics"]["val"]["top1"] > 0.5  # chance is 1/3


def test_early_stopping_and_best_checkpoint(tmp_path, tiny_folder):
    # lr so small that nothing improves after the first epoch: patience 1 stops at epoch 2
    r = run_cli(
        "train",
        "--data",
        tiny_folder,
        "--epochs",
        "6",
        "--output",
        tmp_path,
        "--name",
        "es",
        *TINY,
        "--lr",
        "1e-9",
        "--train.patience",
        "1",
        "--train.metric",
        "loss",
    )
    assert r.code == 0, r
    doc = json.loads((tmp_path / "es" / "imgclf.json").read_text())
    assert doc["metrics"]["epochs_run"] < 6
    rows = [json.loads(x) for x in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: -r["val_loss"])
    assert doc["metrics"]["best_epoch"] == best["epoch"]


def test_existing_run_is_never_overwritten(tmp_path, tiny_folder):
    args = ["train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "keep", *TINY]
    assert run_cli(*args).code == 0
    before = (tmp_path / "keep" / "model.safetensors").read_bytes()
    r = run_cli(*args)
    assert r.code == 2 and "already exists" in r.err
    assert (tmp_path / "keep" / "model.safetensors").read_bytes() == before


def test_models_lists_architectures_and_offline_weights():
    r = run_cli("models", "efficientnet_lite")
    assert r.code == 0
    assert "tf_efficientnet_lite0" in r.out and "installed" in r.out and "packaged" in r.out
    assert "hub" in r.out and "none" in r.out


def test_default_model_trains_unchanged_on_a_new_png_folder(tmp_path):
    """`imgclf train --data <PNG folder> --epochs N` with nothing else: packaged Lite0; the 24 px images train at
    32 px (data.input_size auto), not at the model's 224, and the log says so."""
    folder = make_folder(tmp_path / "pngs", n_per_class=6, classes=2, seed=9)
    r = run_cli(
        "train", "--data", folder, "--epochs", "1", "--output", tmp_path / "runs", "--name", "d", "--no-progress"
    )
    assert r.code == 0, r
    doc = json.loads((tmp_path / "runs" / "d" / "imgclf.json").read_text())
    assert doc["arch"] == "tf_efficientnet_lite0" and doc["weights_source"].startswith("packaged:")
    assert doc["preprocessing"]["input_size"] == [3, 32, 32] and doc["preprocessing"]["crop_pct"] == 1.0
    assert "input size 32, crop_pct 1.0 (data 24 px; model default 224): ~49x less compute per image" in r.err
    assert "test" not in doc["metrics"] and doc["metrics"]["val"]["n"] == 2


def test_multi_split_npz_supplies_its_own_val_and_test(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {
        s: np.stack([np.asarray(make_image(c, rng)) for c in [0, 1, 2] * n])
        for s, n in [("train", 8), ("val", 2), ("test", 3)]
    }
    npz = tmp_path / "splits.npz"
    np.savez(
        npz,
        **{f"{s}_images": v for s, v in imgs.items()},
        **{f"{s}_labels": np.array([0, 1, 2] * (len(v) // 3)) for s, v in imgs.items()},
    )
    r = run_cli("train", "--data", npz, "--epochs", "2", "--output", tmp_path, "--name", "s", *TINY)
    assert r.code == 0, r
    m = json.loads((tmp_path / "s" / "imgclf.json").read_text())["metrics"]
    assert m["val"]["n"] == 6 and m["test"]["n"] == 9


def test_same_seed_same_run_without_workers(tmp_path, tiny_folder):
    """Augmentation in the main process (num_workers 0) is seeded too: two runs give identical numbers."""
    rows = []
    for name in ("a", "b"):
        r = run_cli("train", "--data", tiny_folder, "--epochs", "2", "--output", tmp_path, "--name", name, *TINY)
        assert r.code == 0, r
        rows.append([json.loads(x)["train_loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert rows[0] == rows[1]


def test_a_trained_run_as_weights_keeps_its_head(tiny_run, tmp_path, tiny_folder):
    """--weights runs/x/model.safetensors continues from the trained head instead of zeroing it."""
    r = run_cli("train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "cont",
                *TINY, "--weights", tiny_run / "model.safetensors", "--lr", "1e-9")  # fmt: skip
    assert r.code == 0, r
    before = json.loads((tiny_run / "imgclf.json").read_text())["metrics"]["val"]["top1"]
    after = json.loads((tmp_path / "cont" / "imgclf.json").read_text())["metrics"]["val"]["top1"]
    assert after >= 0.8 and before >= 0.8  # a zeroed head would predict one class (1/3)


def test_resume_refusals(tmp_path, tiny_folder):
    args = ["train", "--data", tiny_folder, "--epochs", "1", "--output", tmp_path, "--name", "r", *TINY]
    assert run_cli(*args).code == 0
    r = run_cli("train", "--resume", "--output", tmp_path, "--name", "r", "--epochs", "3")
    assert r.code == 2 and "'train.epochs' cannot change (1 -> 3)" in r.err
    r = run_cli("train", "--resume", "--output", tmp_path, "--name", "r", "--recipe", "default")
    assert r.code == 2 and "drop --config/--recipe" in r.err


def test_artifact_files_get_the_usual_permissions_not_0600(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "imgclf.json", "config.yaml"):
        assert (tiny_run / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_knn_verbs_build_add_predict_and_episodes(tmp_path):
    support = make_folder(tmp_path / "support", n_per_class=4, classes=2, seed=11)
    more = make_folder(tmp_path / "more", n_per_class=4, classes=3, seed=12)  # adds class_2
    tiny = ["--model", "test_efficientnet", "--weights", "none", "--input-size", "32", "--workers", "0",
            "--no-progress"]  # fmt: skip
    r = run_cli("knn", "build", support, "--name", "idx", "--output", tmp_path / "runs", *tiny, "--k", "3")
    assert r.code == 0, r
    assert "8 images, 2 classes" in r.out
    idx = tmp_path / "runs" / "idx"
    r = run_cli("knn", "add", idx, more, "--workers", "0", "--no-progress")
    assert r.code == 0 and "20 support images, 3 classes" in r.out, r
    r = run_cli("predict", idx, more / "class_2", "--format", "json", "--no-progress", "--workers", "0")
    assert r.code == 0, r
    assert {t["label"] for p in json.loads(r.out)["predictions"] for t in p["top"]} <= {"class_0", "class_1", "class_2"}
    out = tmp_path / "episodes.json"
    r = run_cli("knn", "episodes", more, "--shots", "1", "2", "--episodes", "5", "--queries", "2", "--json", out, *tiny)
    assert r.code == 0, r
    assert "3-way episode accuracy" in r.out and "1-shot" in r.out and "2-shot" in r.out
    rep = json.loads(out.read_text())
    assert 0 <= rep["results"]["prototype"]["2"]["mean"] <= 1
