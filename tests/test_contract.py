"""Contract tests (DESIGN.md, first test tier): every timm ``test_*`` architecture and every weight source imgclf
supports, checked for what the later stages rely on.

Models (parametrized by ``list_models("test_*")``, so a test model added by a timm release is covered without
editing this file): ``forward`` gives (N, K) logits; ``forward_features`` + ``forward_head(pre_logits=True)`` (the
split ``imgclf.models.inference.forward_both`` runs) gives an (N, D) embedding that the classifier maps to those
same logits; the embedding width is the one imgclf sizes embeddings by; ``save_artifact`` -> ``load_artifact``
reproduces the logits bit for bit; the resolved preprocessing is complete.

Weight sources (``ModelConfig.weights``): ``none`` (seeded random init), a local ``.safetensors`` FILE (backbone
from the file, a head of another size replaced and zeroed), ``packaged`` (ImageNet EfficientNet-Lite0/1/2 from pip
packages), ``auto`` (packaged when installed for the architecture, else hub; never a silent random init) and
``hub`` (offline here: one-line ``ImgclfError``, fast, no traceback).
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from imgclf.artifact import META_FILE, Artifact, load_artifact, read_artifact, save_artifact
from imgclf.config import DataConfig, ModelConfig
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ImgclfError
from imgclf.models.factory import create_model, list_models, resolve_weights
from imgclf.models.inference import forward_both
from imgclf.models.knn import KNNClassifier
from imgclf.models.weights import PACKAGED, PACKAGED_PIP, packaged_weights_file, read_state_dict

from .conftest import make_folder, run_cli

pytestmark = pytest.mark.contract

#: timm's tiny test architectures (random init, 160 px, well under a second each on a CPU)
TEST_MODELS = list_models("test_*")
K = 3  # classes of the new head
N = 2  # images per batch

#: imgclf bugs a model exposes, with the strict xfail that documents them (an XPASS means: fixed, drop the entry).
#: Fixed: embeddings were sized by num_features, not timm's head_hidden_size (test_mambaout, mobilenetv3, ...).
KNOWN_BUGS: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models on two images gain nothing from more, and on a shared 2-core machine two
    spinning OpenMP threads per process made each forward 30-50x slower (1.7 s instead of 0.04 s for test_maxvit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models_with(known: dict[str, str]) -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=(ImgclfError, AssertionError), reason=known[n]))
        if n in known
        else n
        for n in TEST_MODELS
    ]


def fresh(name: str, weights: str = "none", num_classes: int = K, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """``create_model`` under a fixed seed (the trainer seeds before it builds the model)."""
    torch.manual_seed(seed)
    return create_model(ModelConfig(name=name, weights=weights), num_classes=num_classes)


def images(model: torch.nn.Module, n: int = N) -> torch.Tensor:
    """A seeded batch at the input size imgclf resolves for the model."""
    c, h, w = Preprocess.from_model(model).input_size
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def head_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict name: tensor}`` of the classifier's parameters (``get_classifier()``, what imgclf replaces)."""
    ids = {id(p) for p in model.get_classifier().parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def test_every_timm_test_model_is_listed():
    assert TEST_MODELS == timm.list_models("test_*")
    assert {"test_vit", "test_efficientnet", "test_resnet", "test_convnext", "test_mambaout"} <= set(TEST_MODELS)


# --------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_gives_logits_and_the_head_maps_the_embedding_to_them(name):
    model, source = fresh(name)
    model.eval()
    assert source == "random init" and model.num_classes == K
    x = images(model)
    with torch.no_grad():
        logits = model(x)
        split_logits, emb = forward_both(model, x, logits=True, features=True)
        head = model.get_classifier()
        from_head = head(emb)
    assert logits.shape == (N, K) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.allclose(split_logits, logits, atol=1e-5)  # forward == forward_head(forward_features(x))
    assert emb.ndim == 2 and emb.shape[0] == N and torch.isfinite(emb).all()
    assert emb.shape[1] == getattr(model, "head_hidden_size", model.num_features)  # timm's pre-logits width
    # the probe folds a Linear(head.in_features, K) onto these features and zero_head zeroes this layer
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (emb.shape[1], K)
    assert torch.allclose(from_head, logits, atol=1e-5)
    assert logits.std() > 0 and not torch.allclose(logits[0], logits[1])  # the images are told apart


@pytest.mark.parametrize("name", _models_with(KNOWN_BUGS))
def test_embedding_width_is_the_one_imgclf_sizes_embeddings_by(name):
    """The k-NN index is the stage that takes embeddings as they are: one support image per class must be its own
    nearest neighbour, and the index must record the width it was given."""
    model, _ = fresh(name)
    model.eval()
    x = images(model, n=K)
    with torch.no_grad():
        _, emb = forward_both(model, x, logits=False, features=True)
        clf = KNNClassifier(model, emb, torch.arange(K), K, k=1).eval()
        out = clf(x)
    assert clf.num_features == emb.shape[1]
    assert out.shape == (K, K) and out.argmax(1).tolist() == list(range(K))
    assert torch.allclose(out.exp().sum(1), torch.ones(K), atol=1e-5)  # log-probabilities


@pytest.mark.parametrize("name", TEST_MODELS)
def test_artifact_round_trip_gives_bit_identical_logits_and_embeddings(name, tmp_path):
    model, _ = fresh(name)
    model.eval()
    pre = Preprocess.from_model(model, DataConfig())
    names = ["ant", "bee", "cow"]
    run = save_artifact(tmp_path / "run", model, Artifact(arch=name, class_names=names, preprocessing=pre))
    loaded, art = load_artifact(run)
    assert not loaded.training and art.arch == name and art.class_names == names and art.num_classes == K
    assert read_artifact(run).num_classes == K
    doc = json.loads((run / META_FILE).read_text())
    assert doc["preprocessing"]["input_size"] == list(pre.input_size)
    assert doc["preprocessing"]["mean"] == list(pre.mean)
    x = images(model)
    with torch.no_grad():
        ref_logits, ref_emb = forward_both(model, x, logits=True, features=True)
        got_logits, got_emb = forward_both(loaded, x, logits=True, features=True)
    assert torch.equal(got_logits, ref_logits) and torch.equal(got_emb, ref_emb)
    assert type(loaded) is type(model)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_resolved_preprocessing_is_complete_and_overridable(name):
    model, _ = fresh(name)
    pre = Preprocess.from_model(model)
    c, h, w = pre.input_size
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert c == stem.in_channels == 3 and h > 0 and w > 0
    assert len(pre.mean) == len(pre.std) == c
    assert all(0 <= m <= 1 for m in pre.mean) and all(s > 0 for s in pre.std)
    assert 0 < pre.crop_pct <= 1
    assert pre.interpolation in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
    small = Preprocess.from_model(model, DataConfig(input_size=48, crop_pct=1.0, interpolation="bilinear"))
    assert tuple(small.input_size) == (c, 48, 48)
    assert (small.crop_pct, small.interpolation) == (1.0, "bilinear")
    assert list(small.mean) == list(pre.mean)  # overrides leave the normalisation alone


# --------------------------------------------------------------------------------------------- weight sources


@pytest.mark.parametrize("name", TEST_MODELS)
def test_none_is_a_seeded_random_init_with_timm_s_head(name):
    a, source = fresh(name, seed=0)
    b, _ = fresh(name, seed=0)
    c, _ = fresh(name, seed=1)
    assert source == "random init"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())  # really random
    assert any(torch.count_nonzero(p) for p in head_params(a).values())  # only pretrained weights get a zero head


@pytest.mark.parametrize("file_classes", [K + 2, K], ids=["other-head", "same-head"])
@pytest.mark.parametrize("name", TEST_MODELS)
def test_a_local_safetensors_file_gives_its_backbone_and_a_head_as_documented(name, file_classes, tmp_path):
    """README: a local file's tensors are loaded; a head of another size is replaced (and, as with every pretrained
    source, starts at zero); a head of the same size is kept."""
    src, _ = fresh(name, num_classes=file_classes, seed=1)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}, str(path))
    file = load_file(str(path))
    model, source = fresh(name, weights=str(path), seed=2)  # another seed: nothing can match by chance
    assert source == f"file:{path}"
    own, head = model.state_dict(), head_params(model)
    assert own.keys() == file.keys()
    resized = {k for k in file if own[k].shape != file[k].shape}
    assert resized == (set(head) if file_classes != K else set())  # only the classifier depends on the classes
    for k in own.keys() - resized:
        assert torch.equal(own[k], file[k]), f"{k} differs from the file"
    assert model.get_classifier().out_features == K
    if file_classes != K:
        assert all(torch.count_nonzero(p) == 0 for p in head.values()), "a replaced head starts at zero"


@pytest.mark.parametrize("arch", sorted(PACKAGED))
def test_packaged_weights_fill_the_whole_backbone_with_a_zero_head(arch):
    path = packaged_weights_file(arch)
    if path is None:
        pytest.skip(f"packaged weights for {arch} not installed (pip install {PACKAGED_PIP[arch]})")
    model, source = fresh(arch, weights="packaged")
    assert source == f"packaged:{path.name}"
    ref = read_state_dict(path)  # the package's own (lukemelas) names, mapped by hand here as in DESIGN.md
    own = model.state_dict()
    last = max(int(k.split(".")[1]) for k in ref if k.startswith("_blocks."))  # flat index of the last block
    stage, block = len(model.blocks) - 1, len(model.blocks[-1]) - 1
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_mean": "_bn0.running_mean",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        f"blocks.{stage}.{block}.conv_pwl.weight": f"_blocks.{last}._project_conv.weight",
        "conv_head.weight": "_conv_head.weight",
        "bn2.running_var": "_bn1.running_var",
    }
    for mine, theirs in pairs.items():
        assert torch.equal(own[mine], ref[theirs]), mine
    # every shipped backbone tensor found a home: same element count outside the ImageNet classifier
    shipped = sum(v.numel() for k, v in ref.items() if not k.startswith("_fc.") and "num_batches" not in k)
    held = sum(v.numel() for k, v in own.items() if not k.startswith("classifier.") and "num_batches" not in k)
    assert shipped == held
    head = model.get_classifier()
    assert head.out_features == K and torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0


def test_packaged_weights_without_their_package_name_it_and_auto_turns_to_the_hub(monkeypatch):
    arch = "tf_efficientnet_lite1"
    monkeypatch.setitem(sys.modules, PACKAGED[arch][0], None)  # importing it now fails, as when not installed
    assert packaged_weights_file(arch) is None
    with pytest.raises(ImgclfError, match=re.escape(f"need `pip install {PACKAGED_PIP[arch]}`")):
        create_model(ModelConfig(name=arch, weights="packaged"), num_classes=K)
    assert resolve_weights(ModelConfig(name=arch, weights="auto")) == "hub"
    with pytest.raises(ImgclfError, match="no packaged weights for 'test_resnet'"):
        create_model(ModelConfig(name="test_resnet", weights="packaged"), num_classes=K)


@pytest.mark.parametrize("arch", sorted(PACKAGED))
def test_auto_is_packaged_when_installed(arch):
    if packaged_weights_file(arch) is None:
        pytest.skip(f"packaged weights for {arch} not installed (pip install {PACKAGED_PIP[arch]})")
    assert resolve_weights(ModelConfig(name=arch, weights="auto")) == "packaged"
    auto, source = fresh(arch, weights="auto", seed=0)
    packaged, _ = fresh(arch, weights="packaged", seed=1)
    assert source.startswith("packaged:")
    a, p = auto.state_dict(), packaged.state_dict()
    assert all(torch.equal(a[k], p[k]) for k in a)  # the same weights, zero head included


@pytest.mark.parametrize("weights", ["none", "hub", "packaged", "some/file.safetensors"])
def test_explicit_sources_are_taken_as_given(weights):
    assert resolve_weights(ModelConfig(name="test_resnet", weights=weights)) == weights


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable at once: offline mode, also in huggingface_hub's constant (it reads the variable only when
    imported), so nothing here can reach for the network or wait in its retries (~45 s without it)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("weights", ["hub", "auto"])
@pytest.mark.parametrize("name", ["test_resnet", "hf-hub:timm/test_resnet.r160_in1k"])
def test_hub_offline_is_one_line_error_never_a_silent_random_init(name, weights, offline):
    t0 = time.perf_counter()
    with pytest.raises(ImgclfError) as err:
        create_model(ModelConfig(name=name, weights=weights), num_classes=K)
    msg = str(err.value)
    assert time.perf_counter() - t0 < 15
    assert "\n" not in msg
    assert msg.startswith(f"could not get pretrained weights for '{name}' from the hub (")
    assert msg.endswith("check the network, or use --weights none|packaged|FILE")


@pytest.mark.parametrize("weights", ["hub", "auto"])
def test_hub_offline_through_the_cli_is_exit_2_and_one_line(weights, offline, tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=3, classes=2)
    # an explicit input size: no data.input_size auto line before the error
    r = run_cli("train", "--data", data, "--model", "test_resnet", "--weights", weights, "--epochs", "1",
                "--output", tmp_path / "runs", "--name", "h", "--no-progress", "--data.num_workers", "0",
                "--input-size", "32")  # fmt: skip
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert r.code == 2 and len(lines) == 1, r  # one line, no traceback, no retry chatter
    assert lines[0].startswith("imgclf: error: could not get pretrained weights for 'test_resnet' from the hub"), r
    assert not (tmp_path / "runs" / "h").exists()  # refused before the run directory is made
