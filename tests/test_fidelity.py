"""Every image as a person sees it, every file found: bit depth, float pixels, transparency, symlinked folders,
Unicode class names, pixel and aspect limits, junk files and splits, half-made runs, ensembles by name.

Each case is a generated file with a plain twin (8-bit, opaque, NFC, a real folder) that must decode and
predict the same, through the decode and discovery layer that train, eval, predict, knn, explain and serve share.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.config import Config
from imgclf.data.images import BadImage, DecodePolicy, check_header, open_image, window
from imgclf.data.sources import open_source, read_image_folder, scan_inputs
from imgclf.data.splits import prepare_data
from imgclf.errors import ImgclfError

from .conftest import TINY, make_folder, make_image, run_cli
from .serving import Served, png

tifffile = pytest.importorskip("tifffile")  # ships with scikit-image (test extra)


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG of (H, W, C) uint16, C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA): Pillow cannot
    write 16-bit colour, so the chunks are written here (PNG spec: big-endian samples, filter 0 per row)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def colour_twins(img: Image.Image, stem: Path, rng: np.random.Generator) -> dict[str, Path]:
    """An 8-bit RGB picture and files that show exactly the same picture: 16-bit RGB PNG and TIFF, and RGBA
    whose white pixels are fully transparent with random hidden colours (over the default white background)."""
    a = np.asarray(img)
    out = {"8bit": stem.with_name(stem.name + "_8bit.png")}
    img.save(out["8bit"])
    out["rgb16_png"] = stem.with_name(stem.name + "_rgb16.png")
    png16(out["rgb16_png"], a.astype(np.uint16) * 257)
    out["rgb16_tif"] = stem.with_name(stem.name + "_rgb16.tif")
    tifffile.imwrite(out["rgb16_tif"], a.astype(np.uint16) * 257)
    white = (a == 255).all(-1)
    rgba = np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])
    rgba[white] = np.concatenate([rng.integers(0, 255, (int(white.sum()), 3)), np.zeros((int(white.sum()), 1))], 1)
    out["alpha"] = stem.with_name(stem.name + "_alpha.png")
    Image.fromarray(rgba, "RGBA").save(out["alpha"])
    return out


def grey_twins(a: np.ndarray, stem: Path) -> dict[str, Path]:
    """An 8-bit grey picture and its 16-bit PNG/TIFF, big-endian 16-bit TIFF, 32-bit int TIFF and float TIFF
    ([0, 1] and [0, 255]) twins."""
    p = {k: stem.with_name(f"{stem.name}_{k}") for k in
         ("8bit.png", "g16.png", "g16.tif", "g16be.tif", "i32.tif", "f01.tif", "f255.tif")}  # fmt: skip
    Image.fromarray(a, "L").save(p["8bit.png"])
    Image.fromarray(a.astype(np.uint16) * 257).save(p["g16.png"])  # mode I;16, as in the bug report
    tifffile.imwrite(p["g16.tif"], a.astype(np.uint16) * 257)
    tifffile.imwrite(p["g16be.tif"], (a.astype(np.uint16) * 257).astype(">u2"))
    tifffile.imwrite(p["i32.tif"], a.astype(np.int32) * 257)
    tifffile.imwrite(p["f01.tif"], a.astype(np.float32) / 255)
    tifffile.imwrite(p["f255.tif"], a.astype(np.float32))
    return p


@pytest.fixture(scope="module")
def grey():
    rng = np.random.default_rng(3)
    return (rng.random((20, 24)) * 256).astype(np.uint8)


def test_high_bit_depth_and_float_files_decode_like_their_8bit_twin(tmp_path, grey):
    files = grey_twins(grey, tmp_path / "x")
    modes = {k: Image.open(p).mode for k, p in files.items()}
    assert modes["g16.png"] == "I;16" and modes["i32.tif"] == "I" and modes["f01.tif"] == "F"
    ref = np.asarray(open_image(files["8bit.png"]))
    for k, p in files.items():
        got = np.asarray(open_image(p))
        assert got.shape == ref.shape and np.array_equal(got, ref), k  # Pillow's convert: white / black


def test_16bit_colour_and_alpha_files_decode_like_their_8bit_twin(tmp_path):
    img = make_image(1, np.random.default_rng(0))
    files = colour_twins(img, tmp_path / "x", np.random.default_rng(1))
    ref = np.asarray(open_image(files["8bit"]))
    for k, p in files.items():
        assert np.array_equal(np.asarray(open_image(p)), ref), k


def test_identical_looking_rgba_files_decode_identically_and_background_is_configurable(tmp_path):
    """Three RGBA files that differ only in the colour of fully transparent pixels."""
    outs = []
    for i, hidden in enumerate([(0, 0, 0), (255, 0, 0), (12, 200, 99)]):
        a = np.zeros((8, 8, 4), np.uint8)
        a[..., :3] = hidden
        a[2:6, 2:6] = (10, 20, 30, 255)  # the visible square
        a[0, 0] = (0, 0, 255, 128)  # half-transparent blue over the background
        Image.fromarray(a, "RGBA").save(tmp_path / f"{i}.png")
        outs.append(np.asarray(open_image(tmp_path / f"{i}.png")))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert tuple(outs[0][7, 7]) == (255, 255, 255) and tuple(outs[0][3, 3]) == (10, 20, 30)
    assert tuple(outs[0][0, 0]) == (127, 127, 255)  # alpha 128/255 blue over white
    black = np.asarray(open_image(tmp_path / "0.png", DecodePolicy(background=(0, 0, 0))))
    assert tuple(black[7, 7]) == (0, 0, 0) and tuple(black[0, 0]) == (0, 0, 128)


def test_palette_and_colour_key_transparency_are_composited(tmp_path):
    a = np.full((6, 6, 3), (200, 10, 10), np.uint8)
    a[:3] = (1, 2, 3)  # the transparent colour key
    Image.fromarray(a).save(tmp_path / "key.png", transparency=(1, 2, 3))
    out = np.asarray(open_image(tmp_path / "key.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[5, 5]) == (200, 10, 10)
    p = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    key = p.getpixel((0, 0))
    p.save(tmp_path / "pal.png", transparency=key)
    out = np.asarray(open_image(tmp_path / "pal.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[5, 5]) == (200, 10, 10)
    g16 = np.full((4, 4), 1000, np.uint16)
    g16[0] = 7  # the grey colour key of a 16-bit PNG
    Image.fromarray(g16).save(tmp_path / "g16key.png", transparency=7)
    out = np.asarray(open_image(tmp_path / "g16key.png", DecodePolicy(background=(0, 0, 0), pixel_range=(0, 1000))))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)


def test_windows_minmax_and_given_range(tmp_path):
    a = np.array([[100, 200], [300, 4095]], np.uint16)
    Image.fromarray(a).save(tmp_path / "w.png")
    auto = np.asarray(open_image(tmp_path / "w.png"))[..., 0]
    assert auto.tolist() == [[0, 1], [1, 16]]  # full 16-bit range: a 12-bit detector image looks dark, as it is
    mm = np.asarray(open_image(tmp_path / "w.png", DecodePolicy(pixel_range="minmax")))[..., 0]
    assert mm.tolist() == [[0, 6], [13, 255]]
    fixed = np.asarray(open_image(tmp_path / "w.png", DecodePolicy(pixel_range=(0, 4095))))[..., 0]
    assert fixed.tolist() == [[6, 12], [19, 255]]
    clipped = np.asarray(open_image(tmp_path / "w.png", DecodePolicy(pixel_range=(200, 300))))[..., 0]
    assert clipped.tolist() == [[0, 0], [255, 255]]
    assert window(np.array([0.0, 0.5, 1.0], np.float32)).tolist() == [0, 128, 255]


def test_ambiguous_float_and_nan_are_refused_with_the_fix(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0, 1000]], np.float32))
    with pytest.raises(BadImage, match=r"float pixels in \[0, 1000\].*data.pixel_range"):
        open_image(tmp_path / "f.tif")
    assert np.asarray(open_image(tmp_path / "f.tif", DecodePolicy(pixel_range="minmax")))[0, 1, 0] == 255
    tifffile.imwrite(tmp_path / "n.tif", np.array([[0, np.nan]], np.float32))
    with pytest.raises(BadImage, match="NaN"):
        open_image(tmp_path / "n.tif")
    rgb = np.zeros((4, 4, 3), np.uint16)
    png16(tmp_path / "c16.png", rgb)
    with pytest.raises(BadImage, match="16-bit colour image"):
        open_image(tmp_path / "c16.png", DecodePolicy(pixel_range=(0, 4095)))


def test_npz_arrays_of_every_type_give_the_same_images(tmp_path, grey):
    stack = np.stack([grey, 255 - grey])
    labels = np.array([0, 1])
    ref = open_source(_npz(tmp_path / "u8.npz", stack, labels))
    for name, arr in [("u16", stack.astype(np.uint16) * 257), ("f01", stack.astype(np.float32) / 255),
                      ("f255", stack.astype(np.float32)), ("f64", stack.astype(np.float64) / 255)]:  # fmt: skip
        s = open_source(_npz(tmp_path / f"{name}.npz", arr, labels))
        for i in range(2):
            assert np.array_equal(np.asarray(s.load(i)), np.asarray(ref.load(i))), name
    with pytest.raises(ImgclfError, match=r"'images'.*float pixels in \[300, 300\].*data.pixel_range"):
        open_source(_npz(tmp_path / "amb.npz", np.full((2, 4, 4), 300, np.float32), labels))
    s = open_source(tmp_path / "amb.npz", decode=DecodePolicy(pixel_range=(0, 600)))
    assert np.asarray(s.load(0))[0, 0, 0] == 128
    rgba = np.zeros((2, 4, 4, 4), np.uint8)  # fully transparent black -> the white background
    assert np.asarray(open_source(_npz(tmp_path / "rgba.npz", rgba, labels)).load(0))[0, 0].tolist() == [255] * 3


def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def _symlinked_tree(tmp_path: Path) -> Path:
    """sym/dog (5 images), sym/cat -> a folder of 5 elsewhere, sym/dog/more -> 5 more elsewhere, plus a link loop
    and a broken link."""
    rng = np.random.default_rng(0)
    real = tmp_path / "real"
    for name, n in (("cats", 5), ("more_dogs", 5)):
        (real / name).mkdir(parents=True)
        for i in range(n):
            make_image(0 if name == "cats" else 1, rng).save(real / name / f"{i}.png")
    sym = tmp_path / "sym"
    (sym / "dog").mkdir(parents=True)
    for i in range(5):
        make_image(1, rng).save(sym / "dog" / f"{i}.png")
    (sym / "cat").symlink_to(real / "cats", target_is_directory=True)
    (sym / "dog" / "more").symlink_to(real / "more_dogs", target_is_directory=True)
    (sym / "dog" / "loop").symlink_to(sym / "dog", target_is_directory=True)
    (sym / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    return sym


def test_symlinked_folders_are_followed_and_what_is_not_read_is_listed(tmp_path):
    sym = _symlinked_tree(tmp_path)
    s = read_image_folder(sym)
    assert s.class_names == ["cat", "dog"] and list(s.class_counts(usable=True)) == [5, 10]
    reasons = {Path(s.items[i]).name: why for i, why in s.bad.items()}
    assert set(reasons) == {"loop", "gone.png"}
    assert "symlink loop" in reasons["loop"] and "broken symlink" in reasons["gone.png"]
    p = scan_inputs([str(sym)])
    assert len(p) - len(p.bad) == 15 and len(p.bad) == 2
    cfg = Config()
    cfg.data.path = str(sym)
    sp = prepare_data(cfg)
    assert len(sp.train) + len(sp.val) == 17 and not set(sp.val.bad)  # unreadable entries stay out of val


def test_predict_lists_every_file_it_did_not_read(tiny_run, tmp_path):
    sym = _symlinked_tree(tmp_path)
    r = run_cli("predict", tiny_run, sym, "--format", "json", "--runtime", "torch", "--workers", "0", "--no-progress")
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert len(doc["predictions"]) == 15
    assert {Path(s["path"]).name for s in doc["skipped"]} == {"loop", "gone.png"}


def test_unicode_class_names_are_one_class_everywhere(tmp_path):
    cafe_nfc, cafe_nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert cafe_nfc != cafe_nfd
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name, cls in ((cafe_nfd, 0), ("thé", 1)):  # a folder made on macOS: NFD
        (root / name).mkdir(parents=True)
        for i in range(6):
            make_image(cls, rng).save(root / name / f"{i}.png")
    rows = ["path,label"] + [f"data/{cafe_nfd}/{i}.png,{cafe_nfc if i % 2 else cafe_nfd}" for i in range(6)]
    rows += [f"data/thé/{i}.png,thé" for i in range(6)]
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    s = open_source(csv)
    assert s.class_names == [cafe_nfc, "thé"] and list(s.class_counts()) == [6, 6]
    f = open_source(root)
    assert f.class_names == [cafe_nfc, "thé"]
    # a CSV typed in NFC naming files stored in NFD
    (tmp_path / "typed.csv").write_text(f"path,label\ndata/{cafe_nfc}/0.png,{cafe_nfc}\n", encoding="utf-8")
    assert Path(open_source(tmp_path / "typed.csv").items[0]).exists()
    r = run_cli("train", "--data", root, "--epochs", "1", "--output", tmp_path / "runs", "--name", "u", *TINY)
    assert r.code == 0, r
    art = json.loads((tmp_path / "runs" / "u" / "imgclf.json").read_text(encoding="utf-8"))
    assert art["class_names"] == [cafe_nfc, "thé"]
    r = run_cli("eval", tmp_path / "runs" / "u", "--data", csv, "--workers", "0", "--no-progress", "--format", "json")
    assert r.code == 0 and json.loads(r.out)["n"] == 12, r
    r = run_cli("explain", tmp_path / "runs" / "u", root / cafe_nfd / "0.png", "--target", cafe_nfd,
                "-o", tmp_path / "cam.png")  # fmt: skip
    assert r.code == 0 and r.out.startswith(cafe_nfc), r


def test_pixel_limit_and_aspect_guard_in_every_command(tiny_run, tmp_path):
    strip = tmp_path / "in" / "strip.png"
    strip.parent.mkdir()
    Image.new("L", (300_000, 1)).save(strip)  # ~1 KB file; the eval resize would allocate ~0.8 GB
    assert strip.stat().st_size < 2000
    with pytest.raises(BadImage, match="aspect ratio beyond 50:1"):
        check_header(strip)
    with pytest.raises(BadImage, match="aspect ratio"):
        open_image(strip)
    make_image(0, np.random.default_rng(0)).save(strip.parent / "ok.png")
    r = run_cli("predict", tiny_run, strip.parent, "--format", "json", "--runtime", "torch", "--workers", "0",
                "--no-progress")  # fmt: skip
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert len(doc["predictions"]) == 1 and "aspect ratio" in doc["skipped"][0]["reason"]
    r = run_cli("explain", tiny_run, strip)
    assert r.code == 2 and "aspect ratio" in r.err and "Traceback" not in r.err
    big = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(big)
    r = run_cli("predict", tiny_run, big, "--max-pixels", "100000", "--format", "json", "--runtime", "torch",
                "--workers", "0", "--no-progress")  # fmt: skip
    assert r.code == 2 and "over the limit of 100000" in r.err and "no readable image" in r.err, r
    r = run_cli("predict", tiny_run, big, "--max-pixels", "120000", "--format", "json", "--runtime", "torch",
                "--workers", "0", "--no-progress")  # fmt: skip
    assert r.code == 0 and len(json.loads(r.out)["predictions"]) == 1, r


def test_junk_files_stay_out_of_the_split_and_small_classes_are_named(tmp_path, caplog):
    root = make_folder(tmp_path / "d", n_per_class=5, classes=3)
    for i in range(3, 5):
        (root / "class_0" / f"img_{i:03d}.png").unlink()  # class_0: 3 images
    for i in range(1, 5):
        (root / "class_2" / f"img_{i:03d}.png").unlink()  # class_2: 1 image
    for c in ("class_0", "class_2"):
        (root / c / "Thumbs.db").write_bytes(b"\x00" * 64)
        (root / c / "empty.jpg").write_bytes(b"")
    cfg = Config()
    cfg.data.path = str(root)
    cfg.data.val_split = 0.34
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        sp = prepare_data(cfg)
    assert list(sp.val.class_counts()) == [1, 2, 0]  # from usable images only: 3, 5, 1
    assert not sp.val.bad and len(sp.train.bad) == 4
    assert all(Path(sp.train.items[i]).name in ("Thumbs.db", "empty.jpg") for i in sp.train.bad)
    text = caplog.text
    assert "4 file(s) cannot be used" in text and "class_2" in text and "too few images" in text


def test_a_run_that_never_finished_an_epoch_can_be_reused(tmp_path):
    data = make_folder(tmp_path / "d", n_per_class=8)
    good = data / "class_0" / "img_000.png"
    trunc = data / "class_1" / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:200])  # a valid header, broken pixel data: found only when decoded
    (data / "class_2" / "Thumbs.db").write_bytes(b"\x00" * 64)
    out = tmp_path / "runs"
    val = make_folder(tmp_path / "v", n_per_class=2, seed=1)
    args = ["--data", data, "--val-data", val, "--epochs", "1", "--output", out, *TINY, "--batch-size", "5"]
    r = run_cli("train", *args, "--name", "h", "--strict-images")
    assert r.code == 2 and "Thumbs.db" in r.err and not (out / "h").exists()  # refused before anything is written
    (data / "class_2" / "Thumbs.db").unlink()
    r = run_cli("train", *args, "--name", "x", "--strict-images")
    assert r.code == 2 and "trunc.png" in r.err, r
    assert {p.name for p in (out / "x").iterdir()} <= {
        "config.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "checkpoints",
        "run.lock",
    }
    shutil.copytree(out / "x", out / "y")
    r = run_cli("train", *args, "--name", "x")  # the same name again, without --strict-images
    assert r.code == 0 and (out / "x" / "imgclf.json").exists(), r
    trunc.unlink()
    r = run_cli("train", "--resume", "--output", out, "--name", "y")  # resuming it starts afresh
    assert r.code == 0 and (out / "y" / "imgclf.json").exists(), r
    (out / "z").mkdir()
    (out / "z" / "notes.txt").write_text("mine")  # not ours: never reused
    r = run_cli("train", *args, "--name", "z")
    assert r.code == 2 and "already exists" in r.err


def test_ensemble_members_with_another_class_order_are_aligned_by_name(tiny_run, tiny_test_folder, tmp_path):
    """The same model with its classes (head rows and names) permuted: the ensemble equals the model."""
    from safetensors.torch import load_file, save_file

    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)
    doc = json.loads((twin / "imgclf.json").read_text())
    perm = [2, 0, 1]
    doc["class_names"] = [doc["class_names"][i] for i in perm]
    (twin / "imgclf.json").write_text(json.dumps(doc))
    state = load_file(str(twin / "model.safetensors"))
    head = [k for k in state if state[k].shape[:1] == (3,) and "classifier" in k]
    assert head, list(state)[-4:]
    for k in head:
        state[k] = state[k][perm].contiguous()
    save_file(state, str(twin / "model.safetensors"), metadata={"arch": doc["arch"], "num_classes": "3"})
    opts = ["--workers", "0", "--no-progress", "--format", "json"]
    one = json.loads(run_cli("eval", tiny_run, "--data", tiny_test_folder, *opts).out)
    r = run_cli("eval", tiny_run, twin, "--data", tiny_test_folder, *opts)
    assert r.code == 0, r
    ens = json.loads(r.out)
    assert ens["ensemble"]["top1"] == pytest.approx(one["top1"])
    assert ens["gain"]["nll"] == pytest.approx(0, abs=1e-6)


def test_animated_images_say_the_first_frame_is_used(tiny_run, tmp_path, caplog):
    frames = [Image.new("RGB", (24, 24), c) for c in ((220, 40, 40), (40, 200, 40), (40, 60, 220))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert "3 frames" in check_header(tmp_path / "a.gif")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        r = run_cli("predict", tiny_run, tmp_path, "--format", "json", "--runtime", "torch", "--workers", "0",
                    "--no-progress")  # fmt: skip
    assert r.code == 0 and "animated image(s): the first frame is used" in caplog.text + r.err, r


@pytest.mark.slow
def test_twins_get_the_same_answers_in_train_eval_predict_and_serve(tiny_run, tiny_test_folder, tmp_path):
    """16-bit, float and transparent twins of 8-bit pictures: same training run, same metrics, same
    predictions on PyTorch and through the server, as their 8-bit originals."""
    rng = np.random.default_rng(7)
    colour, grey8, grey16 = tmp_path / "colour", tmp_path / "grey8", tmp_path / "grey16"
    for c in range(3):
        for d in (colour, grey8 / f"class_{c}", grey16 / f"class_{c}"):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            img = make_image(c, rng)
            colour_twins(img, colour / f"c{c}_{i}", rng)
            g = np.asarray(img.convert("L"))
            Image.fromarray(g, "L").save(grey8 / f"class_{c}" / f"{i}.png")
            tifffile.imwrite(grey16 / f"class_{c}" / f"{i}.tif", g.astype(np.float32) / 255)  # float [0, 1]
    # predict: every twin gets its 8-bit original's probabilities
    r = run_cli("predict", tiny_run, colour, "--format", "json", "--runtime", "torch", "--workers", "0",
                "--no-progress", "--top-k", "3")  # fmt: skip
    assert r.code == 0 and not json.loads(r.out)["skipped"], r
    by = {Path(p["path"]).name: p["top"] for p in json.loads(r.out)["predictions"]}
    assert len(by) == 24 * 4
    for name, top in by.items():
        stem = name.split("_8bit")[0].split("_rgb16")[0].split("_alpha")[0]
        assert top == by[f"{stem}_8bit.png"], name
    # train and eval: the float-TIFF copy of a grey data set trains and evaluates exactly like the 8-bit one
    res = {}
    for d in (grey8, grey16):
        r = run_cli("train", "--data", d, "--epochs", "1", "--output", tmp_path / "runs", "--name", d.name,
                    "--data.val_split", "0.25", *TINY)  # fmt: skip
        assert r.code == 0, r
        art = json.loads((tmp_path / "runs" / d.name / "imgclf.json").read_text())
        ev = run_cli("eval", tmp_path / "runs" / "grey8", "--data", d, "--workers", "0", "--no-progress",
                     "--format", "json")  # fmt: skip
        res[d.name] = (art["metrics"]["val"], json.loads(ev.out))
    assert res["grey8"][0]["top1"] == res["grey16"][0]["top1"] and res["grey8"][0]["loss"] == res["grey16"][0]["loss"]
    assert res["grey8"][1]["top1"] == res["grey16"][1]["top1"]
    assert res["grey8"][1]["calibration"]["before"]["nll"] == pytest.approx(
        res["grey16"][1]["calibration"]["before"]["nll"], abs=1e-6
    )
    # serve: the twins and the 8-bit original get the same answer; the user's pixel limit is the limit
    big = tmp_path / "big.png"
    Image.new("L", (9500, 9500), 128).save(big)  # 90 MP: over Pillow's own 89.5 MP default
    s = Served([tiny_run, "--runtime", "torch", "--max-pixels", "200000000", "--no-batching"], tmp_path)
    try:
        answers = {}
        for k in ("8bit.png", "rgb16.png", "rgb16.tif", "alpha.png"):
            body = (colour / f"c1_0_{k}").read_bytes()
            st, doc = s.json("POST", "/predict", body, {"Content-Type": "application/octet-stream"})
            assert st == 200, doc
            answers[k] = doc["predictions"][0]["top"]
        assert all(a == answers["8bit.png"] for a in answers.values()), answers
        st, doc = s.json("POST", "/predict", big.read_bytes(), {"Content-Type": "image/png"})
        assert st == 200, doc
        st, doc = s.json("POST", "/predict", png(Image.new("L", (300_000, 1))), {"Content-Type": "image/png"})
        assert st == 400 and "aspect ratio" in doc["error"]
    finally:
        assert s.stop() == 0, s.log()
    assert os.path.getsize(big) < 1_000_000


def test_review_cases_integer_arrays_float_overshoot_wide_tiffs_and_orientation(tmp_path, grey):
    stack = np.stack([grey, 255 - grey])
    ref = open_source(_npz(tmp_path / "u8.npz", stack, np.array([0, 1])))
    for dt in (np.int64, np.int32, np.int16, np.uint16):  # np.array(list) makes int64: values decide, not type
        s = open_source(_npz(tmp_path / f"{np.dtype(dt).name}.npz", stack.astype(dt), np.array([0, 1])))
        assert np.array_equal(np.asarray(s.load(0)), np.asarray(ref.load(0))), dt
    f = grey.astype(np.float32) / 255
    f[0, 0] = 1.001  # resampling overshoot: still a [0, 1] image
    tifffile.imwrite(tmp_path / "over.tif", f)
    over = np.asarray(open_image(tmp_path / "over.tif"))[..., 0].astype(int)
    assert over[0, 0] == 255 and abs(over - grey).ravel()[1:].max() <= 1
    big = (np.arange(8, dtype=np.uint64) * (2**32 - 1) // 7).astype(np.uint32).reshape(2, 4)
    tifffile.imwrite(tmp_path / "u32.tif", big)  # Pillow reads it as signed: values above 2**31 would wrap
    mm = np.asarray(open_image(tmp_path / "u32.tif", DecodePolicy(pixel_range="minmax")))[..., 0]
    assert mm.ravel().tolist() == [0, 36, 73, 109, 146, 182, 219, 255]
    tifffile.imwrite(tmp_path / "i16.tif", (grey.astype(np.int16) * 128))  # signed 16-bit, non-negative
    assert abs(np.asarray(open_image(tmp_path / "i16.tif"))[..., 0].astype(int) - grey).max() <= 1
    a = (np.arange(32, dtype=np.uint8) * 8).reshape(4, 8)
    tifffile.imwrite(tmp_path / "rot.tif", a, extratags=[(274, "H", 1, 6, True)])  # EXIF orientation 6
    from imgclf.data.images import decode_image

    by_path = np.asarray(open_image(tmp_path / "rot.tif"))
    by_bytes = np.asarray(decode_image((tmp_path / "rot.tif").read_bytes()))
    assert by_path.shape == (8, 4, 3) and np.array_equal(by_path, by_bytes)


def test_runs_trained_before_the_policy_decode_as_they_were_trained(tmp_path):
    legacy = DecodePolicy.from_json(None)  # an artifact without preprocessing.decode
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200  # red, fully transparent: the old decoding dropped alpha and showed red
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    assert tuple(np.asarray(open_image(tmp_path / "t.png", legacy))[0, 0]) == (200, 0, 0)
    assert tuple(np.asarray(open_image(tmp_path / "t.png"))[0, 0]) == (255, 255, 255)


def test_links_into_another_class_are_read_once_and_named(tmp_path):
    root = make_folder(tmp_path / "ds", n_per_class=3, classes=2)
    (root / "class_1" / "alias").symlink_to(root / "class_0", target_is_directory=True)
    (root / "class_2").symlink_to(root / "class_0", target_is_directory=True)
    s = read_image_folder(root)
    assert list(s.class_counts(usable=True)) == [3, 3, 0]
    reasons = sorted(s.bad.values())
    assert len(reasons) == 2 and all("the same folder as" in r and "class_0" in r for r in reasons)


def test_bad_window_and_nothing_readable_are_one_line_errors(tiny_run, tmp_path, tiny_folder):
    r = run_cli("train", "--data", tiny_folder, "--data.pixel_range", "[0, .inf]", "--epochs", "1", *TINY)
    assert r.code == 2 and "data.pixel_range" in r.err and "Traceback" not in r.err
    (tmp_path / "notes.txt").write_text("x")
    r = run_cli("predict", tiny_run, tmp_path / "notes.txt", "--runtime", "torch", "--workers", "0")
    assert r.code == 2 and "no readable image" in r.err and "notes.txt" in r.err
