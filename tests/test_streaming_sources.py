"""Streaming sources (issue 15): WebDataset shards (local: indexed, random access; URLs: streamed by rank and
worker), Hugging Face datasets, and ``imgclf convert --to wds``; each trains and evaluates on tiny generated data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.config import ConvertConfig
from imgclf.data.convert import convert_to_wds
from imgclf.data.images import open_image
from imgclf.data.loader import ImageDataset, make_loader, set_epoch
from imgclf.data.sources import LabelFormat, open_source
from imgclf.errors import ImgclfError

from .conftest import TINY, make_folder, make_image, run_cli


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """A fresh shard-index cache per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _png(cls: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(cls, np.random.default_rng(seed)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _content(s) -> list[tuple[str, object]]:
    """Every sample as (hash of its decoded pixels, its label names), sorted: the data independent of order."""
    out = []
    for i in range(len(s)):
        h = hashlib.sha256(np.asarray(s.load(i)).tobytes()).hexdigest()
        lab = tuple(np.flatnonzero(s.labels[i])) if s.multi_label else s.labels[i]
        out.append((h, tuple(s.class_names[k] for k in lab) if s.multi_label else s.class_names[lab]))
    return sorted(out)


def _identity(img):
    import torch

    return torch.from_numpy(np.asarray(img).copy())


# --------------------------------------------------------------------------- convert + local shards


def test_convert_round_trip_gives_the_folder_back(tmp_path):
    folder = make_folder(tmp_path / "folder", n_per_class=7)
    res = convert_to_wds(str(folder), tmp_path / "shards", ConvertConfig(shard_size=8, progress=False))
    assert (res["samples"], res["shards"], res["classes"]) == (21, 3, 3)
    names = sorted(os.listdir(tmp_path / "shards"))
    assert names == ["classes.txt", "dataset.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    doc = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert doc["classes"] == ["class_0", "class_1", "class_2"] and doc["class_counts"] == [7, 7, 7]
    assert [s["samples"] for s in doc["shards"]] == [8, 8, 5]
    assert (tmp_path / "shards" / "classes.txt").read_text() == "class_0\nclass_1\nclass_2\n"
    s, f = open_source(tmp_path / "shards"), open_source(folder)
    assert type(s.store).__name__ == "TarStore" and len(s) == 21
    assert _content(s) == _content(f)  # the same images (decoded pixels) with the same labels
    assert s.describe(0) == f"{tmp_path / 'shards' / 'shard-000000.tar'}: 00000000.png"
    # the member bytes are the files' bytes, not re-encoded
    files = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in f.items}
    assert {hashlib.sha256(s.store.read(i)).hexdigest() for i in range(len(s))} == files


def test_convert_label_sets_and_arrays(tmp_path):
    from .conftest import make_multilabel_csv

    csv = make_multilabel_csv(tmp_path / "ml", n=16)
    convert_to_wds(str(csv), tmp_path / "ml-wds", ConvertConfig(shard_size=5, progress=False))
    s, src = open_source(tmp_path / "ml-wds"), open_source(csv)
    assert s.multi_label and s.class_names == src.class_names and _content(s) == _content(src)
    rng = np.random.default_rng(0)
    images = (rng.random((9, 6, 5)) * 65535).astype(np.uint16)  # 16-bit arrays: windowed to 8 bit, then PNG
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(9) % 2, class_names=np.array(["no", "yes"]))
    res = convert_to_wds(str(tmp_path / "a.npz"), tmp_path / "a-wds", ConvertConfig(progress=False, shuffle=False))
    s, src = open_source(tmp_path / "a-wds"), open_source(tmp_path / "a.npz")
    assert res["samples"] == 9 and s.class_names == ["no", "yes"] and s.labels.tolist() == src.labels.tolist()
    assert all(np.array_equal(np.asarray(s.load(i)), np.asarray(src.load(i))) for i in range(9))


def test_shard_index_is_cached_and_refreshed_when_a_shard_changes(tmp_path):
    shard = _tar(tmp_path / "a.tar", [("x.png", _png(0)), ("x.cls", b"0"), ("y.png", _png(1)), ("y.cls", b"1")])
    assert open_source(shard).labels.tolist() == [0, 1]
    cache = list((tmp_path / "cache" / "imgclf" / "wds-index").glob("*.json"))
    assert len(cache) == 1 and json.loads(cache[0].read_text())["samples"][1][:2] == ["y", "png"]
    _tar(shard, [("x.png", _png(0)), ("x.cls", b"1"), ("y.png", _png(1)), ("y.cls", b"1"), ("z.png", _png(2)),
                 ("z.cls", b"0")])  # fmt: skip
    os.utime(shard, ns=(1, 1))  # another size and mtime: indexed again
    assert open_source(shard).labels.tolist() == [1, 1, 0]


def test_labels_contract(tmp_path):
    shard = _tar(tmp_path / "d" / "s.tar", [
        ("a/1.jpg", _jpeg()), ("a/1.cls", b"2"),                      # an index
        ("a/2.png", _png(0)), ("a/2.cls.txt", b"cat\n"),             # a name
        ("a/3.png", _png(1)), ("a/3.json", b'{"label": "dog"}'),     # json label
        ("a/3.seg.png", _png(1)),                                     # a compound extension is not an image
    ])  # fmt: skip
    (tmp_path / "d" / "classes.txt").write_text("cat\ndog\nbird\n")
    s = open_source(shard)
    assert s.class_names == ["cat", "dog", "bird"] and s.labels.tolist() == [2, 0, 1]
    assert s.load(0).size == (24, 24)
    # no class list: names from the labels (sorted); integer indices named 0..max
    names = _tar(tmp_path / "n.tar", [("1.png", _png(0)), ("1.cls", b"zebra"), ("2.png", _png(1)), ("2.cls", b"ant")])
    assert open_source(names).class_names == ["ant", "zebra"]
    ints = _tar(tmp_path / "i.tar", [("1.png", _png(0)), ("1.cls", b"3"), ("2.png", _png(1)), ("2.cls", b"1")])
    s = open_source(ints)
    assert s.class_names == ["0", "1", "2", "3"] and s.labels.tolist() == [3, 1]
    # --data.classes names integer labels when there is no class list beside the shards
    s = open_source(ints, labels=LabelFormat(classes=("a", "b", "c", "d")))
    assert s.class_names == ["a", "b", "c", "d"] and s.labels.tolist() == [3, 1]
    # label sets: json labels (names or indices), [] is an image with no class
    ml = _tar(tmp_path / "m.tar", [("1.png", _png(0)), ("1.json", b'{"labels": ["red", "blue"]}'), ("2.png", _png(1)),
                                   ("2.json", b'{"labels": []}')])  # fmt: skip
    s = open_source(ml)
    assert s.multi_label and s.class_names == ["blue", "red"] and s.labels.tolist() == [[1, 1], [0, 0]]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    make_image(2, np.random.default_rng(5)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "members, beside, message",
    [
        ([("k1.cls", b"0")], None, "s.tar: sample 'k1' has no image member (found k1.cls)"),
        ([("k1.png", b"x")], None, "s.tar: k1.png: no label (expected a cls / cls.txt member"),
        ([("k1.png", b"x"), ("k1.jpg", b"x"), ("k1.cls", b"0")], None, "sample 'k1' has two images (png and jpg)"),
        ([("k1.png", b"x"), ("k1.cls", b"5")], "a\nb\n", "s.tar: k1.png: label 5 is outside the 2 classes"),
        ([("k1.png", b"x"), ("k1.cls", b"c")], "a\nb\n", "s.tar: k1.png: label 'c' is not one of the classes (a, b)"),
        ([("k1.png", b"x"), ("k1.cls", b"1"), ("k2.png", b"x"), ("k2.cls", b"b")], None,
         "integer labels mixed with class names and no class list"),
        ([("k1.png", b"x"), ("k1.json", b"{oops")], None, "s.tar: k1.json: not valid JSON"),
        ([("k1.png", b"x"), ("k1.cls", b"0"), ("k1.json", b'{"label": 1}')], None, "k1: its label members disagree"),
        ([("k1.png", b"x"), ("k1.cls", b"0"), ("k2.png", b"x"), ("k2.cls", b"0"), ("k1.txt", b"")], None,
         "key 'k1' appears twice"),
    ],
)  # fmt: skip
def test_bad_shards_are_one_line_errors_naming_shard_and_member(tmp_path, members, beside, message):
    shard = _tar(tmp_path / "s.tar", members)
    if beside:
        (tmp_path / "classes.txt").write_text(beside)
    with pytest.raises(ImgclfError, match="^" + str(tmp_path / "")) as e:
        open_source(shard)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_and_compressed_shards(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ImgclfError, match=r"junk.tar: not a readable tar shard"):
        open_source(junk)
    gz = tmp_path / "z.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        data = _png(0)
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ImgclfError, match=r"z.tar.gz: a compressed shard cannot be read by index.*file://"):
        open_source(gz)
    assert run_cli("train", "--data", str(junk), *TINY).code == 2


def test_a_corrupt_image_member_is_skipped_and_reported(tmp_path):
    members = [("a.png", _png(0)), ("a.cls", b"0"), ("b.png", b"\x89PNG broken"), ("b.cls", b"1")]
    shard = _tar(tmp_path / "s.tar", members)
    s = open_source(shard).check_files()
    assert list(s.bad) == [1] and "b.png" in s.describe(1)
    out = ImageDataset(s, _identity)[1]
    assert type(out).__name__ == "Skipped" and out.source.endswith("s.tar: b.png")


# --------------------------------------------------------------------------- streaming (URLs)


def _shards(tmp_path, n_per_class=10, shard_size=6) -> Path:
    folder = make_folder(tmp_path / "folder", n_per_class=n_per_class)
    return convert_to_wds(str(folder), tmp_path / "wds", ConvertConfig(shard_size=shard_size, progress=False))["output"]


def _url(out) -> str:
    n = len(list(Path(out).glob("shard-*.tar")))
    return f"file://{out}/shard-{{000000..{n - 1:06d}}}.tar"


def _seen(s, *, train, world, workers=0, bs=4, epoch=1):
    """Per rank: the positions its loader yields and its number of batches."""
    out = []
    for rank in range(world):
        dl = make_loader(ImageDataset(s, _identity), bs, train=train, num_workers=workers, seed=7, rank=rank,
                         world_size=world)  # fmt: skip
        set_epoch(dl, 7, epoch)
        batches = list(dl)
        assert all(not b.skipped for b in batches)
        out.append(([i for b in batches for i in b.indices.tolist()], len(batches), len(dl)))
    return out


def test_stream_has_the_labels_of_the_local_shards(tmp_path):
    out = _shards(tmp_path)
    local, stream = open_source(out), open_source(_url(out))
    assert type(stream.store).__name__ == "StreamStore" and stream.store.streaming
    assert stream.labels.tolist() == local.labels.tolist() and stream.class_names == local.class_names
    assert stream.check_files().bad == {}
    with pytest.raises(ImgclfError, match="cannot be read by index"):
        stream.load(0)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_stream_evaluation_ranks_are_disjoint_and_complete(tmp_path, world, workers):
    stream = open_source(_url(_shards(tmp_path)))  # 30 samples in 5 shards of 6
    ranks = _seen(stream, train=False, world=world, workers=workers)
    got = [i for seen, _, _ in ranks for i in seen]
    assert sorted(got) == list(range(30))  # every sample once, across ranks
    assert all(n == length for _, n, length in ranks)  # each loader's declared length is what it yields
    # labels in the batches are the source's labels at those positions
    dl = make_loader(ImageDataset(stream, _identity), 8, train=False, num_workers=0)
    for b in dl:
        assert b.labels.tolist() == stream.labels[b.indices.numpy()].tolist()


def test_a_stream_subset_yields_exactly_its_images(tmp_path):
    """What the OOD statistics read from a streamed training set: a stratified subset, filtered from the stream."""
    stream = open_source(_url(_shards(tmp_path)))
    sub = stream.subset([3, 7, 8, 20, 29])
    seen = _seen(sub, train=False, world=2)
    assert sorted(i for s, _, _ in seen for i in s) == [0, 1, 2, 3, 4]  # positions within the subset
    dl = make_loader(ImageDataset(sub, _identity), 8, train=False, num_workers=0)
    batch = next(iter(dl))
    assert batch.labels.tolist() == stream.labels[[3, 7, 8, 20, 29]][batch.indices.numpy()].tolist()
    assert sub.describe(4).endswith("shard-000004.tar: 00000029.png")


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (4, 0)])
def test_stream_training_gives_every_rank_the_same_steps(tmp_path, world, workers):
    stream = open_source(_url(_shards(tmp_path)))  # 30 samples in 5 shards of 6
    ranks = _seen(stream, train=True, world=world, workers=workers)
    per_rank = -(-30 // world)  # ceil(N / W), as DistributedSampler
    steps = per_rank // 4 if per_rank > 4 else 1
    assert {(n, length) for _, n, length in ranks} == {(steps, steps)}
    for seen, _, _ in ranks:
        assert len(seen) == (steps * 4 if per_rank > 4 else per_rank)
    everything = [i for seen, _, _ in ranks for i in seen]
    if world == 1:
        assert len(set(everything)) == len(everything)  # no repeats within a rank's epoch
    assert len(set(everything)) >= min(30, len(everything)) - 6  # at most one shard's worth of padding repeats


def test_stream_order_is_a_function_of_seed_and_epoch(tmp_path):
    stream = open_source(_url(_shards(tmp_path)))
    a, b = _seen(stream, train=True, world=1, epoch=1), _seen(stream, train=True, world=1, epoch=1)
    c = _seen(stream, train=True, world=1, epoch=2)
    assert a[0][0] == b[0][0] and a[0][0] != c[0][0]


def test_stream_refuses_what_needs_an_index(tmp_path):
    url = _url(_shards(tmp_path))
    r = run_cli("train", "--data", url, "--epochs", "1", "--output", tmp_path / "runs", *TINY)
    assert r.code == 2 and "a validation split cannot be drawn from a streamed WebDataset; pass --val-data" in r.err
    r = run_cli("train", "--data", url, "--val-data", url, "--data.sampler", "balanced", "--epochs", "1",
                "--output", tmp_path / "runs", *TINY)  # fmt: skip
    assert r.code == 2 and "picks images by index" in r.err
    r = run_cli("audit", url, "--no-embeddings")
    assert r.code == 2 and "streamed WebDataset" in r.err


def test_a_shard_changed_after_indexing_is_an_error(tmp_path):
    out = _shards(tmp_path, n_per_class=2, shard_size=10)
    stream = open_source(_url(out))
    shard = Path(out) / "shard-000000.tar"
    _tar(shard, [("zz.png", _png(0)), ("zz.cls", b"0")])  # replaced under the same URL after it was indexed
    with pytest.raises(ImgclfError, match="changed since it was indexed"):
        list(make_loader(ImageDataset(stream, _identity), 4, train=False, num_workers=0))


# --------------------------------------------------------------------------- Hugging Face datasets


def _hf_dataset(n=12, seed=0, string_labels=False):
    import datasets

    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    images = []
    for c in labels:
        buf = io.BytesIO()
        make_image(c, rng).save(buf, "PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    label_feat = datasets.Value("string") if string_labels else datasets.ClassLabel(names=["cat", "dog", "emu"])
    feats = datasets.Features({"img": datasets.Image(), "label": label_feat, "id": datasets.Value("int32")})
    column = [["cat", "dog", "emu"][c] for c in labels] if string_labels else labels
    return datasets.Dataset.from_dict({"img": images, "label": column, "id": list(range(n))}, features=feats)


def test_hf_save_to_disk_with_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": _hf_dataset(12), "validation": _hf_dataset(6, seed=1)})
    dd.save_to_disk(str(tmp_path / "hfds"))
    s = open_source(f"hf:{tmp_path / 'hfds'}")
    assert len(s) == 12 and s.class_names == ["cat", "dog", "emu"] and s.labels.tolist() == [0, 1, 2] * 4
    assert s.other_splits == ("val",) and len(s.companion("val")) == 6
    assert open_source(tmp_path / "hfds").class_names == ["cat", "dog", "emu"]  # recognised without the prefix
    assert s.describe(3) == f"{tmp_path / 'hfds'}[3]"
    assert s.check_files().bad == {}


def test_hf_parquet_string_labels_and_columns(tmp_path):
    ds = _hf_dataset(9, string_labels=True)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    s = open_source(tmp_path / "d.parquet")
    assert s.class_names == ["cat", "dog", "emu"] and s.labels.tolist() == [0, 1, 2] * 3
    ds.save_to_disk(str(tmp_path / "one"))
    s = open_source(f"hf:{tmp_path / 'one'}", labels=LabelFormat(image_column="img", label_column="id"))
    assert s.class_names == [str(i) for i in range(9)]  # integers without names: 0..max
    with pytest.raises(ImgclfError, match=r"one: no column 'photo' \(--data.image_column"):
        open_source(f"hf:{tmp_path / 'one'}", labels=LabelFormat(image_column="photo"))


def test_hf_errors_name_the_column_and_row(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "noimg"))
    r = run_cli("train", "--data", f"hf:{tmp_path / 'noimg'}", *TINY)
    assert r.code == 2 and "noimg: no image column; name one with --data.image_column (columns: text (Value)" in r.err
    bad = _hf_dataset(4).cast_column("label", datasets.Value("int64"))
    bad = bad.map(lambda row, i: {"label": -1 if i == 2 else row["label"]}, with_indices=True)
    bad.save_to_disk(str(tmp_path / "neg"))
    with pytest.raises(ImgclfError, match=r"neg: row 2, column 'label': no label \(-1\)"):
        open_source(f"hf:{tmp_path / 'neg'}")
    with pytest.raises(ImgclfError, match="no such dataset folder"):
        open_source("hf:./nowhere/at/all")


def test_hf_images_decode_exactly_as_files(tmp_path):
    """EXIF orientation, transparency and 16-bit grey: the dataset's bytes go through imgclf's decoding, so each
    image gives the pixels the same file gives (``datasets``' own decoding would not transpose or composite)."""
    import datasets

    files = []
    rot = Image.fromarray(np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(tmp_path / "rot.jpg", exif=exif)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / "deep.png")
    files = [tmp_path / n for n in ("rot.jpg", "alpha.png", "deep.png")]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    cells = [{"bytes": f.read_bytes(), "path": None} for f in files]
    datasets.Dataset.from_dict({"image": cells, "label": [0, 0, 0]}, features=feats).save_to_disk(str(tmp_path / "d"))
    s = open_source(f"hf:{tmp_path / 'd'}")
    for i, f in enumerate(files):
        assert np.array_equal(np.asarray(s.load(i)), np.asarray(open_image(f))), f.name
    assert s.load(0).size == (6, 10)  # EXIF orientation 6 applied


# --------------------------------------------------------------------------- train and evaluate end to end


@pytest.mark.slow
def test_train_and_eval_on_converted_local_shards(tmp_path):
    folder = make_folder(tmp_path / "folder", n_per_class=10)
    (folder / "class_1" / "notes.txt").write_text("not an image")
    r = run_cli("convert", folder, "--to", "wds", "--output", tmp_path / "wds", "--shard-size", "8", "--no-progress")
    assert r.code == 0 and "wrote 30 samples (single-label, 3 classes) in 4 shard(s)" in r.out, r
    assert "left out 1 unreadable or non-image file(s), listed in dataset.json (e.g. " in r.out and "notes.txt" in r.out
    r = run_cli("convert", folder, "--output", tmp_path / "wds")
    assert r.code == 2 and "already exists; choose another --output or pass --overwrite" in r.err
    test = make_folder(tmp_path / "test", n_per_class=4, seed=3)
    assert run_cli("convert", test, "--output", tmp_path / "test-wds", "--no-progress").code == 0
    r = run_cli("train", "--data", tmp_path / "wds", "--test-data", tmp_path / "test-wds", "--epochs", "1",
                "--output", tmp_path / "runs", "--name", "w", *TINY)  # fmt: skip
    assert r.code == 0, r
    art = json.loads((tmp_path / "runs" / "w" / "imgclf.json").read_text())
    assert art["class_names"] == ["class_0", "class_1", "class_2"]
    assert art["data"]["n_train"] + art["data"]["n_val"] == 30 and art["data"]["class_counts"] == [9, 9, 9]
    assert "test" in art["metrics"]
    r = run_cli("eval", tmp_path / "runs" / "w", "--data", tmp_path / "test-wds", "--no-progress", "--workers", "0")
    assert r.code == 0 and "test-wds" in r.out, r
    r = run_cli("audit", tmp_path / "wds", "--test-data", tmp_path / "test-wds", "--no-embeddings", "--workers", "0",
                "--json", tmp_path / "audit.json")  # fmt: skip
    assert r.code == 0, r
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["summary"]["unreadable"] == 0 and doc["summary"]["leaks_exact"] == 0


@pytest.mark.slow
def test_train_and_eval_on_streamed_shards(tmp_path):
    train = make_folder(tmp_path / "train", n_per_class=10)
    val = make_folder(tmp_path / "val", n_per_class=4, seed=2)
    for name, src in (("train-wds", train), ("val-wds", val)):
        convert_to_wds(str(src), tmp_path / name, ConvertConfig(shard_size=6, progress=False))
    tr, va = _url(tmp_path / "train-wds"), _url(tmp_path / "val-wds")
    r = run_cli("train", "--data", tr, "--val-data", va, "--epochs", "1", "--output", tmp_path / "runs", "--name",
                "s", *TINY)  # fmt: skip
    assert r.code == 0, r
    art = json.loads((tmp_path / "runs" / "s" / "imgclf.json").read_text())
    assert (art["data"]["n_train"], art["data"]["n_val"], art["data"]["class_counts"]) == (30, 12, [10, 10, 10])
    from imgclf.eval.predictions import load_predictions

    saved = load_predictions(tmp_path / "runs" / "s" / "val_predictions.safetensors")
    assert sorted(saved.indices.tolist()) == list(range(12))  # every validation image once, named by its member
    assert f"file://{tmp_path / 'val-wds' / 'shard-000000.tar'}: 00000000.png" in saved.names
    r = run_cli("eval", tmp_path / "runs" / "s", "--data", va, "--no-progress", "--workers", "0")
    assert r.code == 0, r


@pytest.mark.slow
def test_train_and_eval_on_a_hf_dataset(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": _hf_dataset(24), "validation": _hf_dataset(9, seed=1),
                               "test": _hf_dataset(9, seed=2)})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "hfds"))
    r = run_cli("train", "--data", f"hf:{tmp_path / 'hfds'}", "--epochs", "1", "--output", tmp_path / "runs",
                "--name", "h", *TINY)  # fmt: skip
    assert r.code == 0, r
    art = json.loads((tmp_path / "runs" / "h" / "imgclf.json").read_text())
    assert art["class_names"] == ["cat", "dog", "emu"] and (art["data"]["n_train"], art["data"]["n_val"]) == (24, 9)
    assert "test" in art["metrics"]
    r = run_cli("eval", tmp_path / "runs" / "h", "--data", f"hf:{tmp_path / 'hfds'}", "--split", "test",
                "--no-progress")  # fmt: skip
    assert r.code == 0, r


def test_predict_reads_shards_and_datasets_without_labels(tmp_path, tiny_run):
    import datasets

    members = [(f"{i}.png", _png(i % 3, seed=i)) for i in range(5)]  # no label members: inputs to predict
    shard = _tar(tmp_path / "in.tar", members)
    fast = ("--format", "json", "--no-progress", "--workers", "0", "--runtime", "torch")
    r = run_cli("predict", tiny_run, shard, *fast)
    assert r.code == 0, r
    rows = json.loads(r.out)
    rows = rows.get("predictions", rows) if isinstance(rows, dict) else rows
    assert len(rows) == 5 and str(rows[0]).count("in.tar: 0.png") == 1
    feats = datasets.Features({"image": datasets.Image()})
    cells = [{"bytes": data, "path": None} for _, data in members]
    datasets.Dataset.from_dict({"image": cells}, features=feats).save_to_disk(str(tmp_path / "unl"))
    r = run_cli("predict", tiny_run, f"hf:{tmp_path / 'unl'}", *fast)
    assert r.code == 0 and len(json.loads(r.out).get("predictions", json.loads(r.out))) == 5, r


def test_hf_imagefolder_and_hub_names(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = make_folder(tmp_path / "folder", n_per_class=3)
    s, f = open_source(f"hf:{folder}"), open_source(folder)  # datasets' imagefolder builder vs imgclf's reader
    assert s.class_names == f.class_names and _content(s) == _content(f)
    with pytest.raises(ImgclfError, match=r"^someone/nothing: cannot load the Hugging Face dataset \("):
        open_source("hf:someone/nothing")  # the Hub loader (offline in the tests)
