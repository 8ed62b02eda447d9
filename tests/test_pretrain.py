"""``imgclf pretrain``: SimCLR, BYOL, DINO and MAE on tiny generated images; the collapse check, the k-NN monitor,
exact resume, and the backbone run that ``--weights RUN`` takes for probe, finetune and k-NN indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgclf.errors import ImgclfError

from .conftest import make_folder, run_cli

FAST = ("--batch-size", "16", "--data.num_workers", "0", "--no-progress", "--input-size", "24", "--train.amp", "none",
        "--sched.warmup_epochs", "0")  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ssl") / "data", n_per_class=16, classes=3, seed=5)


def _pretrain(folder, out, name, *extra):
    r = run_cli("pretrain", str(folder), "--model", "test_resnet", "--output", out, "--name", name, *FAST, *extra)
    assert r.code == 0, r
    return out / name


@pytest.mark.unit
def test_embedding_spread_is_one_for_spread_and_zero_for_collapsed_embeddings():
    from imgclf.train.ssl import embedding_spread

    g = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    assert 0.95 < embedding_spread(g) < 1.05
    assert embedding_spread(torch.ones(50, 64) + 1e-9 * g[:50]) < 1e-3
    assert 0.2 < embedding_spread(torch.cat([g[:, :8], torch.zeros(4000, 56)], 1)) < 0.45  # 8 of 64 dims used


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_each_method_pretrains_a_backbone_that_weights_run_starts_from(method, folder, tmp_path):
    run = _pretrain(folder, tmp_path, method, "--method", method, "--epochs", "2", "--knn-data", str(folder),
                    "--ssl.knn_max", "48", "--ssl.local_views", "2", "--ssl.hidden_dim", "64")  # fmt: skip
    meta = json.loads((run / "imgclf.json").read_text())
    assert meta["kind"] == "backbone" and meta["class_names"] == [] and meta["ssl"]["method"] == method
    hist = meta["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in hist)
    assert all(0 < h["emb_spread"] < 1.5 and 0 <= h["knn_top1"] <= 1 for h in hist)
    ssl = load_file(str(run / "model.safetensors"))
    assert not any(k.startswith(("fc.", "head")) for k in ssl)  # a headless backbone

    # a probe starts from it: its backbone tensors are the SSL ones, bit for bit
    r = run_cli("train", "--data", str(folder), "--model", "test_resnet", "--weights", str(run), "--strategy",
                "probe", "--output", tmp_path, "--name", f"{method}-probe", *FAST[:-2])  # fmt: skip
    assert r.code == 0, r
    probe = load_file(str(tmp_path / f"{method}-probe" / "model.safetensors"))
    assert all(torch.equal(probe[k], v) for k, v in ssl.items() if not k.endswith("num_batches_tracked"))
    assert json.loads((tmp_path / f"{method}-probe" / "imgclf.json").read_text())["weights_source"] == f"run:{run}"


@pytest.mark.slow
def test_dino_on_a_vit_takes_local_crops_and_keeps_the_teacher(folder, tmp_path):
    r = run_cli("pretrain", str(folder), "--method", "dino", "--model", "test_vit", "--input-size", "32", "--epochs",
                "1", "--batch-size", "16", "--data.num_workers", "0", "--no-progress", "--output", tmp_path, "--name",
                "dino", "--ssl.local_views", "2", "--ssl.hidden_dim", "64", "--ssl.proj_dim", "256")  # fmt: skip
    assert r.code == 0, r
    kept = load_file(str(tmp_path / "dino" / "model.safetensors"))
    ck = torch.load(tmp_path / "dino" / "checkpoints" / "last.pt", weights_only=True)["model"]
    teacher = {k.removeprefix("teacher_backbone."): v for k, v in ck.items() if k.startswith("teacher_backbone.")}
    student = {k.removeprefix("backbone."): v for k, v in ck.items() if k.startswith("backbone.")}
    assert kept.keys() == teacher.keys() and all(torch.equal(kept[k], teacher[k]) for k in kept)
    assert any(not torch.equal(kept[k], student[k]) for k in kept)  # the teacher, not the student


@pytest.mark.slow
def test_mae_pretrains_a_vit_and_refuses_a_cnn(folder, tmp_path):
    run = tmp_path / "mae"
    r = run_cli("pretrain", str(folder), "--method", "mae", "--model", "test_vit", "--input-size", "32", "--epochs",
                "2", "--batch-size", "16", "--data.num_workers", "0", "--no-progress", "--output", tmp_path,
                "--name", "mae", "--ssl.hidden_dim", "64")  # fmt: skip
    assert r.code == 0, r
    hist = json.loads((run / "imgclf.json").read_text())["metrics"]["history"]
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) and h["train_loss"] > 0 for h in hist)
    bad = run_cli("pretrain", str(folder), "--method", "mae", "--model", "test_resnet", "--output", tmp_path,
                  "--name", "mae-cnn", *FAST)  # fmt: skip
    assert bad.code == 2 and "needs a timm VisionTransformer" in bad.err and len(bad.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_resume_continues_exactly(folder, tmp_path, monkeypatch):
    import imgclf.train.pretrain as pt

    full = _pretrain(folder, tmp_path, "full", "--epochs", "2", "--method", "byol")  # momentum target, schedule
    save = pt._save

    def crash_after_first_epoch(job, state):
        save(job, state)
        if state.epoch == 1:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint

    monkeypatch.setattr(pt, "_save", crash_after_first_epoch)
    assert run_cli("pretrain", str(folder), "--model", "test_resnet", "--output", tmp_path, "--name", "part", *FAST,
                   "--epochs", "2", "--method", "byol").code == 130  # fmt: skip
    part = tmp_path / "part"
    assert not (part / "imgclf.json").exists()
    monkeypatch.setattr(pt, "_save", save)
    r = run_cli("pretrain", "--resume", "--output", tmp_path, "--name", "part")
    assert r.code == 0, r
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((full / "imgclf.json").read_text())["metrics"]["history"]
    hb = json.loads((part / "imgclf.json").read_text())["metrics"]["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


@pytest.mark.slow
def test_knn_monitor_matches_a_nearest_neighbour_count(folder, tmp_path):
    """With k = 1 the monitor's accuracy is the share of query images whose most cosine-similar support image has
    their class: recomputed with scikit-learn on the saved backbone's embeddings."""
    from sklearn.neighbors import KNeighborsClassifier

    from imgclf.api import pretrain_config
    from imgclf.config import InferConfig
    from imgclf.data.preprocess import Preprocess
    from imgclf.data.sources import open_unlabelled
    from imgclf.models.embedding import embed_samples
    from imgclf.models.factory import build_model
    from imgclf.train.pretrain import _monitor_sets

    run = _pretrain(folder, tmp_path, "k1", "--epochs", "1", "--knn-data", str(folder), "--ssl.knn_k", "1")
    meta = json.loads((run / "imgclf.json").read_text())
    model = build_model("test_resnet", 0)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    cfg = pretrain_config(str(folder), overrides={"ssl.knn_data": str(folder), "ssl.knn_k": "1"})
    _, (sup, qry) = _monitor_sets(open_unlabelled(str(folder), "train"), cfg)  # the run's split (seeded)
    pre, infer = Preprocess.from_json(meta["preprocessing"]), InferConfig(workers=0, progress=False)
    (fs, ys, _), (fq, yq, _) = (embed_samples(model.eval(), s, pre, infer) for s in (sup, qry))
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(fs.numpy(), ys.numpy()).score(fq.numpy(), yq.numpy())
    assert meta["metrics"]["knn_top1"] == pytest.approx(ref, abs=1e-6)


@pytest.mark.slow
def test_a_backbone_run_is_not_a_classifier_and_needs_its_architecture(folder, tmp_path):
    run = _pretrain(folder, tmp_path, "bb", "--epochs", "1")
    img = next(folder.glob("class_0/*.png"))
    for argv in (("predict", str(run), str(img)), ("export", str(run)), ("eval", str(run), "--data", str(folder))):
        r = run_cli(*argv)
        assert r.code == 2 and "self-supervised backbone" in r.err and len(r.err.strip().splitlines()) == 1, argv
    r = run_cli("train", "--data", str(folder), "--model", "test_efficientnet", "--weights", str(run), "--output",
                tmp_path, "--name", "wrong", *FAST[:-2])  # fmt: skip
    assert r.code == 2 and "a test_resnet run, not test_efficientnet; pass --model test_resnet" in r.err
    # a k-NN index on it embeds at the run's own 24 px (no --input-size given)
    r = run_cli("knn", "build", str(folder), "--model", "test_resnet", "--weights", str(run), "--output", tmp_path,
                "--name", "idx", "--workers", "0", "--no-progress")  # fmt: skip
    assert r.code == 0, r
    assert json.loads((tmp_path / "idx" / "imgclf.json").read_text())["preprocessing"]["input_size"] == [3, 24, 24]


@pytest.mark.slow
def test_weights_run_keeps_a_trained_head_for_the_same_classes_in_any_order(folder, tmp_path):
    from imgclf.artifact import load_artifact
    from imgclf.config import ModelConfig
    from imgclf.models.factory import create_model

    r = run_cli("train", "--data", str(folder), "--model", "test_resnet", "--weights", "none", "--epochs", "1",
                "--output", tmp_path, "--name", "a", "--trust.report", "false", *FAST[:-2])  # fmt: skip
    assert r.code == 0, r
    trained, art = load_artifact(tmp_path / "a")
    names = art.class_names
    head = trained.get_classifier().weight
    same, _ = create_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "a")), 3, None, names)
    flipped, _ = create_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "a")), 3, None, names[::-1])
    other, _ = create_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "a")), 3, None, ["x", "y", "z"])
    assert torch.equal(same.get_classifier().weight, head)
    assert torch.equal(flipped.get_classifier().weight, head.flip(0))
    assert not other.get_classifier().weight.any()  # new classes: a fresh (zeroed) head on the trained backbone
    with pytest.raises(ImgclfError, match="not an imgclf run"):
        create_model(ModelConfig(name="test_resnet", weights=str(folder)), 3)
