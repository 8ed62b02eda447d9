"""Hugging Face ``datasets`` as a data source: a random-access ``Samples`` over a dataset's rows.

**Specs.** ``hf:PATH`` for local data: a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), a
folder ``datasets.load_dataset`` reads (parquet or arrow files, an ``imagefolder`` with or without
``metadata.csv``), a ``.parquet`` or ``.arrow`` file; ``hf:user/name`` for the Hub (``load_dataset``, online; a path
that exists locally wins). Without the prefix, ``.parquet`` / ``.arrow`` files and ``save_to_disk`` folders are
recognised too (a plain class-folder tree stays imgclf's own ImageFolder reader).

**Splits.** From a ``DatasetDict``, ``train`` is ``train``; ``val`` is ``validation``, ``val``, ``valid`` or
``dev``; ``test`` is ``test``: the other splits are companions, so ``--data hf:dir`` trains on ``train`` and
validates on ``validation`` when it exists (else the stratified split), as a multi-split .npz does. A dataset with
one split uses it for ``train``.

**Columns.** The image column is ``data.image_column``, else the one column of the ``Image`` feature (none, or
several: an error listing the columns). Images are read as their stored bytes (``Image(decode=False)``) and decoded
by ``images.decode_image``: EXIF orientation, bit depth, transparency and the size limits are the same as for the
same file on disk (``datasets``' own decoding would differ: no EXIF transpose, no alpha compositing, 16-bit
clipped); a row that holds a file path instead of bytes is opened as that file. The label column is
``data.label_column``, else ``label`` / ``labels``, else the one ``ClassLabel`` (or list of ``ClassLabel``) column.
A ``ClassLabel`` gives the class names (its integers index them; ``-1``, the Hub's "no label", is an error naming
the row); strings are class names (sorted); integers without names are named ``"0"``..``"max"``; a list column is
a label set per row (multi-label). The labels contract is ``wds.resolve_labels``, shared with WebDataset shards.

Example:
    >>> import datasets
    >>> feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    >>> from PIL import Image
    >>> ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "label": [1, 0]}, features=feats)
    >>> s = samples_from_dataset(ds, "demo")
    >>> s.labels.tolist(), s.class_names, s.load(0).size
    ([1, 0], ['cat', 'dog'], (4, 4))
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImgclfError, first_line
from .images import DecodePolicy, check_header, decode_image, open_image
from .sources import LabelFormat, Samples, nfc

PREFIX = "hf:"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
LABEL_NAMES = ("label", "labels")


def is_hf_spec(spec: str) -> bool:
    """True for ``hf:...``, a ``.parquet`` / ``.arrow`` file, or a folder written by ``save_to_disk``."""
    if spec.startswith(PREFIX):
        return True
    p = Path(spec).expanduser()
    if p.is_file():
        return p.suffix.lower() in (".parquet", ".arrow")
    return p.is_dir() and _saved(p)


def _saved(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def open_hf(spec: str, split: str, decode: DecodePolicy, fmt: LabelFormat, need_label: bool = True) -> Samples:
    """The ``split`` of the dataset ``spec`` names as ``Samples`` (see the module docstring); ``ImgclfError`` for a
    dataset that cannot be loaded or has no image column, a label column that cannot be found, a bad label.
    ``need_label`` False (prediction inputs): no label column is read; labels are all -1."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    from .wds import require

    require("datasets", f"{body}: reading a Hugging Face dataset")
    obj = _load(body)
    ds, others = _pick_split(obj, split, body)
    s = samples_from_dataset(ds, body, decode, fmt, need_label)
    s.other_splits, s.origin = others, f"{PREFIX}{body}"
    return s


def _load(body: str):
    import datasets

    p = Path(body).expanduser()
    try:
        if p.is_dir() and _saved(p):
            return datasets.load_from_disk(str(p))
        if p.is_file() and p.suffix.lower() == ".arrow":
            return datasets.Dataset.from_file(str(p))
        if p.is_file() and p.suffix.lower() == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(p))
        if p.exists():
            return datasets.load_dataset(str(p))
        if body.count("/") != 1 or body.startswith((".", "/", "~")):
            raise ImgclfError(f"{body}: no such dataset folder or file (a Hub dataset is named hf:user/name)")
        return datasets.load_dataset(body)  # the Hub (needs the network)
    except ImgclfError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ...)
        why = f"{type(e).__name__}: {first_line(e)}"
        raise ImgclfError(f"{body}: cannot load the Hugging Face dataset ({why})") from None


def _pick_split(obj, split: str, body: str) -> tuple[Any, tuple[str, ...]]:
    """The dataset of ``split`` (imgclf's name: train/val/test) and the other imgclf splits the dict has."""
    import datasets

    if not isinstance(obj, (datasets.DatasetDict, dict)):
        return obj, ()
    have = {ours: next((n for n in names if n in obj), None) for ours, names in SPLIT_NAMES.items()}
    if have.get(split) is None and len(obj) == 1:  # one split: it is what was asked for
        have = {split: next(iter(obj))}
    if have.get(split) is None:
        raise ImgclfError(f"{body}: no '{split}' split (splits: {', '.join(obj)}; train, validation/val and test "
                          "are read)")  # fmt: skip
    others = tuple(k for k, v in have.items() if v is not None and k != split)
    return obj[have[split]], others


def samples_from_dataset(ds, name: str, decode: DecodePolicy | None = None, fmt: LabelFormat | None = None,
                         need_label: bool = True) -> Samples:  # fmt: skip
    """A ``datasets.Dataset`` as ``Samples``: items are row numbers, images decoded through ``DatasetStore``."""
    import datasets

    fmt = fmt or LabelFormat()
    image = _image_column(ds, fmt.image_column, name)
    store = DatasetStore(ds.select_columns([image]).cast_column(image, datasets.Image(decode=False)), image, name)
    if not need_label:
        return Samples(list(range(len(ds))), np.full(len(ds), -1, dtype=np.int64), [], name,
                       decode=decode or DecodePolicy(), store=store)  # fmt: skip
    label = _label_column(ds, fmt.label_column, image, name)
    feature = ds.features[label]
    inner = _inner(feature)
    names = list(inner.names) if isinstance(inner, datasets.ClassLabel) else None
    if names is None and fmt.classes is not None and _holds_ints(inner):
        names = list(fmt.classes)
    where = lambda n: f"{name}: row {n}, column '{label}'"  # noqa: E731
    raw = [[_norm(v, where(n)) for v in r] if isinstance(r, list) else _norm(r, where(n))
           for n, r in enumerate(ds.data.column(label).to_pylist())]  # fmt: skip
    from .wds import resolve_labels

    labels, classes = resolve_labels(raw, names, where, name)
    return Samples(list(range(len(ds))), labels, classes, name, decode=decode or DecodePolicy(), store=store)


def _norm(v: Any, where: str) -> int | str:
    """A class index or an NFC class name; ``None``, ``-1`` (the Hub's "no label") and empty names are errors."""
    if v is None or (isinstance(v, int) and v < 0) or (isinstance(v, str) and not v.strip()):
        raise ImgclfError(f"{where}: no label ({v!r})")
    if isinstance(v, (bool, float)) or not isinstance(v, (int, str)):
        raise ImgclfError(f"{where}: a label must be a class index or a class name, got {v!r}")
    return v if isinstance(v, int) else nfc(v.strip())


def _inner(feature):
    """The element feature of a list column (``List``, ``Sequence``, ``LargeList``), else ``feature``."""
    return getattr(feature, "feature", feature)


def _holds_ints(feature) -> bool:
    return getattr(feature, "dtype", "").startswith(("int", "uint"))


def _image_column(ds, given: str | None, name: str) -> str:
    import datasets

    cols = ", ".join(f"{c} ({type(f).__name__})" for c, f in ds.features.items())
    if given is not None:
        if given not in ds.features:
            raise ImgclfError(f"{name}: no column '{given}' (--data.image_column; columns: {cols})")
        if not isinstance(ds.features[given], datasets.Image):
            raise ImgclfError(f"{name}: column '{given}' is not an Image feature ({cols})")
        return given
    found = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if len(found) != 1:
        what = "no image column" if not found else f"several image columns ({', '.join(found)})"
        raise ImgclfError(f"{name}: {what}; name one with --data.image_column (columns: {cols})")
    return found[0]


def _label_column(ds, given: str | None, image: str, name: str) -> str:
    import datasets

    cols = [c for c in ds.features if c != image]
    if given is not None:
        if given not in ds.features:
            raise ImgclfError(f"{name}: no column '{given}' (--data.label_column; columns: {', '.join(cols)})")
        return given
    named = [c for c in LABEL_NAMES if c in ds.features]
    if len(named) == 1:
        return named[0]
    classy = [c for c in cols if isinstance(_inner(ds.features[c]), datasets.ClassLabel)]
    if len(classy) == 1 and not named:
        return classy[0]
    raise ImgclfError(f"{name}: cannot tell the label column (columns: {', '.join(cols) or 'none'}); name it with "
                      "--data.label_column")  # fmt: skip


class DatasetStore:
    """Rows of a ``datasets.Dataset`` (image column only, undecoded) read by index."""

    streaming = False

    def __init__(self, ds, column: str, name: str):
        self.ds, self.column, self.name = ds, column, name

    def read(self, row: int) -> tuple[bytes | None, str | None]:
        cell = self.ds[int(row)][self.column]
        if cell is None:
            return None, None
        return cell.get("bytes"), cell.get("path")

    def raw(self, row: int) -> tuple[bytes, str]:
        """The row's encoded image (read from its file when the row holds a path) and a name for its extension."""
        data, path = self.read(row)
        if data is None and path:
            return Path(path).read_bytes(), path
        return data or b"", path or self.describe(row)

    def load(self, row: int, decode: DecodePolicy, source: str):
        data, path = self.read(row)
        if data is None and path:
            return open_image(path, decode)
        return decode_image(data or b"", source, decode, formats=None)

    def header(self, row: int, decode: DecodePolicy, source: str) -> str | None:
        data, path = self.read(row)
        if data is None and path:
            return check_header(path, decode)
        return check_header(source, decode, data or b"")

    def describe(self, row: int) -> str:
        return f"{self.name}[{row}]"

    def identity(self) -> str:
        """The dataset's fingerprint (``datasets`` changes it with the content) and length."""
        return hashlib.sha256(f"{self.ds._fingerprint}|{len(self.ds)}".encode()).hexdigest()


__all__ = ["DatasetStore", "is_hf_spec", "open_hf", "samples_from_dataset"]
