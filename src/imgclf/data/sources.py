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
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImgclfError
from .images import BadImage, DecodePolicy, array_to_image, check_header, open_image, window_stack

BUILTIN_PREFIX = "builtin:"
EMBEDDED_DIR = Path(__file__).parent / "embedded"
BUILTIN = {"fashion-mnist": EMBEDDED_DIR / "fashion_mnist_subset.npz", "digits": None}  # digits: scikit-learn
DEFAULT_DATA = "builtin:fashion-mnist"  # what `imgclf train` uses when no data is given


def nfc(name: str) -> str:
    """A class name in Unicode NFC: ``café`` typed (NFC) and from a macOS folder name (NFD) are one class."""
    return unicodedata.normalize("NFC", name)


@dataclass
class Samples:
    """A labelled (or unlabelled, label -1) list of images with ordered class names.

    ``bad`` holds items known to be unreadable before decoding (a broken symlink, a symlink loop, a file
    whose header is not an image or is over the limits): they stay in the list so every consumer reports
    them as skipped through the usual path (``load`` raises ``BadImage``), but splits leave them out.
    ``notes`` are one-line remarks for the user (hidden files ignored, animations read as one frame).
    """

    items: list  # str paths, or int indices into ``arrays``
    labels: np.ndarray  # int64, -1 when unknown
    class_names: list[str]
    name: str  # what the user passed, for messages
    arrays: np.ndarray | None = field(default=None, repr=False)
    other_splits: tuple[str, ...] = ()  # further splits in the same file (multi-split .npz, builtin)
    origin: str = ""  # the spec to open those splits with
    decode: DecodePolicy = field(default_factory=DecodePolicy)
    bad: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        """A name for item ``i`` in messages and prediction tables."""
        item = self.items[i]
        return f"{self.name}[{item}]" if self.arrays is not None else str(item)

    def load(self, i: int) -> Image.Image:
        """Decode item ``i`` as an RGB image per ``decode`` (raises ``BadImage``)."""
        if i in self.bad:
            raise BadImage(self.describe(i), self.bad[i])
        if self.arrays is not None:
            return array_to_image(self.arrays[self.items[i]], self.decode, self.describe(i))
        return open_image(self.items[i], self.decode)

    def subset(self, idx: np.ndarray | list[int]) -> Samples:
        idx = np.asarray(idx, dtype=np.int64)
        bad = {n: self.bad[int(i)] for n, i in enumerate(idx) if int(i) in self.bad}
        return dataclasses.replace(self, items=[self.items[i] for i in idx], labels=self.labels[idx], bad=bad,
                                   notes=list(self.notes))  # fmt: skip

    def companion(self, split: str) -> Samples | None:
        """Another split of the same multi-split source (e.g. ``test`` of an .npz), if it has one."""
        return open_source(self.origin, split, self.decode) if split in self.other_splits else None

    def class_counts(self, usable: bool = False) -> np.ndarray:
        """Images per class (``usable``: without the items known to be unreadable)."""
        keep = self.labels >= 0
        if usable and self.bad:
            keep[list(self.bad)] = False
        return np.bincount(self.labels[keep], minlength=len(self.class_names))

    def remap_to(self, class_names: list[str]) -> Samples:
        """Re-index labels to another class order (e.g. a trained run's), matching names in Unicode NFC;
        unknown classes are an error."""
        if class_names == self.class_names:
            return self
        index = {nfc(c): i for i, c in enumerate(class_names)}
        extra = [c for c, n in zip(self.class_names, self.class_counts()) if n and nfc(c) not in index]
        if extra:
            raise ImgclfError(
                f"{self.name}: classes not known to the model: {', '.join(extra[:5])}"
                f" (model classes: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})"
            )
        lut = np.array([index.get(nfc(c), -1) for c in self.class_names], dtype=np.int64)
        labels = np.where(self.labels >= 0, lut[np.maximum(self.labels, 0)], -1)
        return dataclasses.replace(self, labels=labels, class_names=list(class_names))

    def check_files(self, progress: bool = False, threads: int = 8) -> Samples:
        """Read every file's header (no pixels): non-images, zero-byte files and images over the decode
        limits join ``bad``; animations get a note. Arrays need no check. Returns ``self``."""
        if self.arrays is not None:
            return self
        todo = [i for i in range(len(self.items)) if i not in self.bad]

        def one(i: int) -> tuple[int, str | None, str | None]:
            try:
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


def open_source(spec: str | Path, split: str = "train", decode: DecodePolicy | None = None) -> Samples:
    """Open labelled data from a folder, CSV, .npz or ``builtin:NAME``, decoded per ``decode``.

    ``split`` picks ``{split}_images``/``{split}_labels`` from a multi-split .npz (and the embedded data).
    """
    spec, decode = str(spec), decode or DecodePolicy()
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        name, _, sp = name.partition(":")
        if name not in BUILTIN:
            raise ImgclfError(f"unknown built-in data set '{name}' (known: {', '.join(BUILTIN)})")
        if name == "digits":
            return sklearn_digits(decode)
        s = read_npz(BUILTIN[name], sp or split, decode)
        s.name, s.origin = f"{BUILTIN_PREFIX}{name}:{sp or split}", f"{BUILTIN_PREFIX}{name}"
        return s
    p = Path(spec).expanduser()
    if not p.exists():
        raise ImgclfError(f"data path not found: {p}")
    if p.is_dir():
        return read_image_folder(p, decode)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return read_csv(p, decode=decode)
    if suffix == ".npz":
        return read_npz(p, split, decode)
    raise ImgclfError(f"{p}: unsupported data file (expected a folder, a .csv or a .npz)")


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


def read_csv(path: Path, need_label: bool = True, decode: DecodePolicy | None = None) -> Samples:
    """A CSV with a header holding ``path`` and ``label`` columns; paths are relative to the CSV's folder.
    Labels are compared in Unicode NFC."""
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
        p = _existing((base / rel) if not Path(rel).is_absolute() else Path(rel))
        if not p.is_file():
            absent.append(f"row {n}: {rel}")
        items.append(str(p))
        if need_label:
            lab = nfc((row.get("label") or "").strip())
            if not lab:
                raise ImgclfError(f"{path}: row {n} has an empty 'label'")
            raw.append(lab)
    if absent:
        raise ImgclfError(f"{path}: {len(absent)} listed file(s) do not exist, e.g. {'; '.join(absent[:3])}")
    decode = decode or DecodePolicy()
    if not need_label:
        return Samples(items, np.full(len(items), -1, dtype=np.int64), [], str(path), decode=decode)
    classes = _natural_sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return Samples(items, np.asarray([index[x] for x in raw], dtype=np.int64), classes, str(path), decode=decode)


def read_npz(path: Path, split: str = "train", decode: DecodePolicy | None = None) -> Samples:
    """Arrays in a .npz: ``images`` (N,H,W[,C]) and ``labels`` (N), or ``{split}_images``/``{split}_labels``.

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
    if labels.dtype.kind in "iu":
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
    so are broken links, link loops and folders that cannot be listed.
    """
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
