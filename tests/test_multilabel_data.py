"""Unit: multi-label data: label-set, wide and folder CSVs, 2-D .npz labels, vocabularies, errors, iterative
stratification, splits and collation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.config import Config, DataConfig
from imgclf.data.loader import ImageDataset, Skipped, collate
from imgclf.data.sources import (
    LabelFormat,
    Samples,
    iterative_split,
    label_format_from_config,
    open_source,
    stratified_split,
)
from imgclf.data.splits import prepare_data
from imgclf.errors import ImgclfError

from .conftest import make_folder, make_image

pytestmark = pytest.mark.unit

#: file -> label set; classes sorted: cat, dog, grass
SETS = {"a.png": "dog|grass", "b.png": "cat", "c.png": "", "d.png": "grass|cat", "e.png": "dog",
        "f.png": "dog|cat|grass"}  # fmt: skip
CLASSES = ["cat", "dog", "grass"]
MATRIX = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=np.uint8)


def _images(root: Path, names, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_image(i % 4, rng).save(root / name)
    return root


def _sets_csv(path: Path, cells: dict[str, str], prefix: str = "imgs/", column: str = "labels") -> Path:
    path.write_text(f"path,{column}\n" + "".join(f"{prefix}{k},{v}\n" for k, v in cells.items()), encoding="utf-8")
    return path


def _wide_csv(path: Path, columns: list[str], prefix: str = "imgs/") -> Path:
    order = [CLASSES.index(c) for c in columns]
    rows = [f"{prefix}{k},{','.join(str(v) for v in MATRIX[i, order])}" for i, k in enumerate(SETS)]
    path.write_text("path," + ",".join(columns) + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def imgs(tmp_path) -> Path:
    return _images(tmp_path / "imgs", SETS)


def test_four_formats_give_the_same_matrix(tmp_path, imgs):
    sets = open_source(_sets_csv(tmp_path / "sets.csv", SETS))
    wide = open_source(_wide_csv(tmp_path / "wide.csv", CLASSES))
    _sets_csv(imgs / "labels.csv", SETS, prefix="")
    _images(imgs / "more", ["unlisted.png", "also.png"])
    folder = open_source(imgs)
    npz = tmp_path / "a.npz"
    np.savez(npz, images=np.zeros((6, 8, 8), np.uint8), labels=MATRIX.astype(bool), class_names=np.array(CLASSES))
    arrays = open_source(npz)
    for s in (sets, wide, folder, arrays):
        assert s.multi_label and s.labels.dtype == np.uint8 and s.labels.shape == (6, 3)
        assert s.class_names == CLASSES and np.array_equal(s.labels, MATRIX)
        assert list(s.class_counts()) == [3, 3, 3]
    assert sets.items == wide.items == folder.items
    assert folder.name == str(imgs) and any("2 image file(s) not listed in labels.csv are not used" in n
                                            and "more/" in n for n in folder.notes)  # fmt: skip
    unnamed = tmp_path / "u.npz"
    np.savez(unnamed, images=np.zeros((6, 8, 8), np.uint8), labels=MATRIX.astype(np.int16))
    assert open_source(unnamed).class_names == ["0", "1", "2"]


def test_single_label_sources_are_unchanged(tmp_path, imgs):
    s = open_source(_sets_csv(tmp_path / "l.csv", {"a.png": "dog", "b.png": "cat"}, column="label"))
    assert not s.multi_label and s.labels.dtype == np.int64 and list(s.labels) == [1, 0]
    assert list(s.class_counts()) == [1, 1]
    folder = open_source(make_folder(tmp_path / "f", n_per_class=2, classes=2))
    assert not folder.multi_label and list(folder.labels) == [0, 0, 1, 1]


def test_label_sets_in_a_label_column_are_an_error_not_compound_classes(tmp_path, imgs):
    csv = _sets_csv(tmp_path / "l.csv", {"a.png": "dog", "b.png": "red|green"}, column="label")
    with pytest.raises(ImgclfError, match=r"row 3: label 'red\|green' looks like a label set; name the column"):
        open_source(csv)
    s = open_source(csv, labels=LabelFormat(task="single_label"))  # said explicitly: one class named red|green
    assert s.class_names == ["dog", "red|green"]


def test_task_multi_label_reads_label_column_as_sets_and_folders_as_one_hot(tmp_path, imgs):
    fmt = LabelFormat(task="multi_label")
    s = open_source(_sets_csv(tmp_path / "l.csv", SETS, column="label"), labels=fmt)
    assert s.multi_label and np.array_equal(s.labels, MATRIX)
    folder = open_source(make_folder(tmp_path / "f", n_per_class=2, classes=2), labels=fmt)
    assert folder.multi_label and folder.labels.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]


def test_given_vocabulary_order_and_wide_column_order(tmp_path, imgs):
    fmt = LabelFormat(classes=("grass", "dog", "cat", "bird"))
    s = open_source(_sets_csv(tmp_path / "sets.csv", SETS), labels=fmt)
    assert s.class_names == ["grass", "dog", "cat", "bird"]
    assert np.array_equal(s.labels[:, :3], MATRIX[:, [2, 1, 0]]) and not s.labels[:, 3].any()
    wide = open_source(_wide_csv(tmp_path / "wide.csv", ["grass", "cat", "dog"]))
    assert wide.class_names == ["grass", "cat", "dog"]  # column order when no vocabulary is given
    assert np.array_equal(wide.remap_to(CLASSES).labels, MATRIX)
    assert np.array_equal(open_source(tmp_path / "wide.csv", labels=fmt).labels, s.labels)
    single = open_source(_sets_csv(tmp_path / "l.csv", {"a.png": "dog", "b.png": "cat"}, column="label"),
                         labels=LabelFormat(classes=("dog", "cat", "cow")))  # fmt: skip
    assert single.class_names == ["dog", "cat", "cow"] and list(single.labels) == [0, 1]
    folder = open_source(make_folder(tmp_path / "f", n_per_class=1, classes=2),
                         labels=LabelFormat(classes=("class_1", "x", "class_0")))  # fmt: skip
    assert folder.class_names == ["class_1", "x", "class_0"] and list(folder.labels) == [2, 0]
    with pytest.raises(ImgclfError, match=r"class\(es\) class_1 not in the given classes \(--data.classes: class_0"):
        open_source(tmp_path / "f", labels=LabelFormat(classes=("class_0",)))


def test_remap_to_multi_label_by_nfc_name():
    cafe_nfd = "cafe\u0301"
    ml = Samples(["a", "b"], np.array([[1, 0], [1, 1]], np.uint8), [cafe_nfd, "tea"], "m")
    r = ml.remap_to(["tea", "milk", "café"])
    assert r.labels.dtype == np.uint8 and r.labels.tolist() == [[0, 0, 1], [1, 0, 1]]
    assert ml.subset([1]).labels.tolist() == [[1, 1]]
    with pytest.raises(ImgclfError, match="classes not known to the model: tea"):
        ml.remap_to(["café"])
    assert Samples(["a"], np.array([[1, 0]], np.uint8), ["x", "y"], "m").remap_to(["x"]).labels.tolist() == [[1]]
    ml.bad[1] = "broken"
    assert list(ml.class_counts(usable=True)) == [1, 0] and list(ml.class_counts()) == [2, 1]


@pytest.mark.parametrize(
    ("cell", "fmt", "message"),
    [
        ("dog|dog", LabelFormat(), r"sets.csv: row 4: label 'dog' appears twice"),
        ("dog||grass", LabelFormat(), r"sets.csv: row 4: empty label in 'dog\|\|grass' \(a doubled"),
        ("dog|", LabelFormat(), r"row 4: empty label in 'dog\|'"),
        (
            "dog;grass",
            LabelFormat(),
            r"row 4: label 'dog;grass' contains ';': the separator looks like ';'.*"
            r"--data.label_sep ';'",
        ),
        ("dog|grass", LabelFormat(sep=";"), r"row 2: label 'dog\|grass' contains '\|'.*--data.label_sep '\|'"),
        (
            "cow",
            LabelFormat(classes=("cat", "dog", "grass")),
            r"sets.csv: row 4: label 'cow' is not one of the given classes \(--data.classes: cat, dog, grass\)",
        ),
    ],
)
def test_label_set_errors_name_row_and_label(tmp_path, imgs, cell, fmt, message):
    cells = dict(SETS)
    cells["c.png"] = cell  # row 4
    with pytest.raises(ImgclfError, match=message):
        open_source(_sets_csv(tmp_path / "sets.csv", cells), labels=fmt)


def test_csv_layout_errors(tmp_path, imgs):
    cases = {
        "path,labels\nimgs/a.png,dog\nimgs/nope.png,cat\n": r"1 listed file\(s\) do not exist, e.g. row 3: imgs/nope",
        "file,labels\nimgs/a.png,dog\n": r"missing column 'path' \(found: file, labels",
        "path,caption\nimgs/a.png,a dog\n": r"missing column 'label' \(found: path, caption; expected a header "
        r"'path,label'.*'path,labels'.*'path,<class1>,<class2>,...' \(0/1",
        "path,label,labels\nimgs/a.png,dog,dog\n": "both a 'label' and a 'labels' column",
        "path,dog,cat\nimgs/a.png,1,0\nimgs/b.png,2,1\n": r"w.csv: row 3, column 'dog': '2' is not 0 or 1",
        "path,dog,cat\nimgs/a.png,1,0\nimgs/b.png,,1\n": r"row 3, column 'dog': '' is not 0 or 1",
        "path,dog,dog\nimgs/a.png,1,0\n": "class column 'dog' appears twice",
    }
    for text, message in cases.items():
        (tmp_path / "w.csv").write_text(text)
        with pytest.raises(ImgclfError, match=message):
            open_source(tmp_path / "w.csv")
    (tmp_path / "w.csv").write_text("path,dog,cat\nimgs/a.png,1,0\nimgs/b.png,0,1\n")
    with pytest.raises(ImgclfError, match=r"row 3: label 'cat' is not one of the given classes"):
        open_source(tmp_path / "w.csv", labels=LabelFormat(classes=("dog",)))
    with pytest.raises(ImgclfError, match=r"0/1 class columns \(dog, cat\) are multi-label data but --data.task is "
                                          "single_label"):  # fmt: skip
        open_source(tmp_path / "w.csv", labels=LabelFormat(task="single_label"))
    _sets_csv(tmp_path / "s.csv", SETS)
    with pytest.raises(ImgclfError, match="'labels' column holds label sets.*single_label"):
        open_source(tmp_path / "s.csv", labels=LabelFormat(task="single_label"))
    (tmp_path / "l.csv").write_text("path,label\nimgs/a.png,dog\nimgs/b.png,cow\n")
    with pytest.raises(ImgclfError, match=r"l.csv: row 3: label 'cow' is not one of the given classes"):
        open_source(tmp_path / "l.csv", labels=LabelFormat(classes=("dog",)))


def test_npz_matrix_errors(tmp_path):
    p = tmp_path / "m.npz"
    images = np.zeros((2, 8, 8), np.uint8)
    for labels, message in [
        (np.array([[0, 2], [1, 0]]), r"'labels' is a 2-D multi-label matrix and must hold only 0 and 1 \(found 2\)"),
        (np.array([[0.0, 1.0], [1.0, 0.0]]), "'labels' is a 2-D multi-label matrix and must hold 0/1 integers"),
    ]:
        np.savez(p, images=images, labels=labels)
        with pytest.raises(ImgclfError, match=message):
            open_source(p)
    np.savez(p, images=images, labels=np.eye(2, dtype=np.uint8), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(ImgclfError, match="'class_names' has 3 names but 'labels' has 2 columns"):
        open_source(p)
    np.savez(p, images=images, labels=np.eye(2, dtype=np.uint8))
    with pytest.raises(ImgclfError, match="single_label"):
        open_source(p, labels=LabelFormat(task="single_label"))


def test_label_format_and_config_fields():
    assert label_format_from_config(DataConfig()) == LabelFormat()
    fmt = label_format_from_config(DataConfig(task="multi_label", classes=["b", "a"], label_sep=";"))
    assert fmt == LabelFormat("multi_label", ("b", "a"), ";")
    for kw, key in [({"label_sep": " "}, "data.label_sep"), ({"label_sep": "|\n"}, "data.label_sep"),
                    ({"classes": ["a", "a"]}, "data.classes"), ({"classes": []}, "data.classes"),
                    ({"task": "multi"}, "data.task")]:  # fmt: skip
        with pytest.raises(ImgclfError, match=key):
            DataConfig(**kw)


def _random_matrix(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 8)) < np.array([0.03, 0.06, 0.1, 0.15, 0.25, 0.35, 0.45, 0.6])).astype(np.uint8)


def test_iterative_split_keeps_every_class_proportion_better_than_random():
    y = _random_matrix()
    tr, va = iterative_split(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    total = y.sum(0)
    held = y[va].sum(0)
    assert np.abs(held - 0.2 * total).max() <= 1  # every class within one image of its share
    ours = np.abs(held / total - 0.2).max()
    perm = np.random.default_rng(0).permutation(len(y))[: len(va)]
    assert ours <= 0.03 and ours < np.abs(y[perm].sum(0) / total - 0.2).max()
    empty = y.sum(1) == 0
    assert abs(empty[va].sum() - 0.2 * empty.sum()) <= 1  # the empty label set is stratified too
    assert np.array_equal(va, iterative_split(y, 0.2, seed=0)[1])
    assert not np.array_equal(va, iterative_split(y, 0.2, seed=1)[1])
    assert np.array_equal(stratified_split(y, 0.2, seed=0)[1], va)


def test_iterative_split_gives_rare_classes_a_held_out_positive():
    y = np.zeros((200, 4), np.uint8)
    y[:100, 0] = 1
    y[[3, 150], 1] = 1  # 2 positives (one co-occurring with a frequent class)
    y[[5, 6, 7], 2] = 1  # 3 positives, all with class 0
    y[[10], 3] = 1  # 1 positive: cannot be in both parts
    for seed in range(5):
        tr, va = iterative_split(y, 0.05, seed)
        assert (y[va, :3].sum(0) >= 1).all() and (y[tr, :3].sum(0) >= 1).all()
    tr, va = iterative_split(y, 0.0, seed=0)
    assert len(va) == 0 and len(tr) == 200


def _multi_label_csv(tmp_path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    names = [f"img_{i:03d}.png" for i in range(n)]
    _images(tmp_path / "ml", names)
    pool = ["sky", "tree", "car"]
    cells = {k: "|".join(c for c in pool if rng.random() < 0.4) for k in names}
    return _sets_csv(tmp_path / "ml.csv", cells, prefix="ml/")


def test_prepare_data_splits_multi_label_csv(tmp_path):
    cfg = Config()
    cfg.data.path = str(_multi_label_csv(tmp_path))
    cfg.data.val_split = 0.25
    d = prepare_data(cfg)
    assert d.train.multi_label and d.val.multi_label and d.class_names == ["car", "sky", "tree"]
    assert not set(d.train.items) & set(d.val.items) and len(d.train) + len(d.val) == 40
    assert (d.val.class_counts() >= 1).all()
    cfg.data.val_path = str(make_folder(tmp_path / "f", n_per_class=2, classes=2))
    with pytest.raises(ImgclfError, match=r"f is single-label but the training data .*ml.csv is multi-label"):
        prepare_data(cfg)


def test_prepare_data_needs_one_positive_for_multi_label(tmp_path, imgs):
    cfg = Config()
    cfg.data.path = str(_sets_csv(tmp_path / "empty.csv", {k: "" for k in SETS}))
    with pytest.raises(ImgclfError, match="no class has a readable positive image"):
        prepare_data(cfg)
    cfg.data.path = str(_sets_csv(tmp_path / "one.csv", {k: "dog" if i % 2 else "" for i, k in enumerate(SETS)}))
    d = prepare_data(cfg)  # one class is fine for multi-label
    assert d.class_names == ["dog"] and d.train.labels.shape[1] == 1


def test_multi_split_npz_companion_keeps_the_label_format(tmp_path):
    p = tmp_path / "s.npz"
    rng = np.random.default_rng(0)
    y = (rng.random((20, 3)) < 0.5).astype(np.uint8)
    np.savez(p, train_images=np.zeros((20, 8, 8), np.uint8), train_labels=y, val_images=np.zeros((4, 8, 8), np.uint8),
             val_labels=y[:4], class_names=np.array(["a", "b", "c"]))  # fmt: skip
    s = open_source(p, labels=LabelFormat(classes=("c", "b", "a")))
    val = s.companion("val")
    assert val.multi_label and val.class_names == ["c", "b", "a"] and np.array_equal(val.labels, y[:4, ::-1])


def test_collate_multi_label_gives_float_targets(tmp_path, imgs):
    s = open_source(_sets_csv(tmp_path / "sets.csv", SETS))
    s.bad[2] = "broken"
    ds = ImageDataset(s, lambda img: torch.zeros(3, 4, 4))
    items = [ds[i] for i in range(len(s))]
    assert isinstance(items[2], Skipped)
    b = collate(items)
    assert b.labels.dtype == torch.float32 and b.labels.shape == (5, 3)
    assert b.labels.tolist() == MATRIX[[0, 1, 3, 4, 5]].astype(float).tolist() and len(b.skipped) == 1
    assert collate([items[2]]).labels.shape == (0,)
    single = ImageDataset(open_source(make_folder(tmp_path / "f", n_per_class=1, classes=2)), lambda i: torch.zeros(1))
    assert collate([single[0], single[1]]).labels.tolist() == [0, 1]
