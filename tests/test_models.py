"""Contract tests over weight sources, plus the numeric proof that the packaged weights are real."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from imgclf.config import ModelConfig
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ImgclfError
from imgclf.models.factory import check_model_name, create_model
from imgclf.models.weights import PACKAGED, load_into, packaged_weights_file, read_state_dict

skimage_data = pytest.importorskip("skimage.data")

# ImageNet-1k indices
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0_imagenet():
    model, src = create_model(ModelConfig(name="tf_efficientnet_lite0", weights="packaged"), num_classes=1000)
    # keep the real ImageNet head: reload it, since a new head starts at zero
    load_into(model, read_state_dict(packaged_weights_file("tf_efficientnet_lite0")), "packaged")
    return model.eval(), src


def _top(model, photo: np.ndarray, k: int = 5) -> tuple[list[int], list[float]]:
    x = Preprocess.from_model(model).eval()(Image.fromarray(photo))[None]
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    v, i = p.topk(k)
    return i.tolist(), v.tolist()


def test_packaged_lite0_recognises_chelsea_and_coffee(lite0_imagenet):
    model, src = lite0_imagenet
    assert src.startswith("packaged:")
    cat_idx, _ = _top(model, skimage_data.chelsea())
    assert cat_idx[0] in CAT_CLASSES
    coffee_idx, coffee_p = _top(model, skimage_data.coffee())
    assert coffee_idx[0] == ESPRESSO and coffee_p[0] > 0.9


def test_packaged_lite0_numbers_match_stored_values(lite0_imagenet):
    """Numeric regression: top-3 of chelsea with probabilities measured when the mapping was written."""
    idx, p = _top(lite0_imagenet[0], skimage_data.chelsea(), k=3)
    assert idx == [282, 285, 281]  # tiger cat, Egyptian cat, tabby
    assert p == pytest.approx([0.393, 0.356, 0.170], abs=0.01)


@pytest.mark.parametrize("arch", sorted(PACKAGED))
def test_every_packaged_file_maps_strictly_onto_timm(arch):
    path = packaged_weights_file(arch)
    if path is None:
        pytest.skip(f"{arch} package not installed")
    model = timm.create_model(arch, num_classes=1000)
    state = read_state_dict(path)
    load_into(model, state, arch)  # raises on any missing/mismatched key
    own = model.state_dict()
    assert own["conv_stem.weight"].shape == state["_conv_stem.weight"].shape
    assert torch.equal(own["classifier.weight"], state["_fc.weight"])


def test_new_head_starts_at_zero_and_backbone_is_pretrained():
    model, _ = create_model(ModelConfig(name="tf_efficientnet_lite0", weights="packaged"), num_classes=4)
    assert model.num_classes == 4
    assert torch.count_nonzero(model.classifier.weight) == 0
    ref = read_state_dict(packaged_weights_file("tf_efficientnet_lite0"))
    assert torch.equal(model.conv_stem.weight, ref["_conv_stem.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weight_files_load_and_drop_a_mismatched_head(tmp_path, suffix):
    src = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / f"w{suffix}"
    state = {k: v.clone() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model, desc = create_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=3)
    assert desc == f"file:{path}"
    assert torch.equal(
        model.conv1[0].weight if isinstance(model.conv1, torch.nn.Sequential) else model.conv1.weight,
        (src.conv1[0] if isinstance(src.conv1, torch.nn.Sequential) else src.conv1).weight,
    )
    assert model.get_classifier().out_features == 3


def test_wrong_weight_file_is_a_clear_error(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({k: v.clone() for k, v in timm.create_model("test_vit").state_dict().items()}, str(other))
    with pytest.raises(ImgclfError, match="do not fit"):
        create_model(ModelConfig(name="test_resnet", weights=str(other)), num_classes=3)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ImgclfError, match="cannot read weights file"):
        create_model(ModelConfig(name="test_resnet", weights=str(junk)), num_classes=3)
    with pytest.raises(ImgclfError, match="not auto, packaged, hub, none"):
        create_model(ModelConfig(name="test_resnet", weights="nonsense"), num_classes=3)


def test_pickled_code_in_a_pth_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ImgclfError, match="cannot read weights file"):
        read_state_dict(path)


def test_unknown_model_suggests_names():
    with pytest.raises(ImgclfError, match="unknown model 'resnet181'; did you mean .*resnet18"):
        check_model_name("resnet181")


def test_no_packaged_weights_for_other_architectures():
    with pytest.raises(ImgclfError, match="no packaged weights for 'test_resnet'"):
        create_model(ModelConfig(name="test_resnet", weights="packaged"), num_classes=3)


def test_hub_failure_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImgclfError, match="could not get pretrained weights for 'test_resnet' from the hub"):
        create_model(ModelConfig(name="test_resnet", weights="hub"), num_classes=3)


def test_preprocessing_is_derived_from_the_model_and_overrides_apply():
    from imgclf.config import DataConfig

    model = timm.create_model("tf_efficientnet_lite0")
    pre = Preprocess.from_model(model)
    assert pre == Preprocess((3, 224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875, "center")
    pre2 = Preprocess.from_model(model, DataConfig(input_size=96, crop_pct=1.0))
    assert pre2.input_size == (3, 96, 96) and pre2.crop_pct == 1.0
    x = pre2.eval()(Image.new("RGB", (50, 30), (255, 255, 255)))
    assert x.shape == (3, 96, 96) and torch.allclose(x, torch.ones_like(x))  # white -> (1 - 0.5) / 0.5


def test_hub_path_with_a_local_file_standing_in_for_the_download(tmp_path, monkeypatch):
    """The real hub code path (timm pretrained=True); only the download is replaced by a local file."""
    src = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "hub_weights.safetensors"
    save_file({k: v.clone() for k, v in src.state_dict().items()}, str(path))
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = dict(file=str(path))
        return real_create(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline_create)
    model, desc = create_model(ModelConfig(name="test_resnet", weights="hub"), num_classes=4)
    assert desc == "hub:test_resnet" and model.get_classifier().out_features == 4
    assert torch.count_nonzero(model.get_classifier().weight) == 0  # new head, zeroed
    stem = next(n for n in src.state_dict() if n.endswith("weight"))
    assert torch.equal(model.state_dict()[stem], src.state_dict()[stem])
    same, _ = create_model(ModelConfig(name="test_resnet", weights="hub"), num_classes=1000)
    assert torch.equal(same.get_classifier().weight, src.get_classifier().weight)  # same classes: head kept


def test_hf_hub_names_are_accepted_and_need_hub_weights():
    check_model_name("hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ImgclfError, match="use --weights hub"):
        create_model(ModelConfig(name="hf-hub:timm/resnet18.a1_in1k", weights="none"), num_classes=3)


def test_unrecognised_efficientnet_keys_are_a_clear_error():
    state = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}
    with pytest.raises(ImgclfError, match="do not fit"):
        load_into(timm.create_model("tf_efficientnet_lite0"), state, "x.pth")


@pytest.mark.unit
@pytest.mark.parametrize("name, mean, size", [
    ("vit_small_patch14_dinov2.lvd142m", "imagenet", 518),  # DINOv2 (Oquab et al. 2023)
    ("vit_base_patch32_clip_224.openai", "clip", 224),  # CLIP's image tower (Radford et al. 2021)
    ("vit_base_patch16_siglip_224.webli", "half", 224),  # SigLIP's (Zhai et al. 2023)
    ("eva02_tiny_patch14_224.mim_in22k", "clip", 224),  # EVA-02 (Fang et al. 2023)
])  # fmt: skip
def test_foundation_backbones_through_timm_names_bring_their_own_preprocessing(name, mean, size):
    """Foundation backbones are timm names: the pretrained tag's normalisation and size reach the preprocessing (the
    weights need the hub; random init here), and --input-size rebuilds a fixed-size ViT for another size."""
    from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN

    from imgclf.config import DataConfig, ModelConfig
    from imgclf.data.preprocess import Preprocess
    from imgclf.models.factory import create_model

    want = {"imagenet": IMAGENET_DEFAULT_MEAN, "clip": OPENAI_CLIP_MEAN, "half": (0.5, 0.5, 0.5)}[mean]
    model, source = create_model(ModelConfig(name=name, weights="none"), 3)
    pre = Preprocess.from_model(model)
    assert source == "random init" and pre.input_size == (3, size, size)
    assert pre.mean == pytest.approx(want) and pre.interpolation == "bicubic"
    if size != 224:  # DINOv2's 518 px default: a 224 px model when asked (position embeddings resampled on load)
        small, _ = create_model(ModelConfig(name=name, weights="none"), 3, 224)
        assert Preprocess.from_model(small, DataConfig(input_size=224)).input_size == (3, 224, 224)
        with torch.no_grad():
            assert small.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 3)
