"""Unit: data sources, image decoding, splits and class-name handling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgclf.config import Config
from imgclf.data.images import BadImage, DecodePolicy, open_image
from imgclf.data.sources import open_source, read_npz, scan_inputs, stratified_split
from imgclf.data.splits import prepare_data
from imgclf.errors import ImgclfError

from .conftest import make_folder


def test_image_folder_sorted_classes_nested_files_and_hidden_ignored(tmp_path):
    root = make_folder(tmp_path / "d", n_per_class=4, classes=3, nested=True)
    (root / "class_1" / ".DS_Store").write_text("x")
    (root / ".cache").mkdir()
    s = open_source(root)
    assert s.class_names == ["class_0", "class_1", "class_2"]
    assert list(s.class_counts()) == [4, 4, 4]
    assert any("/nested/" in p for p in s.items)
    assert not any(".DS_Store" in p for p in s.items)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ImgclfError, match="data path not found"):
        open_source(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ImgclfError, match="no class sub-folders"):
        open_source(tmp_path / "flat")
    root = make_folder(tmp_path / "e", n_per_class=2, classes=2)
    (root / "empty_class").mkdir()
    with pytest.raises(ImgclfError, match=r"empty_class: class folder is empty"):
        open_source(root)


def test_one_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "one", n_per_class=4, classes=1)
    cfg = Config()
    cfg.data.path = str(root)
    with pytest.raises(ImgclfError, match="only one class"):
        prepare_data(cfg)


def test_csv_relative_paths_and_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=2, classes=2)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label\nimgs/class_0/img_000.png,cat\nimgs/class_1/img_000.png,dog\nimgs/class_1/img_001.png,dog\n"
    )
    s = open_source(csv)
    assert s.class_names == ["cat", "dog"] and list(s.labels) == [0, 1, 1]
    assert s.items[0] == str(root / "class_0" / "img_000.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    with pytest.raises(ImgclfError, match="missing column 'path'.*found: file, label"):
        open_source(bad)
    gone = tmp_path / "gone.csv"
    gone.write_text("path,label\nimgs/class_0/img_000.png,a\nnope.png,b\n")
    with pytest.raises(ImgclfError, match=r"1 listed file\(s\) do not exist, e.g. row 3: nope.png"):
        open_source(gone)


def test_csv_numeric_labels_sort_numerically(tmp_path):
    make_folder(tmp_path / "imgs", n_per_class=1, classes=3)
    csv = tmp_path / "l.csv"
    rows = [f"imgs/class_{i}/img_000.png,{lab}" for i, lab in enumerate(["10", "9", "2"])]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    assert open_source(csv).class_names == ["2", "9", "10"]


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "a.npz"
    np.savez(p, images=rng.integers(0, 255, (6, 3, 10, 12), dtype=np.uint8), labels=np.array(["b", "a"] * 3))
    s = open_source(p)
    assert s.class_names == ["a", "b"] and s.arrays.shape == (6, 10, 12, 3)  # NCHW -> NHWC
    assert s.load(0).size == (12, 10) and s.load(0).mode == "RGB"
    q = tmp_path / "split.npz"
    np.savez(
        q,
        train_images=np.zeros((4, 8, 8), np.uint8),
        train_labels=np.array([0, 1, 0, 1]),
        class_names=np.array(["x", "y"]),
    )
    assert read_npz(q, "train").class_names == ["x", "y"]
    with pytest.raises(ImgclfError, match="missing array 'test_images'"):
        read_npz(q, "test")


def test_builtin_fashion_mnist_is_stratified_and_complete():
    tr = open_source("builtin:fashion-mnist")
    te = open_source("builtin:fashion-mnist:test")
    assert len(tr) == 5000 and len(te) == 1000
    assert list(tr.class_counts()) == [500] * 10 and list(te.class_counts()) == [100] * 10
    assert tr.class_names[0] == "T-shirt/top" and tr.class_names[9] == "Ankle boot"
    img = tr.load(0)
    assert img.mode == "RGB" and img.size == (28, 28)


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 20, 2])
    tr, va = stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    assert list(np.bincount(labels[va])) == [10, 5, 2, 1]
    tr2, va2 = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(va, va2)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    img = Image.new("RGB", (9, 7), (200, 100, 50)).convert(mode)
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (9, 7)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = open_image(path)
    assert out.size == (20, 40)  # width and height swapped
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left band is now on top


def test_bad_files_raise_badimage_with_reason(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    for path, why in [(tmp_path / "notes.txt", "not an image"), (trunc, "corrupt or truncated")]:
        with pytest.raises(BadImage) as e:
            open_image(path)
        assert why in e.value.reason


def test_the_pixel_limit_is_the_callers_not_pillows(tmp_path, monkeypatch):
    """Pillow's process-wide MAX_IMAGE_PIXELS neither caps nor loosens imgclf's per-call limit, and stays in
    force for everyone else's Image.open."""
    p = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 90,000 pixels: Pillow alone would raise (> 2 x 1000)
    assert open_image(p, DecodePolicy(max_pixels=100_000)).size == (300, 300)
    with pytest.raises(BadImage, match="over the limit of 50000") as e:
        open_image(p, DecodePolicy(max_pixels=50_000))
    assert e.value.too_large
    with pytest.raises(Image.DecompressionBombError):
        Image.open(p)


def test_scan_inputs_takes_files_folders_and_csv(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, classes=2)
    (root / "readme.txt").write_text("x")
    csv = tmp_path / "list.csv"
    csv.write_text("path\nf/class_0/img_000.png\n")
    s = scan_inputs([str(root), str(csv), str(root / "class_1" / "img_001.png")])
    assert len(s) == 4 + 1 + 1 + 1
    with pytest.raises(ImgclfError, match="input not found"):
        scan_inputs([str(tmp_path / "nope.png")])


def test_remap_to_matches_class_names_and_rejects_unknown(tmp_path):
    s = open_source(make_folder(tmp_path / "a", n_per_class=1, classes=3))
    r = s.remap_to(["class_2", "class_0", "class_1", "extra"])
    assert list(r.labels) == [1, 2, 0]
    with pytest.raises(ImgclfError, match="classes not known to the model: class_2"):
        s.remap_to(["class_0", "class_1"])


def test_corrupt_npz_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ImgclfError, match="cannot read .npz"):
        open_source(p)


def test_split_of_single_image_classes_is_an_error(tmp_path):
    root = make_folder(tmp_path / "single", n_per_class=1, classes=3)
    cfg = Config()
    cfg.data.path = str(root)
    with pytest.raises(ImgclfError, match="validation split is empty"):
        prepare_data(cfg)


def test_top5_metric_needs_more_than_five_classes(tmp_path):
    cfg = Config()
    cfg.data.path = str(make_folder(tmp_path / "f", n_per_class=2, classes=3))
    cfg.train.metric = "top5"
    with pytest.raises(ImgclfError, match="top5 needs more than 5 classes"):
        prepare_data(cfg)
