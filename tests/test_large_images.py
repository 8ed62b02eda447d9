"""The large-image data path: JPEG draft decoding against the full decode, the decoded-image cache (identical
tensors, hits, bad files, workers, space), worker defaults per rank, torch.compile and the bf16 rule."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.config import AugmentConfig, build_config
from imgclf.data.cache import CachedSamples, large_image_samples
from imgclf.data.images import DecodePolicy, decode_image, draft_jpeg, open_image
from imgclf.data.loader import ImageDataset, Skipped, auto_workers
from imgclf.data.preprocess import Preprocess
from imgclf.data.sources import open_source
from imgclf.errors import ImgclfError

skimage_data = pytest.importorskip("skimage.data")

#: pixel units out of the transforms (mean 0, std 1/255), so differences read as 0-255 levels
PRE = Preprocess((3, 224, 224), "bicubic", (0.0,) * 3, (1 / 255,) * 3, 0.875)


def _jpeg(a: np.ndarray, orientation: int | None = None, quality: int = 92) -> bytes:
    buf, kw = io.BytesIO(), {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(a).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _retina() -> np.ndarray:
    return skimage_data.retina()[:1000, :1408]  # a real 1408 x 1000 photograph (sides divisible by 8)


#: name -> (JPEG bytes, stored-orientation array): plain, and the same picture stored rotated with EXIF 6 / 8
PHOTOS = {
    "retina": lambda: _jpeg(_retina()),
    "retina-exif6": lambda: _jpeg(np.ascontiguousarray(np.rot90(_retina(), 1)), orientation=6),
    "retina-exif8": lambda: _jpeg(np.ascontiguousarray(np.rot90(_retina(), -1)), orientation=8),
    "hubble": lambda: _jpeg(skimage_data.hubble_deep_field()),  # 1000 x 872
    "astronaut": lambda: _jpeg(skimage_data.astronaut()),  # 512 x 512, sharp edges: the hardest case here
}


def _crops(full: Image.Image, drafted: Image.Image, scale: int, n: int = 30, seed: int = 0):
    """Pairs of 224 px training crops of the same region: from the full decode and from the drafted decode
    (integer boxes at the drafted scale, as RandomResizedCrop draws them; each at least 224 px, as the draft
    rule guarantees), plus the full decode's crop resized bilinearly (the reference difference)."""
    rng = random.Random(seed)
    for _ in range(n):
        w, h = rng.randint(224, min(drafted.size) - 1), rng.randint(224, min(drafted.size) - 1)
        x, y = rng.randint(0, drafted.size[0] - w), rng.randint(0, drafted.size[1] - h)
        box = (x * scale, y * scale, (x + w) * scale, (y + h) * scale)
        a = np.asarray(full.resize((224, 224), Image.BICUBIC, box=box), dtype=np.float64)
        b = np.asarray(drafted.resize((224, 224), Image.BICUBIC, box=(x, y, x + w, y + h)), dtype=np.float64)
        c = np.asarray(full.resize((224, 224), Image.BILINEAR, box=box), dtype=np.float64)
        yield a, b, c


@pytest.mark.parametrize("name", list(PHOTOS))
def test_draft_decode_matches_the_full_decode_within_tolerance(name):
    """Measured (Pillow 13, libjpeg-turbo; 0-255 levels over 30 crops of 224 px): mean |draft - full| 0.54
    (retina, 1/4, any EXIF orientation), 0.81 (hubble, 1/2), 1.46 (astronaut, 1/2), p99 3-13; bilinear instead
    of bicubic on the same full decode differs by 0.38, 1.09, 1.37 (p99 3-11): the draft changes a crop about
    as much as the choice between two standard resize filters."""
    data = PHOTOS[name]()
    full = decode_image(data)
    drafted = decode_image(data, policy=DecodePolicy(draft=(224, 224)))
    scale = full.size[0] // drafted.size[0]
    assert scale >= 2 and drafted.size == (full.size[0] // scale, full.size[1] // scale)  # displayed orientation
    err, ref = [], []
    for a, b, c in _crops(full, drafted, scale):
        err.append(np.abs(a - b))
        ref.append(np.abs(a - c).mean())
    err = np.stack(err)
    assert err.mean() <= 1.6, err.mean()
    assert np.percentile(err, 99) <= 14
    assert err.mean() <= 1.5 * np.mean(ref), (err.mean(), np.mean(ref))
    assert err.mean(axis=(1, 2, 3)).max() <= 2.0  # no crop is much worse (a wrong orientation would be ~30)


def test_draft_is_refused_where_it_would_change_geometry_or_resolution(tmp_path):
    """Full decodes (bit-identical): too small for 2x, not a JPEG, and a rotated JPEG whose sides are not
    multiples of the scale (its partial block row would land at the top and shift every pixel)."""
    a = skimage_data.retina()[:1001, :1411]
    cases = {
        "small.jpg": (_jpeg(skimage_data.astronaut()), (300, 300)),
        "photo.png": (None, (100, 100)),
        "odd-rotated.jpg": (_jpeg(np.ascontiguousarray(np.rot90(a, 1)), orientation=6), (224, 224)),
    }
    Image.fromarray(a).save(tmp_path / "photo.png")
    for name, (data, need) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with Image.open(tmp_path / name) as img:
            assert draft_jpeg(img, need) == 1, name
        full = np.asarray(open_image(tmp_path / name))
        drafted = np.asarray(open_image(tmp_path / name, DecodePolicy(draft=need)))
        assert np.array_equal(full, drafted), name
    odd = open_image(tmp_path / "odd-rotated.jpg", DecodePolicy(draft=(224, 224)))  # not rotated: allowed
    Image.fromarray(a).save(tmp_path / "odd.jpg", quality=92)
    assert open_image(tmp_path / "odd.jpg", DecodePolicy(draft=(224, 224))).size == (353, 251)  # 1/4, rounded up
    assert odd.size == (1411, 1001)


def test_training_draft_applies_only_to_training_loaders(tmp_path):
    cfg = build_config([{"data": {"path": str(tmp_path)}}], ["test"])
    folder = _photo_folder(tmp_path / "d")
    s = open_source(folder)
    train = large_image_samples(s, PRE, cfg.data, cfg.aug)
    assert train.decode.draft == (915, 915)  # PRE.needed_side(aug): the smallest crop keeps 224 px
    assert large_image_samples(s, PRE, cfg.data).decode.draft is None  # evaluation decodes in full
    cfg.data.cache_side = 256  # a cache setting: without a cache the draft keeps the lossless side
    assert large_image_samples(s, PRE, cfg.data, cfg.aug).decode.draft == (915, 915)
    cfg.data.jpeg_draft = False
    assert large_image_samples(s, PRE, cfg.data, cfg.aug).decode.draft is None
    assert PRE.needed_side(AugmentConfig(scale=(0.5, 1.0))) == 366


# ------------------------------------------------------------------------------------------- decoded cache


def _photo_folder(root: Path) -> Path:
    """Two classes of JPEGs cut from scikit-image photos (60-140 px, one EXIF-rotated), a PNG with alpha and
    a corrupt file."""
    rng = np.random.default_rng(0)
    for c, photo in enumerate([skimage_data.coffee(), skimage_data.chelsea()]):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(6):
            h, w = int(rng.integers(60, 141)), int(rng.integers(60, 141))
            y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
            crop = np.ascontiguousarray(photo[y : y + h, x : x + w])
            (d / f"im_{i}.jpg").write_bytes(_jpeg(crop, orientation=6 if i == 0 else None))
    rgba = np.dstack([skimage_data.astronaut()[:90, :70], np.full((90, 70), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "class_0" / "alpha.png")
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _tensors(ds: ImageDataset) -> list:
    out = []
    for i in range(len(ds)):
        random.seed(i)
        torch.manual_seed(i)
        item = ds[i]
        out.append(item.reason if isinstance(item, Skipped) else item[0])
    return out


def _same(a: list, b: list) -> bool:
    return all(type(x) is type(y) and (x == y if isinstance(x, str) else torch.equal(x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_cached_tensors_are_identical_to_uncached_ones(tmp_path, mode):
    """Eval view: bit-identical always; training view: identical for pictures under the cache side (the default
    side keeps them as decoded). The broken file is reported with the same reason."""
    folder = _photo_folder(tmp_path / "d")
    cfg = build_config([{"data": {"path": str(folder), "cache": mode, "cache_dir": str(tmp_path / "c")}}], ["t"])
    pre = Preprocess((3, 32, 32), "bicubic", (0.5,) * 3, (0.25,) * 3, 0.875)
    s = open_source(folder)
    for aug, tf in ((None, pre.eval()), (cfg.aug, pre.train(cfg.aug))):
        rng = torch.get_rng_state(), random.getstate()
        cached = large_image_samples(s, pre, cfg.data, aug)
        assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()  # the run's draws unchanged
        assert isinstance(cached, CachedSamples)
        plain = _tensors(ImageDataset(s, tf))
        assert _same(plain, _tensors(ImageDataset(cached, tf)))
        assert sum(isinstance(x, str) for x in plain) == 1
    if mode == "disk":  # a second run finds the caches: same tensors, nothing decoded
        dirs = sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir())
        assert len(dirs) == 2
        again = large_image_samples(s, pre, cfg.data)
        assert _same(_tensors(ImageDataset(again, pre.eval())), _tensors(ImageDataset(s, pre.eval())))
        assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == dirs


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
def test_cached_evaluation_is_bit_identical_in_every_crop_mode(tmp_path, crop_mode):
    folder = _photo_folder(tmp_path / "d")
    cfg = build_config([{"data": {"path": str(folder), "cache": "memory"}}], ["t"])
    pre = Preprocess((3, 40, 40), "bilinear", (0.5,) * 3, (0.25,) * 3, 0.9, crop_mode)
    s = open_source(folder)
    cached = ImageDataset(large_image_samples(s, pre, cfg.data), pre.eval())
    assert _same(_tensors(ImageDataset(s, pre.eval())), _tensors(cached))


def test_cache_side_resizes_training_pictures_and_the_key_follows_the_files(tmp_path):
    folder = _photo_folder(tmp_path / "d")
    over = {"cache": "disk", "cache_dir": str(tmp_path / "c"), "cache_side": 48}
    cfg = build_config([{"data": {"path": str(folder), **over}}], ["t"])
    pre = Preprocess((3, 32, 32), "bicubic", (0.5,) * 3, (0.25,) * 3, 0.875)
    s = open_source(folder)
    cached = large_image_samples(s, pre, cfg.data, cfg.aug)
    sizes = [cached.load(i).size for i in range(len(s)) if i not in cached.cache.bad]
    assert all(min(sz) == 48 for sz in sizes)
    full = open_image(s.items[0])  # the EXIF-rotated one: the cached picture keeps its displayed orientation
    assert (cached.load(0).size[0] > cached.load(0).size[1]) == (full.size[0] > full.size[1])
    time.sleep(0.01)
    Image.new("RGB", (90, 90), "red").save(s.items[1], "JPEG")  # a rewritten file: a new key, a new cache
    again = large_image_samples(open_source(folder), pre, cfg.data, cfg.aug)
    assert again.cache.path != cached.cache.path
    assert np.asarray(again.load(1))[..., 0].mean() > 200


def test_cache_is_read_by_spawned_workers(tmp_path):
    """A memory cache is one shared-memory tensor and a disk cache a path, so a spawned loader worker gets the
    pictures without copies or pickled pixels, and its batches equal the main process's."""
    folder = _photo_folder(tmp_path / "d")
    pre = Preprocess((3, 32, 32), "bicubic", (0.5,) * 3, (0.25,) * 3, 0.875)
    s = open_source(folder)
    s = s.subset([i for i in range(len(s)) if not s.items[i].endswith("broken.jpg")])
    parts = []
    for mode in ("memory", "disk"):
        cfg = build_config([{"data": {"path": str(folder), "cache": mode, "cache_dir": str(tmp_path / "c")}}], ["t"])
        parts.append(ImageDataset(large_image_samples(s, pre, cfg.data), pre.eval()))
    ds = torch.utils.data.ConcatDataset(parts)  # one spawned worker reads both
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    got = torch.cat([b[0] for b in loader])
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(len(ds))]))


def test_a_cache_that_does_not_fit_is_refused_before_decoding(tmp_path, monkeypatch):
    import imgclf.data.cache as cache_mod

    folder = _photo_folder(tmp_path / "d")
    cfg = build_config([{"data": {"path": str(folder), "cache": "memory"}}], ["t"])
    monkeypatch.setattr(cache_mod, "_available_memory", lambda: 10_000)
    monkeypatch.setattr(cache_mod, "_build", lambda *a: pytest.fail("decoded before checking the space"))
    with pytest.raises(ImgclfError, match=r"data.cache memory: the decoded images need about .* GiB.*cache_side"):
        large_image_samples(open_source(folder), PRE, cfg.data, cfg.aug)


# ------------------------------------------------------------------------------------------- workers, compile


def test_auto_workers_share_the_cores_among_the_ranks_of_a_node(monkeypatch):
    import imgclf.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_workers(-1) == 8 and auto_workers(3) == 3
    for ranks, workers in ((2, 7), (4, 3), (8, 1), (16, 0)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert auto_workers(-1) == workers
    monkeypatch.setattr(loader_mod, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert auto_workers(-1) == 1


def test_compile_unavailable_is_one_clear_error(monkeypatch):
    from imgclf.dist import compile_module

    def broken(*a, **k):
        raise RuntimeError("Compiler: cc is not found.\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ImgclfError, match=r"train.compile: torch.compile does not work .*cc is not found.*false"):
        compile_module(torch.nn.Linear(2, 2), torch.device("cpu"))


@pytest.mark.cli
def test_compiled_training_keeps_state_dict_keys_and_numbers(tmp_path):
    """``train.compile``: the same state_dict keys (no ``_orig_mod.``) in the model, its EMA and the training
    wrapper, and the same loss and gradients as the eager step."""
    from imgclf.dist import Dist
    from imgclf.models.factory import create_model
    from imgclf.train.loop import forward_loss
    from imgclf.train.trainer import build_loop

    cfg = build_config([{"model": {"name": "test_efficientnet", "weights": "none"}, "data": {"input_size": 32},
                         "train": {"ema": True}}], ["t"])  # fmt: skip
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    runs = {}
    for compiled in (False, True):
        cfg.train.compile = compiled
        torch.manual_seed(0)
        model, _ = create_model(cfg.model, 3, 32)
        loop = build_loop(cfg, Dist(torch.device("cpu")), model, 10, 3)
        loss = forward_loss(loop, x.contiguous(memory_format=loop.fmt), y)
        loss.backward()
        grads = [p.grad.clone() for p in loop.model.parameters() if p.grad is not None]
        keys = (list(loop.model.state_dict()), list(loop.ema.module.state_dict()), list(loop.wrapped.state_dict()))
        runs[compiled] = (loss.item(), grads, keys)
    assert runs[True][2] == runs[False][2]
    assert not any("_orig_mod" in k for k in runs[True][2][2])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    g_compiled, g_eager = (torch.cat([g.flatten() for g in runs[c][1]]) for c in (True, False))
    assert ((g_compiled - g_eager).norm() / g_eager.norm()).item() < 1e-4  # fused kernels reorder float sums


def test_auto_precision_on_cpu_is_bf16_only_with_amx_and_no_depthwise_convolutions(monkeypatch):
    """Measured here (dist.py): bf16 autocast 1.5-2.7x faster than fp32 for ResNets, RegNets and ViTs on AMX,
    no faster or slower for EfficientNet-Lite0, MobileNetV3 and ConvNeXt (depthwise convolutions)."""
    import timm

    import imgclf.dist as dist_mod
    from imgclf.dist import amp_dtype

    cpu = torch.device("cpu")
    dense = timm.create_model("test_resnet", num_classes=3)  # no depthwise convolution
    depthwise = timm.create_model("test_efficientnet", num_classes=3)
    monkeypatch.setattr(dist_mod, "cpu_has_amx_bf16", lambda: True)
    assert amp_dtype("auto", cpu, dense) is torch.bfloat16
    assert amp_dtype("auto", cpu, depthwise) is None
    assert amp_dtype("auto", cpu) is None and amp_dtype("none", cpu, dense) is None
    monkeypatch.setattr(dist_mod, "cpu_has_amx_bf16", lambda: False)
    assert amp_dtype("auto", cpu, dense) is None
    assert amp_dtype("bf16", cpu, depthwise) is torch.bfloat16  # asked for: always given
