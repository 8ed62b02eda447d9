"""``imgclf retrain RUN --new-data DIR``: fine-tune on new data + replay, score champion and challenger on a fixed
held-out set of each distribution, promote into a model repository only when better.

The champion is a tiny real run (test_efficientnet on generated colour images, saved as version 1 of a model
repository). The "new distribution" is grey images whose only class cue is the stripe the colour images also carry:
the champion, which learned the colours, is near chance on it; a challenger that saw them learns the stripes. The
refusal is deterministic: new data of the old distribution, on which the champion is already perfect, so no
challenger can beat it by more than 0 points."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.errors import ImgclfError
from tests.conftest import TINY, make_folder, run_cli

pytestmark = pytest.mark.cli  # every test here uses a trained champion

CLASSES = ["class_0", "class_1", "class_2"]
CAPTURE_COLUMNS = "path,label,predicted,confidence,unknown,ood_score,model,version,time,reason,source"
#: the challenger's training flags: the tiny models start from random weights, so a higher rate than the recipe's
FAST = ("--epochs", "4", "--lr", "0.01", "--data.num_workers", "0", "--no-progress", "--batch-size", "16",
        "--train.ema", "false")  # fmt: skip


def grey_stripe(cls: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    """A noisy grey image with the class's bright stripe (conftest.make_image's stripe without its colour)."""
    arr = 120 + rng.normal(0, 25, (size, size, 3))
    arr[:, (cls * size // 4) : (cls * size // 4) + 3] = 255
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def capture_folder(root: Path, n_per_class: int = 16, unlabelled: int = 3, seed: int = 5) -> Path:
    """A folder as ``imgclf serve --capture-dir`` writes it, labelled by a person: ``labels.csv`` with the capture
    columns, the last ``unlabelled`` rows not labelled yet."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = [CAPTURE_COLUMNS]
    for i in range(n_per_class * len(CLASSES) + unlabelled):
        c = i % len(CLASSES)
        grey_stripe(c, rng).save(root / "images" / f"{i:04d}.png")
        label = CLASSES[c] if i < n_per_class * len(CLASSES) else ""
        lines.append(f"images/{i:04d}.png,{label},class_0,0.41,false,3.2,colours,1,2026-12-01T10:00:00,sampled,1.2.3.4")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_folder, tiny_test_folder) -> Path:
    """A model repository ``models/colours`` whose version 1 is the champion (trained with a test set)."""
    repo = tmp_path_factory.mktemp("retrain") / "models" / "colours"
    r = run_cli("train", "--data", tiny_folder, "--test-data", tiny_test_folder, "--epochs", "4", "--output", repo,
                "--name", "1", *TINY)  # fmt: skip
    assert r.code == 0, r
    return repo


def _accuracy(run: Path, csv_path: Path) -> float:
    """Top-1 of ``run`` on a held-out CSV, computed apart from retrain: imgclf.predict's top label vs the CSV."""
    import csv

    from sklearn.metrics import accuracy_score

    from imgclf.api import predict

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    truth = {str((csv_path.parent / r["path"]).resolve()): r["label"] for r in rows}
    pred = predict(run, [str(csv_path)], progress=False, num_workers=0).rows
    assert len(pred) == len(rows)
    return accuracy_score([truth[str(Path(p["path"]).resolve())] for p in pred], [p["top"][0]["label"] for p in pred])


@pytest.mark.slow
def test_a_better_challenger_becomes_the_next_version(repo, tmp_path):
    new = capture_folder(tmp_path / "capture")
    r = run_cli("retrain", repo / "1", "--new-data", new, "--margin", "30", "--json", tmp_path / "r.json", *FAST)
    assert r.code == 0, r
    assert "PROMOTED as version 2" in r.out and "champion" in r.out
    v2 = repo / "2"
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == ["1", "2"]
    assert not list(repo.glob(".retrain-*"))  # renamed in one step, nothing half-written left behind
    doc = json.loads((v2 / "retrain.json").read_text())
    assert doc == json.loads((tmp_path / "r.json").read_text())
    assert doc["version"] == 2 and doc["run"] == str(v2.resolve()) and doc["decision"]["promoted"]
    assert doc["decision"]["accepted"] and not doc["decision"]["forced"]
    s = doc["scores"]
    assert s["challenger"]["new"] > s["champion"]["new"] + 0.2  # it learned the stripes
    assert doc["decision"]["gain_new_points"] == pytest.approx(100 * (s["challenger"]["new"] - s["champion"]["new"]),
                                                               abs=0.01)  # fmt: skip
    d = doc["data"]
    assert (d["new"]["train"], d["new"]["held_out"]) == (39, 9)  # 3 unlabelled rows left out; 20 % held out
    assert d["replay"]["images"] == 39 and d["train"] == 78 and d["old"]["held_out"] == 24
    assert d["old"]["held_out_from"].startswith("test set")
    # the artifact holds the same decision; its config names the version's own data, not the hidden folder
    meta = json.loads((v2 / "imgclf.json").read_text())
    assert meta["retrain"]["scores"] == s and meta["retrain"]["decision"] == doc["decision"]
    assert meta["config"]["data"]["path"] == str(v2.resolve() / "retrain" / "train.csv")
    assert meta["config"]["model"]["weights"] == str((repo / "1").resolve()) and meta["config"]["run"]["name"] == "2"
    assert ".retrain-" not in (v2 / "config.yaml").read_text() + (v2 / "imgclf.json").read_text()
    assert "Retrained: challenger vs champion" in (v2 / "report.html").read_text()
    # the new data is the version's own (a capture folder rotates its images away): copies, bytes unchanged
    shutil.rmtree(new)
    with open(v2 / "retrain" / "new_test.csv", newline="") as f:
        copied = [v2 / "retrain" / r["path"] for r in csv.DictReader(f)]
    assert len(copied) == 9 and all(p.is_file() and v2 in p.parents for p in copied)
    # the four scores are what an independent computation gives on the same held-out images
    held = {"new": v2 / "retrain" / "new_test.csv", "old": v2 / "retrain" / "old_test.csv"}
    for role, run in (("champion", repo / "1"), ("challenger", v2)):
        for split, csv_path in held.items():
            assert s[role][split] == pytest.approx(_accuracy(run, csv_path)), (role, split)
    ev = run_cli("eval", v2, "--data", v2 / "retrain" / "test.csv", "--workers", "0")  # a run like any other
    assert ev.code == 0, ev


@pytest.mark.slow
def test_retrain_refuses_to_promote_a_worse_challenger(repo, tmp_path):
    """New data of the old distribution: the champion is perfect on it, so the challenger cannot be better."""
    before = sorted(p.name for p in repo.iterdir() if not p.name.startswith("."))
    new = make_folder(tmp_path / "more", n_per_class=10, seed=7)
    r = run_cli("retrain", repo / "1", "--new-data", new, *FAST[2:], "--epochs", "1", "--lr", "0.05")
    assert r.code == 3, r
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("imgclf: error: the challenger is not promoted: not better on the new data"), last
    assert "NOT PROMOTED" in r.out  # the figures are printed before the refusal
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == before  # no new version
    (rejected,) = repo.glob(".rejected-*")
    doc = json.loads((rejected / "retrain.json").read_text())
    assert doc["scores"]["champion"]["new"] == 1.0 and doc["version"] is None and doc["run"] == str(rejected)
    assert not doc["decision"]["accepted"] and not doc["decision"]["promoted"]
    assert doc["decision"]["gain_new_points"] <= 0
    assert (rejected / "model.safetensors").is_file()  # kept for inspection, still hidden from a watcher


def test_replay_is_a_stratified_sample_of_the_training_split_never_of_the_held_out_images(repo, tmp_path):
    """A champion without a test set: the old held-out set is its validation split, rebuilt exactly; the replay
    sample comes from the rest of its training data, stratified."""
    from imgclf.artifact import read_artifact
    from imgclf.config import build_config
    from imgclf.data.splits import prepare_data
    from imgclf.retrain import plan_data, write_plan

    art = read_artifact(repo / "1")
    art.config["data"]["test_path"] = None
    new = capture_folder(tmp_path / "capture", n_per_class=20, unlabelled=0)
    plan = plan_data(art, 0, new, replay=0.5)
    splits = prepare_data(build_config([art.config], ["c"]))
    assert plan.old_test.items == splits.val.items and plan.old_test_from.startswith("validation split")
    assert not set(plan.replay.items) & set(splits.val.items)  # never a held-out image
    assert set(plan.replay.items) <= set(splits.train.items)
    assert len(plan.new_train) == 48 and len(plan.new_test) == 12
    assert np.bincount(plan.new_test.labels).tolist() == [4, 4, 4]
    assert len(plan.replay) == 24 and np.bincount(plan.replay.labels).tolist() == [8, 8, 8]
    again = plan_data(art, 0, new, replay=0.5)
    assert again.replay.items == plan.replay.items and again.new_test.items == plan.new_test.items  # seeded
    files = write_plan(plan, tmp_path / "mix")
    lines = files["train"].read_text().splitlines()
    assert lines[0] == "path,label" and len(lines) == 1 + 48 + 24
    assert len(files["test"].read_text().splitlines()) == 1 + len(plan.old_test) + 12
    # a class with a single new image: used for training, none held out, and said
    one = tmp_path / "one"
    shutil.copytree(new, one)
    rows = (one / "labels.csv").read_text().splitlines()
    keep = [rows[0]] + [x for x in rows[1:] if ",class_2," not in x] + [next(x for x in rows if ",class_2," in x)]
    (one / "labels.csv").write_text("\n".join(keep) + "\n")
    small = plan_data(art, 0, one, replay=0)
    assert np.bincount(small.new_test.labels, minlength=3)[2] == 0 and "class_2" in small.notes[0]
    assert len(small.replay) == 0


def test_retrain_errors_are_one_line(repo, tmp_path):
    bad = capture_folder(tmp_path / "bad", n_per_class=2, unlabelled=0)
    rows = (bad / "labels.csv").read_text().replace("images/0004.png,class_1", "images/0004.png,purple")
    (bad / "labels.csv").write_text(rows)
    r = run_cli("retrain", repo / "1", "--new-data", bad)
    assert r.code == 2 and "label 'purple' is not one of the champion's classes" in r.err, r
    assert len(r.err.strip().splitlines()) == 1
    knn = tmp_path / "knn"
    knn.mkdir()
    meta = json.loads((repo / "1" / "imgclf.json").read_text())
    (knn / "imgclf.json").write_text(json.dumps(meta | {"kind": "knn"}))
    r = run_cli("retrain", knn, "--new-data", bad)
    assert r.code == 2 and "a k-NN index has no trained network to fine-tune" in r.err, r
    r = run_cli("retrain", repo / "1")
    assert r.code == 2 and "the following arguments are required: --new-data" in r.err, r
    r = run_cli("retrain", repo / "1", "--new-data", bad, "--data", bad)
    assert r.code == 2 and "drop --data (use --new-data)" in r.err, r
    r = run_cli("retrain", repo / "1", "--new-data", bad, "--holdout", "1.5")
    assert r.code == 2 and "--holdout must be between 0 and 1" in r.err, r
    with pytest.raises(ImgclfError, match="not both"):
        from imgclf.retrain import placement

        placement(repo / "1", promote_to=repo, out=tmp_path / "x")
    assert not list(repo.glob(".retrain-*"))  # bad input creates nothing


@pytest.mark.unit
def test_the_decision_needs_a_gain_on_new_and_at_most_the_margin_lost_on_old():
    from imgclf.retrain import decide

    def d(cn, co, hn, ho, **kw):
        return decide({"champion": {"new": cn, "old": co}, "challenger": {"new": hn, "old": ho}},
                      **({"margin": 1.0, "min_gain": 0.0, "force": False} | kw))  # fmt: skip

    ok = d(0.5, 0.9, 0.8, 0.895)
    assert ok["accepted"] and ok["promoted"] and (ok["gain_new_points"], ok["drop_old_points"]) == (30.0, 0.5)
    assert d(0.5, 0.9, 0.8, 0.89)["accepted"]  # exactly the margin
    worse_old = d(0.5, 0.9, 0.8, 0.88)
    assert not worse_old["promoted"] and "2.00 points worse on the old data" in worse_old["reason"]
    assert not d(0.5, 0.9, 0.5, 0.9)["accepted"]  # equal on new is not better
    assert not d(0.5, 0.9, 0.52, 0.9, min_gain=2.0)["accepted"]  # 2 points is not more than --min-gain 2
    forced = d(0.5, 0.9, 0.4, 0.9, force=True)
    assert forced["promoted"] and forced["forced"] and not forced["accepted"]
    assert not d(float("nan"), 0.9, 0.8, 0.9)["accepted"]  # an undefined score never promotes
