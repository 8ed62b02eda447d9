"""Data sources: ImageFolder, CSV, in-memory arrays (.npz) and the embedded Fashion-MNIST subset.

Every source becomes a ``Samples``: a list of items (file paths, or indices into an image array),
integer labels and the ordered class names. Images are decoded lazily by ``Samples.load``.

Example:
    >>> s = open_source("builtin:fashion-mnist")
    >>> len(s), s.class_names[:2]
    (5000, ['T-shirt/top', 'Trouser'])
"""

from __future__ import annotations

import csv
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImgclfError
from .images import array_to_image, open_image

BUILTIN_PREFIX = "builtin:"
EMBEDDED_DIR = Path(__file__).parent / "embedded"
BUILTIN = {"fashion-mnist": EMBEDDED_DIR / "fashion_mnist_subset.npz", "digits": None}  # digits: scikit-learn
DEFAULT_DATA = "builtin:fashion-mnist"  # what `imgclf train` uses when no data is given


@dataclass
class Samples:
    """A labelled (or unlabelled, label -1) list of images with ordered class names."""

    items: list  # str paths, or int indices into ``arrays``
    labels: np.ndarray  # int64, -1 when unknown
    class_names: list[str]
    name: str  # what the user passed, for messages
    arrays: np.ndarray | None = field(default=None, repr=False)
    other_splits: tuple[str, ...] = ()  # further splits in the same file (multi-split .npz, builtin)
    origin: str = ""  # the spec to open those splits with

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        """A name for item ``i`` in messages and prediction tables."""
        item = self.items[i]
        return f"{self.name}[{item}]" if self.arrays is not None else str(item)

    def load(self, i: int) -> Image.Image:
        """Decode item ``i`` as an RGB image (raises ``BadImage``)."""
        if self.arrays is not None:
            return array_to_image(self.arrays[self.items[i]])
        return open_image(self.items[i])

    def subset(self, idx: np.ndarray | list[int]) -> Samples:
        idx = np.asarray(idx, dtype=np.int64)
        items = [self.items[i] for i in idx]
        return Samples(
            items, self.labels[idx], self.class_names, self.name, self.arrays, self.other_splits, self.origin
        )

    def companion(self, split: str) -> Samples | None:
        """Another split of the same multi-split source (e.g. ``test`` of an .npz), if it has one."""
        return open_source(self.origin, split) if split in self.other_splits else None

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))

    def remap_to(self, class_names: list[str]) -> Samples:
        """Re-index labels to another class order (e.g. a trained run's); unknown classes are an error."""
        if class_names == self.class_names:
            return self
        index = {c: i for i, c in enumerate(class_names)}
        extra = [c for c, n in zip(self.class_names, self.class_counts()) if n and c not in index]
        if extra:
            raise ImgclfError(
                f"{self.name}: classes not known to the model: {', '.join(extra[:5])}"
                f" (model classes: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})"
            )
        lut = np.array([index.get(c, -1) for c in self.class_names], dtype=np.int64)
        labels = np.where(self.labels >= 0, lut[np.maximum(self.labels, 0)], -1)
        return dataclasses.replace(self, labels=labels, class_names=list(class_names))


def open_source(spec: str | Path, split: str = "train") -> Samples:
    """Open labelled data from a folder, CSV, .npz or ``builtin:NAME``.

    ``split`` picks ``{split}_images``/``{split}_labels`` from a multi-split .npz (and the embedded data).
    """
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        name, _, sp = name.partition(":")
        if name not in BUILTIN:
            raise ImgclfError(f"unknown built-in data set '{name}' (known: {', '.join(BUILTIN)})")
        if name == "digits":
            return sklearn_digits()
        s = read_npz(BUILTIN[name], sp or split)
        s.name, s.origin = f"{BUILTIN_PREFIX}{name}:{sp or split}", f"{BUILTIN_PREFIX}{name}"
        return s
    p = Path(spec).expanduser()
    if not p.exists():
        raise ImgclfError(f"data path not found: {p}")
    if p.is_dir():
        return read_image_folder(p)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return read_csv(p)
    if suffix == ".npz":
        return read_npz(p, split)
    raise ImgclfError(f"{p}: unsupported data file (expected a folder, a .csv or a .npz)")


def sklearn_digits() -> Samples:
    """scikit-learn's 1,797 handwritten digits (8x8 grey, UCI; BSD), a real data set that ships in a package.

    Useful as out-of-distribution data for Fashion-MNIST-like models; one split (all images).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)  # values 0..16
    return Samples(list(range(len(images))), d.target.astype(np.int64), [str(i) for i in range(10)],
                   "builtin:digits", images)  # fmt: skip


def open_unlabelled(spec: str | Path, split: str = "test") -> Samples:
    """Images whose labels do not matter (e.g. OOD data): any folder (recursive), a CSV with ``path``,
    an .npz or ``builtin:NAME``."""
    spec = str(spec)
    p = Path(spec).expanduser()
    if spec.startswith(BUILTIN_PREFIX) or p.suffix.lower() == ".npz":
        return open_source(spec, split)
    return scan_inputs([spec])


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _files_under(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and all(_visible(Path(part)) for part in rel.parts):
            out.append(p)
    return out


def read_image_folder(root: Path) -> Samples:
    """One sub-folder per class (sorted names); files at any depth below a class folder belong to it."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _visible(d))
    if not classes:
        raise ImgclfError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    items, labels = [], []
    for i, c in enumerate(classes):
        files = _files_under(root / c)
        if not files:
            raise ImgclfError(f"{root / c}: class folder is empty (add images or remove the folder)")
        items += [str(f) for f in files]
        labels += [i] * len(files)
    return Samples(items, np.asarray(labels, dtype=np.int64), classes, str(root))


def _natural_sorted(labels: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def read_csv(path: Path, need_label: bool = True) -> Samples:
    """A CSV with a header holding ``path`` and ``label`` columns; paths are relative to the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImgclfError(f"{path}: cannot read CSV ({e})") from None
    required = ["path", "label"] if need_label else ["path"]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ImgclfError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}"
            f" (found: {', '.join(columns) or 'no header'}; expected a header 'path,label')"
        )
    if not rows:
        raise ImgclfError(f"{path}: no rows below the header")
    base = path.parent
    items, raw, absent = [], [], []
    for n, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise ImgclfError(f"{path}: row {n} has an empty 'path'")
        p = (base / rel) if not Path(rel).is_absolute() else Path(rel)
        if not p.is_file():
            absent.append(f"row {n}: {rel}")
        items.append(str(p))
        if need_label:
            lab = (row.get("label") or "").strip()
            if not lab:
                raise ImgclfError(f"{path}: row {n} has an empty 'label'")
            raw.append(lab)
    if absent:
        raise ImgclfError(f"{path}: {len(absent)} listed file(s) do not exist, e.g. {'; '.join(absent[:3])}")
    if not need_label:
        return Samples(items, np.full(len(items), -1, dtype=np.int64), [], str(path))
    classes = _natural_sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return Samples(items, np.asarray([index[x] for x in raw], dtype=np.int64), classes, str(path))


def read_npz(path: Path, split: str = "train") -> Samples:
    """Arrays in a .npz: ``images`` (N,H,W[,C] uint8) and ``labels`` (N), or ``{split}_images``/``{split}_labels``.

    Integer labels take names from an optional ``class_names`` array; string labels are sorted.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, pickle refusal, ...
        raise ImgclfError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from None
    ik, lk = ("images", "labels") if "images" in data else (f"{split}_images", f"{split}_labels")
    for k in (ik, lk):
        if k not in data:
            raise ImgclfError(f"{path}: missing array '{k}' (found: {', '.join(sorted(data))})")
    images, labels = _nhwc_uint8(data[ik], path, ik), data[lk]
    splits = {k[: -len("_images")] for k in data if k.endswith("_images") and k[: -len("_images")] + "_labels" in data}
    others = tuple(sorted(splits - {split})) if ik != "images" else ()
    if len(images) != len(labels):
        raise ImgclfError(f"{path}: '{ik}' has {len(images)} images but '{lk}' has {len(labels)} labels")
    if labels.dtype.kind in "iu":
        n = int(labels.max()) + 1 if len(labels) else 0
        names = [str(x) for x in data["class_names"]] if "class_names" in data else [str(i) for i in range(n)]
        if n > len(names) or (len(labels) and labels.min() < 0):
            raise ImgclfError(f"{path}: labels must be in [0, {len(names)}) to match 'class_names'")
        lab = labels.astype(np.int64)
    elif labels.dtype.kind in "US":
        names = _natural_sorted({str(x) for x in labels})
        index = {c: i for i, c in enumerate(names)}
        lab = np.asarray([index[str(x)] for x in labels], dtype=np.int64)
    else:
        raise ImgclfError(f"{path}: '{lk}' must hold integers or strings, not {labels.dtype}")
    return Samples(list(range(len(images))), lab, names, str(path), images, others, str(path))


def _nhwc_uint8(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (1, 3, 4)):
        raise ImgclfError(f"{path}: '{key}' must be N×H×W or N×H×W×C (C = 1, 3, 4), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind != "f":
            raise ImgclfError(f"{path}: '{key}' must be uint8 or float in [0, 1], not {a.dtype}")
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return a


def scan_inputs(inputs: list[str]) -> Samples:
    """Unlabelled inputs for prediction: image files, folders (recursive) and CSVs with a ``path`` column.

    Every file inside a folder is taken, so non-images are reported as skipped rather than silently ignored.
    """
    items: list[str] = []
    for spec in inputs:
        p = Path(spec).expanduser()
        if not p.exists():
            raise ImgclfError(f"input not found: {p}")
        if p.is_dir():
            items += [str(f) for f in _files_under(p)]
        elif p.suffix.lower() == ".csv":
            items += read_csv(p, need_label=False).items
        else:
            items.append(str(p))
    if not items:
        raise ImgclfError(f"no files found in {', '.join(inputs)}")
    return Samples(items, np.full(len(items), -1, dtype=np.int64), [], ", ".join(inputs))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out) with ``fraction`` of every class held out (at least one per class of 2+)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


__all__ = [
    "Samples",
    "open_source",
    "read_csv",
    "read_image_folder",
    "read_npz",
    "scan_inputs",
    "stratified_split",
]
