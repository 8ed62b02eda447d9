"""Data sources: ImageFolder, CSV, a folder with ``labels.csv``, in-memory arrays (.npz) and the embedded
Fashion-MNIST subset.

Every source becomes a ``Samples``: a list of items (file paths, or indices into an image array), labels and
the ordered class names. Single-label data has (N,) int64 class indices (-1: unknown); multi-label data has an
(N, K) uint8 0/1 matrix (a row of zeros is an image with no class). Images are decoded lazily by ``Samples.load``.

Example:
    >>> s = open_source("builtin:fashion-mnist")
    >>> len(s), s.class_names[:2]
    (5000, ['T-shirt/top', 'Trouser'])
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..errors import ImgclfError
from .images import BadImage, DecodePolicy, array_to_image, check_header, open_image, window_stack

BUILTIN_PREFIX = "builtin:"
EMBEDDED_DIR = Path(__file__).parent / "embedded"
BUILTIN = {"fashion-mnist": EMBEDDED_DIR / "fashion_mnist_subset.npz", "digits": None}  # digits: scikit-learn
DEFAULT_DATA = "builtin:fashion-mnist"  # what `imgclf train` uses when no data is given
LABELS_FILE = "labels.csv"  # a folder holding it is read through it (paths relative to the folder)
TASKS = ("auto", "single_label", "multi_label")
COMMON_SEPS = (",", ";", "|", "\t")  # one of these inside a label (other than the separator) is likely a typo


def nfc(name: str) -> str:
    """A class name in Unicode NFC: ``café`` typed (NFC) and from a macOS folder name (NFD) are one class."""
    return unicodedata.normalize("NFC", name)


@dataclass(frozen=True)
class LabelFormat:
    """How labels are read.

    ``task``: ``auto`` (multi-label when the data says so: a ``labels`` column, 0/1 class columns, a 2-D label
    matrix), ``single_label`` (multi-label data is an error) or ``multi_label`` (a ``label`` column is read as
    a label set; single-label sources become one-hot rows). ``classes``: the vocabulary in order (None: the
    labels seen, sorted); a label outside it is an error. ``sep``: the separator inside a label-set cell
    (``dog|grass``). Names are Unicode NFC. ``image_column`` / ``label_column``: the columns of a table source
    (Hugging Face datasets) holding the image and the label (None: detected, see ``imgclf.data.hf``).
    """

    task: Literal["auto", "single_label", "multi_label"] = "auto"
    classes: tuple[str, ...] | None = None
    sep: str = "|"
    image_column: str | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ImgclfError(f"label task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.sep.strip() or "\n" in self.sep or "\r" in self.sep:
            raise ImgclfError(f"label separator must be non-empty, not only spaces, on one line; got {self.sep!r}")
        if self.classes is not None:
            names = tuple(nfc(str(c).strip()) for c in self.classes)
            dup = next((c for i, c in enumerate(names) if c in names[:i]), None)
            if not names or "" in names or dup is not None:
                raise ImgclfError(f"given classes must be non-empty distinct names, got {list(self.classes)}")
            object.__setattr__(self, "classes", names)


def label_format_from_config(data) -> LabelFormat:
    """The label format of a ``config.DataConfig`` (task, classes, label_sep, image_column, label_column)."""
    classes = getattr(data, "classes", None)
    return LabelFormat(getattr(data, "task", "auto"), tuple(classes) if classes is not None else None,
                       getattr(data, "label_sep", "|"), getattr(data, "image_column", None),
                       getattr(data, "label_column", None))  # fmt: skip


@dataclass
class Samples:
    """A labelled (or unlabelled, label -1) list of images with ordered class names.

    ``labels`` is (N,) int64 class indices for single-label data, or an (N, K) uint8 0/1 matrix for multi-label
    data (K = ``len(class_names)``; ``multi_label`` tells which). ``label_format`` is how it was read (companion
    splits are read the same way).

    ``bad`` holds items known to be unreadable before decoding (a broken symlink, a symlink loop, a file
    whose header is not an image or is over the limits): they stay in the list so every consumer reports
    them as skipped through the usual path (``load`` raises ``BadImage``), but splits leave them out.
    ``notes`` are one-line remarks for the user (hidden files ignored, animations read as one frame).

    ``store``: where the items' bytes live when they are not files or ``arrays`` (members of WebDataset tar shards,
    rows of a Hugging Face dataset): an object with ``load(item, decode, source)``, ``header(item, decode,
    source)``, ``describe(item)``, ``identity()`` and ``streaming`` (True: no random access, items are positions
    in a stream that only a streaming loader reads; see ``imgclf.data.wds``).
    """

    items: list  # str paths, or int indices into ``arrays``
    labels: np.ndarray  # (N,) int64, -1 when unknown; or (N, K) uint8 0/1 (multi-label)
    class_names: list[str]
    name: str  # what the user passed, for messages
    arrays: np.ndarray | None = field(default=None, repr=False)
    other_splits: tuple[str, ...] = ()  # further splits in the same file (multi-split .npz, builtin)
    origin: str = ""  # the spec to open those splits with
    decode: DecodePolicy = field(default_factory=DecodePolicy)
    bad: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label_format: LabelFormat = field(default_factory=LabelFormat)
    store: Any = field(default=None, repr=False)

    @property
    def multi_label(self) -> bool:
        """True when ``labels`` is an (N, K) 0/1 matrix (multi-label), False for (N,) class indices."""
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        """A name for item ``i`` in messages and prediction tables."""
        item = self.items[i]
        if self.store is not None:
            return self.store.describe(item)
        return f"{self.name}[{item}]" if self.arrays is not None else str(item)

    def load(self, i: int) -> Image.Image:
        """Decode item ``i`` as an RGB image per ``decode`` (raises ``BadImage``)."""
        if i in self.bad:
            raise BadImage(self.describe(i), self.bad[i])
        if self.arrays is not None:
            return array_to_image(self.arrays[self.items[i]], self.decode, self.describe(i))
        if self.store is not None:
            return self.store.load(self.items[i], self.decode, self.describe(i))
        return open_image(self.items[i], self.decode)

    def subset(self, idx: np.ndarray | list[int]) -> Samples:
        idx = np.asarray(idx, dtype=np.int64)
        bad = {n: self.bad[int(i)] for n, i in enumerate(idx) if int(i) in self.bad}
        return dataclasses.replace(self, items=[self.items[i] for i in idx], labels=self.labels[idx], bad=bad,
                                   notes=list(self.notes))  # fmt: skip

    def companion(self, split: str) -> Samples | None:
        """Another split of the same multi-split source (e.g. ``test`` of an .npz), if it has one."""
        if split not in self.other_splits:
            return None
        return open_source(self.origin, split, self.decode, self.label_format)

    def class_counts(self, usable: bool = False) -> np.ndarray:
        """Images per class, shape (K,) int64 (multi-label: positive images per class); ``usable``: without the
        items known to be unreadable."""
        keep = np.ones(len(self), dtype=bool) if self.multi_label else self.labels >= 0
        if usable and self.bad:
            keep[list(self.bad)] = False
        if self.multi_label:
            return self.labels[keep].sum(0, dtype=np.int64)
        return np.bincount(self.labels[keep], minlength=len(self.class_names))

    def remap_to(self, class_names: list[str]) -> Samples:
        """Re-index labels to another class order (e.g. a trained run's), matching names in Unicode NFC;
        classes with images that are unknown to ``class_names`` are an error. Multi-label: columns are
        reordered by name; target classes absent here become zero columns."""
        if class_names == self.class_names:
            return self
        index = {nfc(c): i for i, c in enumerate(class_names)}
        extra = [c for c, n in zip(self.class_names, self.class_counts()) if n and nfc(c) not in index]
        if extra:
            raise ImgclfError(
                f"{self.name}: classes not known to the model: {', '.join(extra[:5])}"
                f" (model classes: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})"
            )
        if self.multi_label:
            labels = np.zeros((len(self), len(class_names)), dtype=np.uint8)
            for j, c in enumerate(self.class_names):
                if nfc(c) in index:
                    labels[:, index[nfc(c)]] |= self.labels[:, j]
        else:
            lut = np.array([index.get(nfc(c), -1) for c in self.class_names], dtype=np.int64)
            labels = np.where(self.labels >= 0, lut[np.maximum(self.labels, 0)], -1)
        return dataclasses.replace(self, labels=labels, class_names=list(class_names))

    def check_files(self, progress: bool = False, threads: int = 8) -> Samples:
        """Read every file's header (no pixels): non-images, zero-byte files and images over the decode
        limits join ``bad``; animations get a note. Arrays and streams need no (streams: allow no) check; store
        members (tar shards, dataset rows) are checked from their bytes. Returns ``self``."""
        if self.arrays is not None or getattr(self.store, "streaming", False):
            return self
        todo = [i for i in range(len(self.items)) if i not in self.bad]
        store = self.store

        def one(i: int) -> tuple[int, str | None, str | None]:
            try:
                if store is not None:
                    return i, None, store.header(self.items[i], self.decode, self.describe(i))
                return i, None, check_header(self.items[i], self.decode)
            except BadImage as e:
                return i, e.reason, None

        from tqdm.auto import tqdm

        animated = []
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(one, todo, chunksize=64)
            for i, reason, note in tqdm(results, total=len(todo), desc="check files", unit="file",
                                        disable=not progress or len(todo) < 2000, leave=False):  # fmt: skip
                if reason is not None:
                    self.bad[i] = reason
                elif note is not None:
                    animated.append(self.describe(i))
        if animated:
            self.notes.append(f"{len(animated)} animated image(s): the first frame is used (e.g. {animated[0]})")
        return self


def open_source(
    spec: str | Path, split: str = "train", decode: DecodePolicy | None = None, labels: LabelFormat | None = None
) -> Samples:
    """Open labelled data from a folder (class sub-folders, or any layout with a ``labels.csv`` at its root), a
    CSV, an .npz or ``builtin:NAME``, decoded per ``decode``, labels read per ``labels`` (default: auto task,
    inferred classes, separator ``|``).

    ``split`` picks ``{split}_images``/``{split}_labels`` from a multi-split .npz (and the embedded data).
    """
    fmt = labels or LabelFormat()
    s = _as_task(_in_vocabulary(_open(str(spec), split, decode or DecodePolicy(), fmt), fmt), fmt)
    s.label_format = fmt
    return s


def _open(spec: str, split: str, decode: DecodePolicy, fmt: LabelFormat) -> Samples:
    from . import hf, wds

    if wds.is_wds_spec(spec):
        return wds.open_wds(spec, decode, fmt)
    if hf.is_hf_spec(spec):
        return hf.open_hf(spec, split, decode, fmt)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        name, _, sp = name.partition(":")
        if name not in BUILTIN:
            raise ImgclfError(f"unknown built-in data set '{name}' (known: {', '.join(BUILTIN)})")
        if name == "digits":
            return sklearn_digits(decode)
        s = read_npz(BUILTIN[name], sp or split, decode, fmt)
        s.name, s.origin = f"{BUILTIN_PREFIX}{name}:{sp or split}", f"{BUILTIN_PREFIX}{name}"
        return s
    p = Path(spec).expanduser()
    if not p.exists():
        raise ImgclfError(f"data path not found: {p}")
    if p.is_dir():
        return read_labelled_folder(p, decode, fmt) if (p / LABELS_FILE).is_file() else read_image_folder(p, decode)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return read_csv(p, decode=decode, labels=fmt)
    if suffix == ".npz":
        return read_npz(p, split, decode, fmt)
    raise ImgclfError(f"{p}: unsupported data file (expected a folder, a .csv, a .npz, WebDataset .tar shards or a "
                      "Hugging Face dataset: .parquet, .arrow or hf:PATH)")  # fmt: skip


def _in_vocabulary(s: Samples, fmt: LabelFormat) -> Samples:
    """``s`` in the given class order; a class with images that is not in it is an error (CSVs check per row)."""
    if fmt.classes is None or s.class_names == list(fmt.classes):
        return s
    extra = [c for c, n in zip(s.class_names, s.class_counts()) if n and c not in fmt.classes]
    if extra:
        raise ImgclfError(f"{s.name}: class(es) {', '.join(extra[:5])} not in the given classes "
                          f"(--data.classes: {_listing(fmt.classes)})")  # fmt: skip
    return s.remap_to(list(fmt.classes))


def _as_task(s: Samples, fmt: LabelFormat) -> Samples:
    """Single-label data as one-hot rows when the task is multi-label; multi-label data refused for single-label."""
    if fmt.task == "single_label" and s.multi_label:
        raise ImgclfError(f"{s.name}: holds multi-label data but --data.task is single_label (use auto)")
    if fmt.task != "multi_label" or s.multi_label:
        return s
    hot = np.zeros((len(s), len(s.class_names)), dtype=np.uint8)
    known = np.flatnonzero(s.labels >= 0)
    hot[known, s.labels[known]] = 1
    return dataclasses.replace(s, labels=hot)


def _listing(names, n: int = 10) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def sklearn_digits(decode: DecodePolicy | None = None) -> Samples:
    """scikit-learn's 1,797 handwritten digits (8x8 grey, UCI; BSD), a real data set that ships in a package.

    Useful as out-of-distribution data for Fashion-MNIST-like models; one split (all images).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)  # values 0..16
    return Samples(list(range(len(images))), d.target.astype(np.int64), [str(i) for i in range(10)],
                   "builtin:digits", images, decode=decode or DecodePolicy())  # fmt: skip


def open_unlabelled(spec: str | Path, split: str = "test", decode: DecodePolicy | None = None) -> Samples:
    """Images whose labels do not matter (e.g. OOD data): any folder (recursive), a CSV with ``path``,
    an .npz or ``builtin:NAME``."""
    spec = str(spec)
    p = Path(spec).expanduser()
    if spec.startswith(BUILTIN_PREFIX) or p.suffix.lower() == ".npz":
        return open_source(spec, split, decode)
    return scan_inputs([spec], decode)


class Found:
    """What a folder walk found: files, entries it could not read (path -> reason), hidden entries ignored,
    and every folder and file seen (by device and inode), so nothing is read twice through links."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.unreadable: dict[str, str] = {}
        self.hidden = 0
        self.seen: dict[tuple[int, int], str] = {}

    def note(self, where: str) -> list[str]:
        if not self.hidden:
            return []
        return [f"{where}: ignored {self.hidden} hidden file(s)/folder(s) (names starting with '.')"]


def walk_files(root: Path, found: Found | None = None) -> Found:
    """Every file below ``root`` in sorted path order, following symbolic links to folders (as torchvision's
    ImageFolder does; ``Path.rglob`` on Python 3.11 does not enter them), each folder and file once.

    Hidden entries (``.DS_Store``, ``.git/``) are counted, not read. A broken link, a link loop, a folder or
    file reached a second time through a link (``found`` remembers across calls, so across the classes of one
    source), a folder that cannot be listed or a special file is recorded in ``unreadable`` with the reason.
    """
    found = found or Found()
    out: list[Path] = []
    key = _key(root)
    if key in found.seen:
        found.unreadable[str(root)] = f"the same folder as {found.seen[key]} (a link); read once"
        return found
    found.seen[key] = str(root)
    stack: list[tuple[Path, frozenset]] = [(root, frozenset({key}))]
    while stack:
        d, above = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            found.unreadable[str(d)] = f"cannot list folder ({e.strerror or e})"
            continue
        for e in entries:
            if e.name.startswith("."):
                found.hidden += 1
            else:
                _visit(e, above, found, stack, out)
    found.files += sorted(out, key=lambda q: q.parts)
    return found


def _visit(e: os.DirEntry, above: frozenset, found: Found, stack: list, out: list[Path]) -> None:
    p = Path(e.path)
    try:
        is_dir, is_file = e.is_dir(), e.is_file()  # both follow symlinks
        key = _key(p) if is_dir or is_file else None
    except OSError as err:
        found.unreadable[str(p)] = f"cannot read ({err.strerror or err})"
        return
    if key is not None and key in found.seen:
        why = (
            "symlink loop (links to a folder above it)"
            if key in above
            else f"the same {'folder' if is_dir else 'file'} as {found.seen[key]} (a link)"
        )
        found.unreadable[str(p)] = f"{why}; read once"
    elif is_dir:
        found.seen[key] = str(p)  # type: ignore[index]
        stack.append((p, above | {key}))
    elif is_file:
        found.seen[key] = str(p)  # type: ignore[index]
        out.append(p)
    elif e.is_symlink() and not os.path.exists(p):
        found.unreadable[str(p)] = "broken symlink (its target does not exist)"
    else:
        found.unreadable[str(p)] = "not a regular file (device, socket or pipe)"


def _key(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


def read_image_folder(root: Path, decode: DecodePolicy | None = None) -> Samples:
    """One sub-folder per class (sorted names, Unicode NFC: an NFC and an NFD spelling are one class);
    files at any depth below a class folder belong to it, symlinked folders included."""
    dirs: dict[str, list[Path]] = {}
    hidden, loose = 0, []
    for d in sorted(root.iterdir()):
        if d.name.startswith("."):
            hidden += 1
        elif d.is_dir():
            dirs.setdefault(nfc(d.name), []).append(d)
        else:
            loose.append(d.name)
    if not dirs:
        raise ImgclfError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    classes = sorted(dirs)
    items, labels, bad, found = [], [], {}, Found()
    found.hidden = hidden
    found.seen[_key(root)] = str(root)  # a link back to the root would read every class again as this one
    for i, c in enumerate(classes):
        before = len(found.files), set(found.unreadable)
        for d in dirs[c]:
            walk_files(d, found)
        files = found.files[before[0] :]
        new_bad = [k for k in found.unreadable if k not in before[1]]
        if not files and not new_bad:
            raise ImgclfError(f"{dirs[c][0]}: class folder is empty (add images or remove the folder)")
        for k in new_bad:
            bad[len(items)] = found.unreadable[k]
            items.append(k)
            labels.append(i)
        items += [str(f) for f in files]
        labels += [i] * len(files)
    notes = found.note(str(root))
    if loose:
        notes.append(f"{root}: {len(loose)} file(s) directly in the folder belong to no class and are not used "
                     f"(e.g. {loose[0]}); class images go in {root}/<class>/")  # fmt: skip
    return Samples(items, np.asarray(labels, dtype=np.int64), classes, str(root), decode=decode or DecodePolicy(),
                   bad=bad, notes=notes)  # fmt: skip


def _natural_sorted(labels: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _existing(p: Path) -> Path:
    """``p``, or the existing path that differs from it only in Unicode normal form (NFC/NFD), component by
    component: a CSV typed in NFC names files and folders that macOS stored in NFD."""
    if p.exists():
        return p
    q, parts = (Path(p.anchor), p.parts[1:]) if p.is_absolute() else (Path("."), p.parts)
    for part in parts:
        if not (q / part).exists():
            try:
                part = next((c.name for c in q.iterdir() if nfc(c.name) == nfc(part)), part)
            except OSError:
                return p
        q = q / part
    return q if q.exists() else p


def read_csv(
    path: Path, need_label: bool = True, decode: DecodePolicy | None = None, labels: LabelFormat | None = None
) -> Samples:
    """A CSV with a header holding a ``path`` column (relative to the CSV's folder) and labels in one of three
    forms: ``label`` (one class per row), ``labels`` (a label set per row, ``dog|grass`` with separator
    ``labels.sep``; an empty cell is the empty set) or one 0/1 column per class (``path,dog,grass``).

    ``labels.task`` ``auto`` reads a ``labels`` column or 0/1 columns as multi-label (an (N, K) uint8 0/1
    matrix), a ``label`` column as single-label; ``multi_label`` also reads ``label`` as a label set. Names are
    Unicode NFC. Errors name the row (the header is row 1) and the label or column.
    """
    fmt = labels or LabelFormat()
    columns, rows = _csv_rows(path)
    kind, cols = _label_columns(path, columns, rows, fmt) if need_label else ("none", [])
    missing = [c for c, gone in (("path", "path" not in columns), ("label", kind == "missing")) if gone]
    if missing:
        expected = "'path,label'" if fmt.task == "single_label" or not need_label else EXPECTED_HEADERS
        raise ImgclfError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}"
            f" (found: {', '.join(columns) or 'no header'}; expected a header {expected})"
        )
    if not rows:
        raise ImgclfError(f"{path}: no rows below the header")
    decode = decode or DecodePolicy()
    if kind == "none":
        items = _csv_paths(path, rows)
        return Samples(items, np.full(len(items), -1, dtype=np.int64), [], str(path), decode=decode)
    if kind == "single":
        lab, classes = _single_labels(path, rows, fmt)
    elif kind == "set":
        sets = [_label_set(path, n, row.get(cols[0]), fmt.sep) for n, row in _numbered(rows)]
        lab, classes = _multi_hot(path, sets, fmt)
    else:
        lab, classes = _wide_labels(path, rows, cols, fmt)
    return Samples(_csv_paths(path, rows), lab, classes, str(path), decode=decode)


EXPECTED_HEADERS = (
    "'path,label' (one class per row), 'path,labels' (a label set per row: dog|grass)"
    " or 'path,<class1>,<class2>,...' (0/1 cells)"
)


def _csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            return columns, list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImgclfError(f"{path}: cannot read CSV ({e})") from None


def _numbered(rows: list[dict]):
    return enumerate(rows, start=2)  # row numbers as a spreadsheet shows them: the header is row 1


def _csv_paths(path: Path, rows: list[dict]) -> list[str]:
    base = path.parent
    items, absent = [], []
    for n, row in _numbered(rows):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise ImgclfError(f"{path}: row {n} has an empty 'path'")
        p = _existing((base / rel) if not Path(rel).is_absolute() else Path(rel))
        if not p.is_file():
            absent.append(f"row {n}: {rel}")
        items.append(str(p))
    if absent:
        raise ImgclfError(f"{path}: {len(absent)} listed file(s) do not exist, e.g. {'; '.join(absent[:3])}")
    return items


def _label_columns(path: Path, columns: list[str], rows: list[dict], fmt: LabelFormat) -> tuple[str, list[str]]:
    """Which labels the CSV holds: ("single", ["label"]), ("set", [column]), ("wide", class columns) or
    ("missing", [])."""
    one, many = "label" in columns, "labels" in columns
    if fmt.task == "single_label":
        if one:
            return "single", ["label"]
        if many:
            raise ImgclfError(f"{path}: the 'labels' column holds label sets (multi-label) but --data.task is "
                              "single_label; use a 'label' column (one class per row) or --data.task auto")  # fmt: skip
    elif one and many:
        raise ImgclfError(f"{path}: has both a 'label' and a 'labels' column; keep one ('label': one class per row, "
                          "'labels': a label set per row)")  # fmt: skip
    elif many or (one and fmt.task == "multi_label"):
        return "set", ["labels" if many else "label"]
    elif one:
        _refuse_sets_in_label(path, rows, fmt.sep)
        return "single", ["label"]
    wide = _wide_columns(columns, rows)
    if wide and fmt.task == "single_label":
        raise ImgclfError(f"{path}: 0/1 class columns ({_listing(wide, 5)}) are multi-label data but --data.task is "
                          "single_label; use a 'label' column (one class per row) or --data.task auto")  # fmt: skip
    return ("wide", wide) if wide else ("missing", [])


def _refuse_sets_in_label(path: Path, rows: list[dict], sep: str) -> None:
    """A ``label`` column (one class per row) whose cells look like label sets (``red|green``) is most likely a
    multi-label CSV with the column misnamed: an error rather than classes named ``red|green``."""
    for n, row in _numbered(rows):
        cell = (row.get("label") or "").strip()
        if sep in cell:
            raise ImgclfError(f"{path}: row {n}: label {cell!r} looks like a label set; name the column 'labels' "
                              "for multi-label data (or pass --data.task single_label if it is one class)")  # fmt: skip


def _wide_columns(columns: list[str], rows: list[dict]) -> list[str]:
    """Every column but ``path`` when at least one of them holds only 0/1 (a wide multi-label CSV), else [];
    unnamed columns with no values (a trailing comma in the header) are left out."""
    others = [c for c in columns if c != "path" and (c or any((r.get(c) or "").strip() for r in rows))]
    binary = [c for c in others if all((r.get(c) or "").strip() in ("0", "1") for r in rows)]
    return others if binary else []


def _single_labels(path: Path, rows: list[dict], fmt: LabelFormat) -> tuple[np.ndarray, list[str]]:
    raw = []
    for n, row in _numbered(rows):
        lab = nfc((row.get("label") or "").strip())
        if not lab:
            raise ImgclfError(f"{path}: row {n} has an empty 'label'")
        raw.append(lab)
    classes = list(fmt.classes) if fmt.classes is not None else _natural_sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    for n, lab in enumerate(raw, start=2):
        if lab not in index:
            raise _not_given(path, n, lab, classes)
    return np.asarray([index[x] for x in raw], dtype=np.int64), classes


def _label_set(path: Path, n: int, cell: str | None, sep: str) -> list[str]:
    """The labels of one label-set cell (``dog|grass``; empty: none), each stripped and in Unicode NFC."""
    text = (cell or "").strip()
    if not text:
        return []
    tokens = [nfc(t.strip()) for t in text.split(sep)]
    for i, t in enumerate(tokens):
        if not t:
            raise ImgclfError(f"{path}: row {n}: empty label in {text!r} (a doubled, leading or trailing {sep!r})")
        other = next((c for c in COMMON_SEPS if c != sep and c in t), None)
        if other is not None:
            raise ImgclfError(f"{path}: row {n}: label {t!r} contains {other!r}: the separator looks like {other!r}, "
                              f"not {sep!r} (pass --data.label_sep {_shell(other)})")  # fmt: skip
        if t in tokens[:i]:
            raise ImgclfError(f"{path}: row {n}: label '{t}' appears twice")
    return tokens


def _shell(text: str) -> str:
    """``text`` quoted for a shell command line (a tab as ``$'\\t'``)."""
    return "$'\\t'" if text == "\t" else repr(text)


def _multi_hot(path: Path, sets: list[list[str]], fmt: LabelFormat) -> tuple[np.ndarray, list[str]]:
    """An (N, K) uint8 0/1 matrix from label sets, K = the given classes or the sorted labels seen."""
    classes = list(fmt.classes) if fmt.classes is not None else _natural_sorted({t for s in sets for t in s})
    index = {c: i for i, c in enumerate(classes)}
    hot = np.zeros((len(sets), len(classes)), dtype=np.uint8)
    for r, labels in enumerate(sets):
        for t in labels:
            if t not in index:
                raise _not_given(path, r + 2, t, classes)
            hot[r, index[t]] = 1
    return hot, classes


def _wide_labels(path: Path, rows: list[dict], cols: list[str], fmt: LabelFormat) -> tuple[np.ndarray, list[str]]:
    """The 0/1 class columns as an (N, K) uint8 matrix, in column order or the given classes' order."""
    names = [nfc(c) for c in cols]
    dup = next((c for i, c in enumerate(names) if c in names[:i]), None)
    if dup is not None:
        raise ImgclfError(f"{path}: class column '{dup}' appears twice in the header")
    cells = np.array([[(row.get(c) or "").strip() for c in cols] for row in rows], dtype=str).reshape(len(rows), -1)
    ok = (cells == "0") | (cells == "1")
    if not ok.all():
        r, j = np.argwhere(~ok)[0]
        raise ImgclfError(f"{path}: row {r + 2}, column '{cols[j]}': {str(cells[r, j])!r} is not 0 or 1 "
                          "(class columns hold 0 or 1)")  # fmt: skip
    hot = (cells == "1").astype(np.uint8)
    if fmt.classes is None:
        return hot, names
    index = {c: i for i, c in enumerate(fmt.classes)}
    out = np.zeros((len(rows), len(index)), dtype=np.uint8)
    for j, c in enumerate(names):
        if c in index:
            out[:, index[c]] = hot[:, j]
        elif hot[:, j].any():
            raise _not_given(path, int(np.argmax(hot[:, j])) + 2, c, list(fmt.classes))
    return out, list(fmt.classes)


def _not_given(path: Path, n: int, label: str, classes: list[str]) -> ImgclfError:
    return ImgclfError(f"{path}: row {n}: label '{label}' is not one of the given classes "
                       f"(--data.classes: {_listing(classes)})")  # fmt: skip


def read_labelled_folder(root: Path, decode: DecodePolicy | None = None, labels: LabelFormat | None = None) -> Samples:
    """A folder of images in any layout with ``labels.csv`` at its root: the CSV (any form ``read_csv`` takes,
    paths relative to the folder) gives the images and labels. Image files it does not list are not used; a
    note says how many."""
    s = read_csv(root / LABELS_FILE, decode=decode, labels=labels)
    found = walk_files(root)
    listed = {os.path.abspath(p) for p in s.items}
    unlisted = [f for f in found.files if f.suffix.lower() in _image_suffixes() and os.path.abspath(f) not in listed]
    s.name, s.notes = str(root), s.notes + found.note(str(root))
    if unlisted:
        s.notes.append(f"{root}: {len(unlisted)} image file(s) not listed in {LABELS_FILE} are not used "
                       f"(e.g. {unlisted[0].relative_to(root)})")  # fmt: skip
    return s


@lru_cache(maxsize=1)
def _image_suffixes() -> frozenset[str]:
    """File name endings of the image formats Pillow can open (``.png``, ``.jpg``, ...)."""
    return frozenset(e for e, f in Image.registered_extensions().items() if f in Image.OPEN)


def read_npz(
    path: Path, split: str = "train", decode: DecodePolicy | None = None, labels_format: LabelFormat | None = None
) -> Samples:
    """Arrays in a .npz: ``images`` (N,H,W[,C]) and ``labels`` (N) or (N, K), or ``{split}_images``/
    ``{split}_labels``. An (N, K) ``labels`` holding only 0/1 (integers or bools) is multi-label; its names come
    from ``class_names`` (length K) or are "0".."K-1".

    Images may be uint8, 16-bit or 32-bit integers, bool or float; all but uint8 are windowed to 0-255 by
    ``decode.pixel_range`` (``auto``: integers by their type's range, floats by the range of the whole array:
    [0, 1] or [0, 255]). Integer labels take names from an optional ``class_names`` array; string labels are
    sorted. Names are Unicode NFC.
    """
    decode = decode or DecodePolicy()
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, pickle refusal, ...
        raise ImgclfError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from None
    ik, lk = ("images", "labels") if "images" in data else (f"{split}_images", f"{split}_labels")
    for k in (ik, lk):
        if k not in data:
            raise ImgclfError(f"{path}: missing array '{k}' (found: {', '.join(sorted(data))})")
    images, labels = _nhwc_uint8(data[ik], path, ik, decode), data[lk]
    splits = {k[: -len("_images")] for k in data if k.endswith("_images") and k[: -len("_images")] + "_labels" in data}
    others = tuple(sorted(splits - {split})) if ik != "images" else ()
    if len(images) != len(labels):
        raise ImgclfError(f"{path}: '{ik}' has {len(images)} images but '{lk}' has {len(labels)} labels")
    if labels.ndim == 2:
        names = _matrix_names(path, lk, labels, data, labels_format or LabelFormat())
        lab = labels.astype(np.uint8)
    elif labels.ndim != 1:
        raise ImgclfError(f"{path}: '{lk}' must be (N,) class labels or an (N, K) 0/1 matrix, got shape {labels.shape}")
    elif labels.dtype.kind in "iu":
        n = int(labels.max()) + 1 if len(labels) else 0
        names = [nfc(str(x)) for x in data["class_names"]] if "class_names" in data else [str(i) for i in range(n)]
        if n > len(names) or (len(labels) and labels.min() < 0):
            raise ImgclfError(f"{path}: labels must be in [0, {len(names)}) to match 'class_names'")
        if len(set(names)) < len(names):
            raise ImgclfError(f"{path}: 'class_names' repeats a name (after Unicode NFC normalisation)")
        lab = labels.astype(np.int64)
    elif labels.dtype.kind in "US":
        strs = [nfc(str(x)) for x in labels]
        names = _natural_sorted(set(strs))
        index = {c: i for i, c in enumerate(names)}
        lab = np.asarray([index[x] for x in strs], dtype=np.int64)
    else:
        raise ImgclfError(f"{path}: '{lk}' must hold integers or strings, not {labels.dtype}")
    return Samples(list(range(len(images))), lab, names, str(path), images, others, str(path), decode)


def _matrix_names(path: Path, key: str, labels: np.ndarray, data: dict, fmt: LabelFormat) -> list[str]:
    """The class names of an (N, K) multi-label matrix, after checking it holds only 0/1."""
    if labels.dtype.kind not in "iub":
        raise ImgclfError(f"{path}: '{key}' is a 2-D multi-label matrix and must hold 0/1 integers or booleans, "
                          f"not {labels.dtype}")  # fmt: skip
    if not np.isin(labels, (0, 1)).all():
        bad = labels[~np.isin(labels, (0, 1))].flat[0]
        raise ImgclfError(f"{path}: '{key}' is a 2-D multi-label matrix and must hold only 0 and 1 (found {bad})")
    k = labels.shape[1]
    names = [nfc(str(x)) for x in data["class_names"]] if "class_names" in data else [str(i) for i in range(k)]
    if len(names) != k:
        raise ImgclfError(f"{path}: 'class_names' has {len(names)} names but '{key}' has {k} columns")
    if len(set(names)) < len(names):
        raise ImgclfError(f"{path}: 'class_names' repeats a name (after Unicode NFC normalisation)")
    if fmt.task == "single_label":
        raise ImgclfError(f"{path}: '{key}' is a 2-D multi-label matrix but --data.task is single_label (use auto)")
    return names


def _nhwc_uint8(a: np.ndarray, path: Path, key: str, decode: DecodePolicy) -> np.ndarray:
    if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (1, 3, 4)):
        raise ImgclfError(f"{path}: '{key}' must be N×H×W or N×H×W×C (C = 1, 3, 4), got shape {a.shape}")
    if a.dtype.kind not in "uifb":
        raise ImgclfError(f"{path}: '{key}' must hold numbers (uint8, uint16, int, float or bool), not {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImgclfError(f"{path}: '{key}' holds NaN or infinite pixels")
    try:
        return window_stack(a, decode.pixel_range, f"{path}:{key}")
    except BadImage as e:
        raise ImgclfError(f"{path}: '{key}': {e.reason}") from None


def scan_inputs(inputs: list[str], decode: DecodePolicy | None = None) -> Samples:
    """Unlabelled inputs for prediction: image files, folders (recursive, symlinks followed) and CSVs with a
    ``path`` column.

    Every file inside a folder is taken, so non-images are reported as skipped rather than silently ignored;
    so are broken links, link loops and folders that cannot be listed. WebDataset shards and Hugging Face datasets
    (``imgclf.data.wds`` / ``hf`` specs) are read as one input on their own, their labels ignored.
    """
    from . import hf, wds

    stores = [s for s in inputs if wds.is_wds_spec(str(s)) or hf.is_hf_spec(str(s))]
    if stores:
        if len(inputs) > 1:
            raise ImgclfError(f"{stores[0]}: WebDataset shards or a Hugging Face dataset are predicted on their own; "
                              "give them as the only input")  # fmt: skip
        spec, fmt = str(stores[0]), LabelFormat()
        if wds.is_wds_spec(spec):
            return wds.open_wds(spec, decode or DecodePolicy(), fmt, need_label=False)
        return hf.open_hf(spec, "test", decode or DecodePolicy(), fmt, need_label=False)
    items: list[str] = []
    bad: dict[int, str] = {}
    notes: list[str] = []
    for spec in inputs:
        p = Path(spec).expanduser()
        if not p.exists() and not p.is_symlink():
            raise ImgclfError(f"input not found: {p}")
        if p.is_dir():
            found = walk_files(p)
            for k, why in found.unreadable.items():
                bad[len(items)] = why
                items.append(k)
            items += [str(f) for f in found.files]
            notes += found.note(str(p))
        elif p.suffix.lower() == ".csv":
            items += read_csv(p, need_label=False).items
        else:
            items.append(str(p))
    if not items:
        raise ImgclfError(f"no files found in {', '.join(inputs)}")
    return Samples(items, np.full(len(items), -1, dtype=np.int64), [], ", ".join(inputs),
                   decode=decode or DecodePolicy(), bad=bad, notes=notes)  # fmt: skip


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out) with ``fraction`` of every class held out (at least one per class of 2+).

    (N,) class indices split class by class; an (N, K) multi-label matrix goes to ``iterative_split``.
    """
    if labels.ndim == 2:
        return iterative_split(labels, fraction, seed)
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


def iterative_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out) of an (N, K) 0/1 matrix with about ``fraction`` of every class's positives
    held out, by iterative stratification; deterministic for a seed.

    The empty label set counts as one more label, so images with no class are spread too. When ``fraction`` > 0,
    every label with 2+ positives has at least one in each part (as ``stratified_split`` guarantees per class).
    """
    # Iterative stratification: Sechidis, Tsoumakas & Vlahavas (2011), "On the Stratification of Multi-Label
    # Data", ECML PKDD, Algorithm 1, for two folds. Written here because scikit-multilearn, its usual
    # implementation, is no longer maintained. Take the label with the fewest positives left; give each of its
    # images to the part that still wants most of that label (ties: most images wanted, then at random).
    y = np.asarray(labels).astype(bool)
    y = np.concatenate([y, ~y.any(axis=1, keepdims=True)], axis=1)  # the empty set as a pseudo-label
    n, total = len(y), y.sum(axis=0)
    if fraction <= 0 or n == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = fraction * total
    held = np.where(total >= 2, np.clip(held, 1, np.maximum(total - 1, 1)), held)  # one each side for 2+
    want_label = np.stack([held, total - held])  # (2, K+1): part 0 held out, part 1 train
    want = np.array([fraction * n, (1 - fraction) * n])
    part, left = np.full(n, -1), total.copy()
    while (left > 0).any():
        fewest = np.flatnonzero(left == left[left > 0].min())
        lab = fewest[rng.integers(len(fewest))]
        for i in rng.permutation(np.flatnonzero((part < 0) & y[:, lab])):
            best = np.flatnonzero(want_label[:, lab] == want_label[:, lab].max())
            best = best[want[best] == want[best].max()]
            j = best[rng.integers(len(best))]
            part[i], want[j], left = j, want[j] - 1, left - y[i]
            want_label[j] -= y[i]
    for j in (0, 1):
        _ensure_positive(y, part, j, total)
    return np.flatnonzero(part == 1), np.flatnonzero(part == 0)


def _ensure_positive(y: np.ndarray, part: np.ndarray, j: int, total: np.ndarray) -> None:
    """Move one image into part ``j`` for each label of 2+ positives that has none there, preferring images
    whose move leaves every one of their labels a positive in the other part, then images with fewer labels."""
    for lab in np.argsort(total, kind="stable"):
        if total[lab] < 2 or y[part == j, lab].any():
            continue
        cand = np.flatnonzero((part != j) & y[:, lab])
        risky = (y[part != j].sum(axis=0) <= 1) & (total >= 2)  # labels the move could take out of the other part
        cost = (y[cand] & risky).any(axis=1) * y.shape[1] + y[cand].sum(axis=1)
        part[cand[np.argmin(cost)]] = j


__all__ = [
    "Samples",
    "open_source",
    "LabelFormat",
    "iterative_split",
    "label_format_from_config",
    "read_csv",
    "read_image_folder",
    "read_labelled_folder",
    "read_npz",
    "scan_inputs",
    "stratified_split",
]
