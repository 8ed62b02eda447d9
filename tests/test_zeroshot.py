"""``imgclf zeroshot``: open_clip zero-shot runs (a tiny random open_clip ViT from a local checkpoint, offline) through
every stage, class edits from the stored text tower, the Tip-Adapter cache, and the errors a user can make."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from imgclf.errors import ImgclfError

from .conftest import TINY_CLIP_CFG, make_folder, make_image, run_cli

FAST = ("--no-progress", "--workers", "0")


def _reference_text(clip_path, names: list[str], templates: list[str]) -> torch.Tensor:
    """(K, D) class embeddings computed with open_clip alone: the CLIP recipe written out (Radford et al. 2021)."""
    import open_clip

    clip = open_clip.create_model("tiny-vit", pretrained=str(clip_path)).eval()
    tok = open_clip.get_tokenizer("tiny-vit")
    rows = []
    with torch.no_grad():
        for n in names:
            t = F.normalize(clip.encode_text(tok([x.replace("{}", n) for x in templates])), dim=-1)
            rows.append(F.normalize(t.mean(0), dim=-1))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("zs") / "data", n_per_class=6, classes=3, seed=3)


@pytest.fixture(scope="module")
def zs_run(tiny_clip, folder, tmp_path_factory):
    """A zero-shot run built through the CLI with class names from a folder (and top-1 scored on it)."""
    out = tmp_path_factory.mktemp("zsrun") / "zs"
    r = run_cli("zeroshot", "--model", "tiny-vit", "--pretrained", tiny_clip, "--data", folder, "--templates",
                "simple", "--out", out, *FAST)  # fmt: skip
    assert r.code == 0, r
    return out


# --------------------------------------------------------------------------- the model


@pytest.mark.unit
def test_logits_equal_the_clip_recipe_computed_with_open_clip(tiny_clip):
    import open_clip

    from imgclf.models.zeroshot import builtin_templates, create_clip, encode_classes, zeroshot_from_clip

    clip, info = create_clip("tiny-vit", str(tiny_clip))
    templates = builtin_templates("imagenet")
    assert len(templates) == 80 and all("{}" in t for t in templates) and len(builtin_templates("simple")) == 7
    names = ["cat", "dog", "école"]
    emb = encode_classes(clip, open_clip.get_tokenizer("tiny-vit"), names, templates)
    clf = zeroshot_from_clip(clip, emb, info["preprocess_cfg"])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref_text = _reference_text(tiny_clip, names, templates)
    with torch.no_grad():
        ref = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ ref_text.T
        got = clf(x)
        feats = clf.forward_features(x)
    assert got.shape == (5, 3) and torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert torch.allclose(emb, ref_text, atol=1e-6)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-6)  # unit embeddings
    assert torch.equal(clf.forward_head(feats, pre_logits=True), feats) and clf.num_features == 32
    assert clf.get_classifier().bias is None and torch.equal(clf.get_classifier().weight, emb)
    clf.reset_classifier(0)
    with torch.no_grad():
        assert clf.num_classes == 0 and torch.equal(clf(x), feats)


@pytest.mark.unit
def test_preprocessing_is_open_clips_own_transform(tiny_clip):
    """``Preprocess.from_model`` of the classifier gives open_clip's eval transform, pixel for pixel (to float
    rounding), on a non-square photo."""
    import open_clip
    from PIL import Image

    from imgclf.data.preprocess import Preprocess
    from imgclf.models.zeroshot import create_clip, timm_pretrained_cfg, zeroshot_from_clip

    clip, info = create_clip("tiny-vit", str(tiny_clip))
    pre = Preprocess.from_model(zeroshot_from_clip(clip, torch.eye(2, 32), info["preprocess_cfg"]))
    assert pre.input_size == (3, 32, 32) and pre.crop_pct == 1.0 and pre.interpolation == "bicubic"
    assert pre.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    cfg = open_clip.get_model_preprocess_cfg(clip)
    ref = open_clip.image_transform(32, is_train=False, mean=cfg["mean"], std=cfg["std"])(img)
    assert torch.allclose(pre.eval()(img), ref, atol=1e-5)
    siglip = timm_pretrained_cfg({"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash"})
    assert siglip["crop_mode"] == "squash" and siglip["input_size"] == (3, 224, 224)


@pytest.mark.unit
def test_templates_and_class_names_are_checked(tmp_path):
    from imgclf.models.zeroshot import clean_class_names, load_templates

    f = tmp_path / "t.txt"
    f.write_text("# mine\na photo of a {}.\n\nan art of {}\n")
    assert load_templates(str(f)) == ["a photo of a {}.", "an art of {}"]
    f.write_text("a photo of a {}.\n# ok\na photo\n")
    with pytest.raises(ImgclfError, match=r"t\.txt:3: template 'a photo' has no \{\}"):
        load_templates(str(f))
    assert clean_class_names(["Cafe\u0301 ", "cat"]) == ["Café", "cat"]
    with pytest.raises(ImgclfError, match="duplicated class name"):
        clean_class_names(["Café", "Cafe\u0301"])


# --------------------------------------------------------------------------- build, predict, eval, export, serve


@pytest.mark.cli
@pytest.mark.slow
def test_zeroshot_run_predicts_evaluates_exports_and_serves(zs_run, tiny_clip, folder, tmp_path):
    from sklearn.metrics import accuracy_score

    from imgclf.artifact import load_artifact
    from imgclf.models.zeroshot import ZeroShotClassifier

    doc = json.loads((zs_run / "imgclf.json").read_text())
    assert doc["kind"] == "zeroshot" and doc["arch"] == "open_clip:tiny-vit"
    assert doc["class_names"] == ["class_0", "class_1", "class_2"]
    z = doc["zeroshot"]
    assert z["model_cfg"] == TINY_CLIP_CFG and z["pretrained"] == str(tiny_clip) and len(z["templates"]) == 7
    assert z["prompts"]["class_1"][0] == "itap of a class_1." and z["tokenizer"]["type"] == "simple"
    assert {p.name for p in zs_run.iterdir()} == {"model.safetensors", "imgclf.json", "text.safetensors"}
    assert not any(k.startswith("visual.") for k in load_file(str(zs_run / "text.safetensors")))
    assert all(
        not k.startswith(("transformer.", "token_embedding")) for k in load_file(str(zs_run / "model.safetensors"))
    )
    model, art = load_artifact(zs_run)
    assert isinstance(model, ZeroShotClassifier) and art.preprocessing.input_size == (3, 32, 32)

    r = run_cli("predict", zs_run, folder, "--format", "json", "--top-k", "3", *FAST)
    assert r.code == 0, r
    preds = json.loads(r.out)["predictions"]
    assert len(preds) == 18
    y_true = [p["path"].split("/")[-2] for p in preds]
    y_pred = [p["top"][0]["label"] for p in preds]
    r = run_cli("eval", zs_run, "--data", folder, "--format", "json", *FAST)
    assert r.code == 0, r
    top1 = json.loads(r.out)["top1"]
    assert top1 == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)  # float32 metric
    assert doc["metrics"]["zeroshot_top1"] == pytest.approx(top1, abs=1e-9)  # the summary's figure is eval's

    _check_onnx(zs_run, folder)
    _check_served(zs_run, tmp_path)


def _check_onnx(run, folder):
    import onnxruntime as ort

    from imgclf import api

    r = run_cli("export", run, "--format", "onnx", "--data", folder)
    assert r.code == 0, r
    rec = json.loads((run / "export" / "export.json").read_text())["onnx"]
    assert rec["verify"]["top1_agreement"] == 1.0 and rec["verify"]["max_abs_logit_diff"] < 1e-4
    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    px = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # preprocessing in the graph
    logits, probs, feats = sess.run(["logits", "probs", "features"], {"input": px})
    model, art = api.load(run)
    x = art.preprocessing.normalize()(torch.from_numpy(px).permute(0, 3, 1, 2))
    with torch.no_grad():
        ref = model(x).numpy()
        ref_f = model.forward_features(x).numpy()
    assert np.abs(logits - ref).max() < 1e-4 and np.abs(feats - ref_f).max() < 1e-5
    assert np.abs(probs - torch.from_numpy(ref).softmax(1).numpy()).max() < 1e-5


def _check_served(run, tmp_path):
    from imgclf.deploy.runtime import load_predictor, to_pixels

    from .serving import Served, png

    images = [make_image(c, np.random.default_rng(c)) for c in range(3)]
    pred = load_predictor(run, "torch")
    _, probs, *_ = pred(to_pixels(images, pred.art))
    s = Served([run, "--runtime", "torch"], tmp_path)  # a new process: no open_clip registry, no hub
    try:
        for img, p in zip(images, probs):
            status, doc = s.json("POST", "/predict", png(img), {"Content-Type": "image/png"})
            assert status == 200, doc
            top = doc["predictions"][0]["top"][0]
            k = int(np.argmax(p))
            assert top["label"] == f"class_{k}" and top["prob"] == pytest.approx(float(p[k]), abs=1e-4)
    finally:
        assert s.stop() == 0, s.log()


@pytest.mark.cli
def test_calibrate_and_ood_fit_work_and_explain_says_why_not(zs_run, folder, tmp_path):
    run = shutil.copytree(zs_run, tmp_path / "zs")
    assert json.loads((run / "imgclf.json").read_text())["ood"]["thresholds"] == {}  # settings, nothing fitted yet
    r = run_cli("calibrate", run, "--data", folder, *FAST)
    assert r.code == 0, r
    doc = json.loads((run / "imgclf.json").read_text())
    t = doc["calibration"]["temperature"]
    assert isinstance(t, float) and t > 0 and doc["calibration"].get("n", 18) == 18
    assert set(doc["ood"]["thresholds"]) >= {"energy", "msp"} and doc["drift"]["n"] == 18
    r = run_cli("explain", run, folder / "class_0" / "img_000.png")
    assert r.code == 2 and r.err.count("\n") == 1 and "pooled image embedding" in r.err, r
    r = run_cli("report", run)
    assert r.code == 2 and "no training report" in r.err, r


# --------------------------------------------------------------------------- class edits, offline


@pytest.mark.cli
def test_add_rename_remove_classes_from_the_stored_text_tower(zs_run, tiny_clip, tmp_path, monkeypatch):
    from imgclf.artifact import load_artifact

    run = shutil.copytree(zs_run, tmp_path / "zs")
    before, art0 = load_artifact(run)
    templates = art0.extra["zeroshot"]["templates"]
    import open_clip.pretrained

    def no_hub(*a, **k):
        raise AssertionError("an edit reached for the hub")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_hub)
    r = run_cli("zeroshot", run, "--add-class", "zebra", *FAST)
    assert r.code == 0, r
    after, art = load_artifact(run)
    assert art.class_names == ["class_0", "class_1", "class_2", "zebra"] and after.num_classes == 4
    w0, w = before.get_classifier().weight, after.get_classifier().weight
    assert torch.equal(w[:3], w0)  # old rows bit-identical
    assert torch.allclose(w[3], _reference_text(tiny_clip, ["zebra"], templates)[0], atol=1e-6)
    assert art.extra["zeroshot"]["prompts"]["zebra"][0] == "itap of a zebra."

    r = run_cli("zeroshot", run, "--rename", "class_1=lion", "--remove-class", "class_0", *FAST)
    assert r.code == 0, r
    edited, art = load_artifact(run)
    assert art.class_names == ["lion", "class_2", "zebra"]
    we = edited.get_classifier().weight
    assert torch.equal(we[1], w[2]) and torch.equal(we[2], w[3])  # untouched rows keep their bits
    assert torch.allclose(we[0], _reference_text(tiny_clip, ["lion"], templates)[0], atol=1e-6)  # re-encoded
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(edited(x)[:, 1:], after(x)[:, 2:], atol=1e-6)


@pytest.mark.cli
def test_class_edits_drop_calibration_and_refuse_bad_names(zs_run, folder, tmp_path):
    run = shutil.copytree(zs_run, tmp_path / "zs")
    assert run_cli("calibrate", run, "--data", folder, *FAST).code == 0
    r = run_cli("zeroshot", run, "--add-class", "zebra", *FAST)
    assert r.code == 0 and "calibration, OOD and drift statistics no longer apply" in r.out, r
    doc = json.loads((run / "imgclf.json").read_text())
    assert "calibration" not in doc and doc["ood"]["thresholds"] == {} and "drift" not in doc
    for argv, msg in ((("--add-class", "zebra"), "duplicated class name"),
                      (("--rename", "nope=x"), "no class 'nope'"),
                      (("--rename", "zebra=class_0"), "duplicated class name"),
                      (("--add-class", "&nbsp;"), "tokenise to nothing")):  # fmt: skip
        r = run_cli("zeroshot", run, *argv, *FAST)
        assert r.code == 2 and r.err.count("\n") == 1 and msg in r.err, (argv, r)
    assert json.loads((run / "imgclf.json").read_text())["class_names"][-1] == "zebra"  # unchanged by refusals


# --------------------------------------------------------------------------- Tip-Adapter


@pytest.mark.cli
def test_tip_adapter_alpha_zero_is_zero_shot_and_a_large_alpha_knows_its_support(zs_run, tmp_path):
    from imgclf.artifact import load_artifact

    support = make_folder(tmp_path / "support", n_per_class=4, classes=3, seed=11)
    run = shutil.copytree(zs_run, tmp_path / "zs")
    zs, _ = load_artifact(run)
    r = run_cli("zeroshot", run, "--support", support, "--tip-alpha", "0", *FAST)
    assert r.code == 0 and "Tip-Adapter cache: 12 support images" in r.out, r
    tip, art = load_artifact(run)
    assert tip.tip_keys.shape == (12, 32) and tip.tip_values.shape == (12, 3)
    assert torch.equal(tip.tip_values.sum(0), torch.tensor([4.0, 4.0, 4.0]))
    assert art.extra["zeroshot"]["tip"]["n_support"] == {"class_0": 4, "class_1": 4, "class_2": 4}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tip(x), zs(x))  # alpha 0: the zero-shot logits exactly

    r = run_cli("zeroshot", run, "--tip-alpha", "1000", "--tip-beta", "200", *FAST)
    assert r.code == 0, r
    tip, art = load_artifact(run)
    assert float(tip.tip_alpha) == 1000 and float(tip.tip_beta) == 200 and tip.tip_keys.shape == (12, 32)
    r = run_cli("eval", run, "--data", support, "--format", "json", *FAST)
    assert r.code == 0 and json.loads(r.out)["top1"] == 1.0, r
    # the cache term by hand: alpha * exp(-beta (1 - cos)) @ one-hot
    with torch.no_grad():
        f = tip.forward_features(x)
        hand = zs(x) + 1000 * torch.exp(-200 * (1 - f @ tip.tip_keys.T)) @ tip.tip_values
        assert torch.allclose(tip(x), hand, rtol=1e-5, atol=1e-4)


@pytest.mark.unit
def test_tip_cache_follows_class_edits(tiny_clip):
    from imgclf.models.zeroshot import ZeroShotClassifier, build_visual

    clf = ZeroShotClassifier(build_visual(TINY_CLIP_CFG), F.normalize(torch.randn(3, 32), dim=-1), 10.0, -2.0,
                             {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})  # fmt: skip
    clf.set_tip(F.normalize(torch.randn(6, 32), dim=-1), F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float(), 2.0)
    with pytest.raises(ImgclfError, match=r"values \(N, 3\)"):
        clf.set_tip(torch.zeros(2, 32), torch.zeros(2, 4))
    assert float(clf.logit_bias) == -2.0 and clf.has_bias
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = clf.forward_features(x)
        assert torch.allclose(clf(x), 10 * f @ clf.class_embeddings.T - 2 + 2 * torch.exp(
            -5.5 * (1 - f @ clf.tip_keys.T)) @ clf.tip_values, atol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------- errors a user can make


@pytest.mark.cli
def test_bad_input_is_one_line_and_exit_code_2(tiny_clip, tmp_path):
    import open_clip

    wide = dict(TINY_CLIP_CFG, embed_dim=48)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-vit-wide.json").write_text(json.dumps(wide))
    open_clip.add_model_config(tmp_path / "cfg")
    bad_templates = tmp_path / "templates.txt"
    bad_templates.write_text("a photo of a {}.\na drawing\n")
    base = ("zeroshot", "--pretrained", tiny_clip, "--out", tmp_path / "never", *FAST)
    cases = [
        (("--model", "tiny-vit", "--classes", ""), "no class names given"),
        (("--model", "tiny-vit", "--classes", "cat,dog,cat"), "duplicated class name(s) 'cat'"),
        (("--model", "tiny-vit", "--classes", "cat,Cafe\u0301,Café"), "duplicated class name(s) 'Café'"),
        (("--model", "tiny-vit", "--classes", "cat,&nbsp;"), "'&nbsp;' tokenise to nothing"),
        (("--model", "tiny-vit-wide", "--classes", "a,b"), f"{tiny_clip}: checkpoint does not match open_clip model "
                                                            "'tiny-vit-wide'"),
        (("--model", "tiny-vit", "--classes", "a,b", "--templates", bad_templates),
         f"{bad_templates}:2: template 'a drawing' has no {{}}"),
        (("--model", "tiny-vt", "--classes", "a,b"), "unknown open_clip model 'tiny-vt'; did you mean tiny-vit"),
    ]  # fmt: skip
    for argv, msg in cases:
        r = run_cli(*base, *argv)
        assert r.code == 2 and r.err.count("\n") == 1 and msg in r.err, (argv, r)
    assert not (tmp_path / "never").exists()
    r = run_cli(
        "zeroshot",
        "--model",
        "ViT-B-32",
        "--pretrained",
        "laion2b_s34b_b79k",
        "--classes",
        "a,b",
        "--out",
        tmp_path / "hub",
    )  # fmt: skip  (HF_HUB_OFFLINE=1 in the tests: the download fails)
    assert r.code == 2 and r.err.count("\n") == 1 and "check the network or pass a local checkpoint" in r.err, r
    r = run_cli("zeroshot", "--model", "ViT-B-32", "--pretrained", "no-such-tag", "--classes", "a,b")
    assert r.code == 2 and "neither a file nor a tag" in r.err and "laion2b_s34b_b79k" in r.err, r


@pytest.mark.unit
def test_api_builds_the_same_run_as_the_cli(tiny_clip, tmp_path):
    from imgclf import api

    model, art = api.zeroshot("tiny-vit", str(tiny_clip), ["red", "green"], tmp_path / "a", templates="simple")
    assert art.kind == "zeroshot" and model.num_classes == 2
    model2, _ = api.zeroshot_edit(tmp_path / "a", add=["blue"])
    assert model2.num_classes == 3 and torch.equal(model2.class_embeddings[:2], model.class_embeddings)
    with pytest.raises(ImgclfError, match="already holds a run"):
        api.zeroshot("tiny-vit", str(tiny_clip), ["red"], tmp_path / "a")


@pytest.mark.unit
def test_a_siglip_style_logit_bias_is_applied_and_saved(tmp_path):
    """A model with a learnt logit bias (SigLIP's, Zhai et al. 2023): logits = scale * cos + bias, kept by a save and
    load; a local file of a SigLIP architecture gets its published tag's preprocessing, not open_clip's defaults."""
    import open_clip
    from safetensors.torch import save_file

    from imgclf.artifact import load_artifact
    from imgclf.models.zeroshot import file_preprocess
    from imgclf.zeroshot import build_zeroshot

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-sig.json").write_text(json.dumps(dict(TINY_CLIP_CFG, init_logit_bias=-3.5)))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(1)
    clip = open_clip.create_model("tiny-sig").eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "sig.safetensors"))
    model, art = build_zeroshot("tiny-sig", str(tmp_path / "sig.safetensors"), ["a", "b"], tmp_path / "run")
    loaded, art2 = load_artifact(tmp_path / "run")
    assert art2.extra["zeroshot"]["logit_bias"] is True and float(loaded.logit_bias) == -3.5 and loaded.has_bias
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = F.normalize(clip.encode_image(x), dim=-1)
        ref = clip.logit_scale.exp() * f @ loaded.class_embeddings.T + clip.logit_bias
        assert torch.allclose(loaded(x), ref, atol=1e-5) and torch.equal(loaded(x), model(x))
    pp, source = file_preprocess("ViT-B-16-SigLIP")
    assert pp["mean"] == [0.5, 0.5, 0.5] and pp["resize_mode"] == "squash" and "webli" in source


@pytest.mark.unit
def test_a_local_dir_model_brings_its_own_weights_and_preprocessing(tiny_clip, tmp_path):
    """open_clip's ``local-dir:`` schema (the offline twin of ``hf-hub:``): config, preprocessing and weights from
    one folder, no ``--pretrained`` needed."""
    d = tmp_path / "tiny-repo"
    d.mkdir()
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "squash", "interpolation": "bilinear"}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": pp}))
    shutil.copy(tiny_clip, d / "open_clip_model.safetensors")
    r = run_cli("zeroshot", "--model", f"local-dir:{d}", "--classes", "a,b", "--out", tmp_path / "run", *FAST)
    assert r.code == 0, r
    doc = json.loads((tmp_path / "run" / "imgclf.json").read_text())
    assert doc["preprocessing"]["mean"] == [0.5] * 3 and doc["preprocessing"]["std"] == [0.25] * 3
    assert doc["preprocessing"]["crop_mode"] == "squash" and doc["preprocessing"]["interpolation"] == "bilinear"
    ref = load_file(str(tiny_clip))
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(got["visual.conv1.weight"], ref["visual.conv1.weight"])  # the folder's weights, not random


# ------------------------------------------------------------------- fine-tuning from the zero-shot head, WiSE-FT

_FT = ("--epochs", "2", "--batch-size", "6", "--lr", "0.003", "--data.num_workers", "0", "--no-progress",
       "--train.ema", "false", "--sched.warmup_epochs", "0", "--trust.report", "false")  # fmt: skip


@pytest.mark.unit
def test_the_zero_shot_head_initialises_the_model_in_the_datas_class_order(zs_run):
    from imgclf.artifact import load_artifact
    from imgclf.config import ModelConfig
    from imgclf.models.factory import create_model

    zs, art = load_artifact(zs_run)
    order = list(reversed(art.class_names))  # the data lists the classes in another order
    model, source = create_model(ModelConfig(weights=str(zs_run)), len(order), None, order)
    assert source == f"run:{zs_run}" and model.artifact_kind == "zeroshot"
    assert torch.equal(model.get_classifier().weight, zs.get_classifier().weight.flip(0))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), zs(x).flip(1), atol=1e-6)
    with pytest.raises(ImgclfError, match="no text embedding for class.*--add-class"):
        create_model(ModelConfig(weights=str(zs_run)), 4, None, [*order, "zebra"])


@pytest.mark.slow
def test_fine_tuning_from_a_zero_shot_run_then_wise_ft(zs_run, folder, tmp_path):
    from imgclf.artifact import load_artifact, read_artifact

    r = run_cli("train", "--data", folder, "--weights", zs_run, "--output", tmp_path, "--name", "ft", *_FT)
    assert r.code == 0, r
    ft_dir = tmp_path / "ft"
    ft, art = load_artifact(ft_dir)
    assert art.kind == "zeroshot" and art.arch == "open_clip:tiny-vit" and (ft_dir / "text.safetensors").is_file()
    assert art.extra["zeroshot"]["fine_tuned_from"] == str(zs_run.resolve())
    zs, zs_art = load_artifact(zs_run)
    assert art.class_names == zs_art.class_names  # the folder's order, the same names
    assert not torch.equal(ft.get_classifier().weight, zs.get_classifier().weight)  # trained
    top1 = art.metrics["val"]["top1"]
    assert top1 >= 0.5, art.metrics["val"]  # 3 separable colours; the random tiny CLIP's zero-shot is chance

    # a fine-tuned run renames by relabelling its trained row; a text row for a new class would not fit its tower
    first = art.class_names[0]
    row = ft.get_classifier().weight[0].clone()
    assert run_cli("zeroshot", str(ft_dir), "--rename", f"{first}=renamed", *FAST).code == 0
    renamed, rart = load_artifact(ft_dir)
    assert rart.class_names[0] == "renamed" and torch.equal(renamed.get_classifier().weight[0], row)
    assert run_cli("zeroshot", str(ft_dir), "--rename", f"renamed={first}", *FAST).code == 0
    bad = run_cli("zeroshot", str(ft_dir), "--add-class", "purple", *FAST)
    assert bad.code == 2 and "image tower was fine-tuned" in bad.err
    assert "purple" not in read_artifact(ft_dir).class_names
    probe = run_cli("train", "--data", folder, "--weights", zs_run, "--strategy", "probe", "--output", tmp_path, *_FT)
    assert probe.code == 2 and "probe strategy fits a new linear head" in probe.err

    ft, _ = load_artifact(ft_dir)
    zs_state, ft_state = zs.state_dict(), ft.state_dict()
    for alpha in (0.0, 1.0, 0.5):
        out = tmp_path / f"wise{alpha:g}"
        r = run_cli("wise-ft", str(ft_dir), "--alpha", str(alpha), "--out", out, "--eval", folder, *FAST)
        assert r.code == 0, r
        wise, wart = load_artifact(out)
        assert wart.kind == "zeroshot" and wart.metrics["wise_ft"]["alpha"] == alpha and not wart.calibration
        for k, v in wise.state_dict().items():
            if v.is_floating_point() and v.numel():
                want = torch.lerp(zs_state[k], ft_state[k], alpha)
                assert torch.allclose(v, want, atol=1e-6, rtol=0), (alpha, k)
    assert "top1" in r.out or "%" in r.out
    bad = run_cli("wise-ft", str(ft_dir), "--alpha", "1.5", "--out", tmp_path / "w", *FAST)
    assert bad.code == 2 and "alpha must be in [0, 1]" in bad.err and len(bad.err.strip().splitlines()) == 1
