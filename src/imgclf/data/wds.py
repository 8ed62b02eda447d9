"""WebDataset tar shards as a data source: local shards indexed into a random-access ``Samples``, URL lists
streamed by rank and worker.

**Which spec is a WebDataset.** ``wds:SPEC`` always; otherwise a ``.tar`` file, a brace pattern
(``shards/train-{000..009}.tar``), several specs joined by ``::``, a folder holding ``.tar`` files and neither
sub-folders nor images (or an imgclf ``dataset.json``), or a URL (``https://.../train-{000..009}.tar``, ``file://...``,
``pipe:CMD``, anything webdataset's ``gopen`` opens) naming ``.tar`` shards.

**Labels contract.** A sample is the run of adjacent tar members sharing a key (webdataset's grouping:
``dir/0001.jpg`` + ``dir/0001.cls`` is sample ``dir/0001``). It holds exactly one image member (an extension
Pillow reads: ``jpg``, ``png``, ``webp``, ``tif``, ...; ``seg.png``-style compound extensions are not images) and
exactly one label:

- one class: ``cls`` or ``cls.txt`` (text: an integer class index, or a class name) or a ``json`` member
  ``{"label": 3}`` / ``{"label": "cat"}``;
- a label set (multi-label): a ``json`` member ``{"labels": ["dog", "grass"]}`` (names or indices; ``[]`` is an
  image with no class).

An integer is always an index into the class list. **Class names** come from ``classes.txt`` (one per line, line
``i`` is class ``i``) or ``dataset.json`` (``{"classes": [...]}``, what ``imgclf convert`` writes) beside the
shards, else from ``--data.classes``, else from the labels: names sorted (naturally), integer indices named
``"0"``..``"max"`` (as an .npz without ``class_names``). Refused, because ambiguous, is only a mix of integer and
name labels with no class list (is ``3`` the fourth class or a class named "3"?). Errors name the shard and the
member: a sample without an image or a label, two images, a label outside the classes, an unreadable tar.

**Local shards become a random-access ``Samples``.** Each shard's members are indexed once (name, data offset,
size; the label members' contents) by the standard library's ``tarfile`` (webdataset 1.x reads tars only as
streams; its indexed reader ``wids`` is not part of it), cached as JSON in ``$XDG_CACHE_HOME/imgclf/wds-index``
keyed by the shard's absolute path, size and modification time, so a changed shard is indexed again. An image
is then one ``seek`` + ``read`` in its shard, decoded by ``images.decode_image`` exactly as the same file on disk
would be. Everything built on ``Samples`` works unchanged: the stratified split, ``DistributedSampler`` sharding,
class-balanced samplers, exact resume, ``audit``, ``predict``, the feature cache. Compressed shards (``.tar.gz``)
have no offsets to seek to: stream them (``file://`` URL) or decompress them.

**URLs are streamed** (``StreamStore``, ``ShardStream``): the first open reads each shard once through
webdataset's ``gopen`` and keeps only the keys and labels (cached as above, keyed by the URL, plus size and mtime
for ``file://``), so the epoch length and the class counts are known before training. The training stream is a
function of (seed, epoch): the shard order is shuffled per epoch, rank ``r`` of ``W`` reads shards ``r, r+W, ...``
of that order (webdataset's ``split_by_node``, with the rank given explicitly), each loader worker every
``num_workers``-th of those (``split_by_worker``), then a shuffle buffer of ``SHUFFLE_BUFFER`` samples. Every rank
yields exactly ``ceil(N / W)`` samples (whole batches), reading further shards when its own run short, so DDP ranks
take the same number of steps; with shards of equal size and a shard count divisible by ``W x workers`` each epoch
is an exact partition. Evaluation streams read each rank's shards once, in order: a disjoint, complete cover. What
a stream cannot do is refused with a fix: a validation split drawn from it (pass ``--val-data``), class-aware
samplers and repeated augmentation (they pick images by index), anything that reads one image by index
(``audit``, explanations). A shard that no longer matches its cached index (another key at a position) is an
error, never a silent shift of labels.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from ..errors import ImgclfError, first_line
from ..io import write_json
from .images import DecodePolicy, check_header, decode_image
from .sources import LabelFormat, Samples, _image_suffixes, _natural_sorted, nfc

PREFIX = "wds:"
CLASSES_FILE = "classes.txt"
DATASET_FILE = "dataset.json"
DATASET_FORMAT = "imgclf-wds"  # dataset.json's "format"
INDEX_VERSION = 1
SHUFFLE_BUFFER = 2000  # samples held by the training stream's shuffle buffer (encoded bytes)
LABEL_EXTS = ("cls", "cls.txt", "json")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^pipe:")


INSTALL = "pip install 'imgclf[stream]'"


def require(package: str, what: str) -> None:
    """``ImgclfError`` naming the extra to install when the optional ``package`` (webdataset, datasets) is missing."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ImgclfError(f"{what} needs the '{package}' package: {INSTALL}")


def is_wds_spec(spec: str) -> bool:
    """True when ``spec`` names WebDataset shards (see the module docstring)."""
    if spec.startswith(PREFIX):
        return True
    if _URL.match(spec):
        return ".tar" in spec and not spec.startswith("hf:")
    if "::" in spec or _is_shard_name(spec):
        return True
    p = Path(spec).expanduser()
    if not p.is_dir():
        return False
    if _dataset_json(p).get("format") == DATASET_FORMAT:
        return True
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    images = _image_suffixes()
    return (any(_is_shard_name(e.name) for e in entries)
            and not any(e.is_dir() or e.suffix.lower() in images for e in entries))  # fmt: skip


def _is_shard_name(name: str) -> bool:
    return bool(re.search(r"\.(tar|tar\.gz|tgz)$", name))


def open_wds(spec: str, decode: DecodePolicy, fmt: LabelFormat, need_label: bool = True) -> Samples:
    """WebDataset shards as ``Samples``: local shards random-access, URLs streamed (``store.streaming``).

    Labels are (N,) int64 class indices, or an (N, K) uint8 0/1 matrix for label sets; ``items`` are positions
    0..N-1 in shard order. Raises ``ImgclfError`` naming the shard and member for anything outside the contract.
    ``need_label`` False (prediction inputs): labels are ignored, all -1, no class names.
    """
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    require("webdataset", f"{body}: reading WebDataset shards")
    shards = expand_shards(body)
    streaming = bool(_URL.match(shards[0]))
    if streaming:  # reading is network-bound: several shards at a time
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            store: Any = StreamStore(shards, list(pool.map(index_stream, shards)))
    else:
        store = TarStore(shards, [index_tar(Path(s)) for s in shards])
    raw = [s[4] for idx in store.index for s in idx]
    if not raw:
        raise ImgclfError(f"{body}: the shards hold no samples")
    if not need_label:
        labels, names = np.full(len(raw), -1, dtype=np.int64), []
    else:
        labels, names = resolve_labels(raw, class_list(shards[0], fmt), store.member_at, body)
    return Samples(list(range(len(raw))), labels, names, body, decode=decode, origin=spec, store=store)


def expand_shards(spec: str) -> list[str]:
    """The shard list of ``spec``: ``::``-joined parts, brace patterns expanded (webdataset's ``expand_urls``),
    a folder's ``.tar`` files in sorted order. Local shards must exist."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for part in expand_urls(spec):
        if _URL.match(part):
            out.append(part)
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if _is_shard_name(q.name) and q.is_file())
            if not found:
                raise ImgclfError(f"{p}: no .tar shards in this folder")
            out += found
        elif not p.is_file():
            raise ImgclfError(f"WebDataset shard not found: {p}")
        else:
            out.append(str(p))
    if not out:
        raise ImgclfError(f"{spec}: names no shards")
    return out


# ---------------------------------------------------------------------------------------------------------
# Indexing: one pass over each shard's members, cached.


def index_tar(path: Path) -> list[list]:
    """The samples of a local, uncompressed tar shard: ``[key, image extension, data offset, size, label]`` each
    (label: int, str or list, as read from its label member), from the cache when the shard is unchanged."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cached = _cache_read(ident)
    if cached is not None:
        return cached
    with open(path, "rb") as f:
        magic = f.read(3)
        if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
            raise ImgclfError(f"{path}: a compressed shard cannot be read by index; decompress it (gunzip) or "
                              f"stream it as file://{path.resolve()}")  # fmt: skip
        f.seek(0)
        samples = _scan(f, str(path))
    _cache_write(ident, samples)
    return samples


def index_stream(url: str) -> list[list]:
    """The samples of a shard at ``url`` (read once through webdataset's ``gopen``; offsets are -1), cached by
    the URL (plus size and mtime for ``file://``)."""
    from webdataset.gopen import gopen

    ident = _stream_ident(url)
    cached = _cache_read(ident)
    if cached is not None:
        return cached
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - gopen raises OSError, ValueError (no handler), ...
        raise ImgclfError(f"{url}: cannot open the shard ({first_line(e)})") from None
    try:
        samples = _scan(stream, url)
    finally:
        _close(stream, url)
    for s in samples:
        s[2] = -1
    _cache_write(ident, samples)
    return samples


def _stream_ident(url: str) -> str:
    """What a streamed shard's index is cached under: the URL, plus size and mtime for ``file://``."""
    if not url.startswith("file:"):
        return url
    p = Path(re.sub(r"^file://?", "/", url))
    st = p.stat() if p.is_file() else None
    return f"{url}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}"


def _close(stream, url: str) -> None:
    try:
        stream.close()
    except Exception as e:  # noqa: BLE001 - a pipe's command failed (curl -f on a 404, a shell error)
        raise ImgclfError(f"{url}: reading the shard failed ({first_line(e)})") from None


def _scan(fileobj, shard: str) -> list[list]:
    """Group the members of a tar stream into samples (adjacent members sharing a key, as webdataset groups
    them); raise ``ImgclfError`` naming the shard and member for anything outside the labels contract."""
    from webdataset.tariterators import base_plus_ext

    images = {e.lstrip(".") for e in _image_suffixes()}
    out: list[list] = []
    seen: set[str] = set()
    cur: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for m in tf:
                if not m.isreg() or re.match(r"__[^/]*__($|/)", m.name):
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                ext = ext.lower()
                if cur is None or key != cur["key"]:
                    _finish(cur, shard, out, seen)
                    cur = {"key": key, "image": None, "labels": {}}
                if ext in images:
                    if cur["image"] is not None:
                        raise ImgclfError(f"{shard}: sample '{key}' has two images ({cur['image'][0]} and {ext}); "
                                          "keep one image member per key")  # fmt: skip
                    cur["image"] = (ext, m.offset_data, m.size)
                elif ext in LABEL_EXTS:
                    cur["labels"][ext] = tf.extractfile(m).read()
            _finish(cur, shard, out, seen)
    except ImgclfError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ImgclfError(f"{shard}: not a readable tar shard ({first_line(e)})") from None
    return out


def _finish(cur: dict | None, shard: str, out: list, seen: set) -> None:
    if cur is None:
        return
    key = cur["key"]
    if key in seen:
        raise ImgclfError(f"{shard}: key '{key}' appears twice (a sample's members must be adjacent in the tar)")
    seen.add(key)
    if cur["image"] is None:
        have = ", ".join(f"{key}.{e}" for e in cur["labels"]) or "no image or label member"
        raise ImgclfError(f"{shard}: sample '{key}' has no image member (found {have}); expected e.g. {key}.jpg")
    ext, offset, size = cur["image"]
    out.append([key, ext, offset, size, _label(cur["labels"], f"{shard}: {key}")])


def _label(members: dict[str, bytes], where: str) -> int | str | list | None:
    """A sample's label from its ``cls`` / ``cls.txt`` / ``json`` member (see the labels contract)."""
    found: list[tuple[str, Any]] = []
    for ext in ("cls", "cls.txt"):
        if ext in members:
            found.append((ext, _scalar(members[ext].decode("utf-8", "replace").strip(), f"{where}.{ext}")))
    if "json" in members:
        try:
            doc = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise ImgclfError(f"{where}.json: not valid JSON ({first_line(e)})") from None
        if isinstance(doc, dict) and "labels" in doc:
            if not isinstance(doc["labels"], list):
                raise ImgclfError(f"{where}.json: 'labels' must be a list of class names or indices")
            found.append(("json", [_scalar(v, f"{where}.json") for v in doc["labels"]]))
        elif isinstance(doc, dict) and "label" in doc:
            found.append(("json", _scalar(doc["label"], f"{where}.json")))
    if not found:
        return None  # an error when labels are needed (``resolve_labels``); unlabelled inputs for prediction
    if any(v != found[0][1] for _, v in found[1:]):
        raise ImgclfError(f"{where}: its label members disagree ({', '.join(f'{e}: {v!r}' for e, v in found)})")
    return found[0][1]


def _scalar(v: Any, where: str) -> int | str:
    """An integer class index or an NFC class name from a label member's text or JSON value."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ImgclfError(f"{where}: a label must be a class index or a class name, got {v!r}")
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        v = int(v)
    if isinstance(v, int):
        if v < 0:
            raise ImgclfError(f"{where}: label {v} is negative (class indices start at 0)")
        return v
    if not v.strip():
        raise ImgclfError(f"{where}: empty label")
    return nfc(v.strip())


def _cache_path(ident: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "imgclf" / "wds-index" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"


def _cache_read(ident: str) -> list[list] | None:
    p = _cache_path(ident)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("version") == INDEX_VERSION and doc.get("shard") == ident
    return doc["samples"] if ok else None


def _cache_write(ident: str, samples: list[list]) -> None:
    try:
        write_json(_cache_path(ident), {"version": INDEX_VERSION, "shard": ident, "samples": samples})
    except OSError:
        pass  # a read-only cache only costs the next open another scan


# ---------------------------------------------------------------------------------------------------------
# Class names and labels.


def class_list(first_shard: str, fmt: LabelFormat) -> list[str] | None:
    """The class list beside the shards (``classes.txt``, or ``dataset.json``'s ``classes``), else the given
    classes (``--data.classes``), else None (names come from the labels)."""
    names = _beside(first_shard)
    if names is not None:
        if len(set(names)) < len(names) or "" in names:
            raise ImgclfError(f"{_parent(first_shard)}: the class list repeats a name or has an empty one")
        return names
    return list(fmt.classes) if fmt.classes is not None else None


def _parent(shard: str) -> str:
    return shard.rsplit("/", 1)[0] if "/" in shard else "."


def _beside(first_shard: str) -> list[str] | None:
    if first_shard.startswith("pipe:"):
        return None
    base = _parent(first_shard)
    for name in (DATASET_FILE, CLASSES_FILE):
        text = _read_small(f"{base}/{name}")
        if text is None:
            continue
        if name == CLASSES_FILE:
            return [nfc(line.strip()) for line in text.splitlines() if line.strip()]
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ImgclfError(f"{base}/{name}: not valid JSON ({first_line(e)})") from None
        if isinstance(doc, dict) and isinstance(doc.get("classes"), list):
            return [nfc(str(c).strip()) for c in doc["classes"]]
    return None


def _read_small(where: str) -> str | None:
    """A small text file beside the shards (a path or a URL), or None when it is not there."""
    if not _URL.match(where):
        p = Path(where)
        return p.read_text(encoding="utf-8") if p.is_file() else None
    from webdataset.gopen import gopen

    try:
        stream = gopen(where, "rb")
        try:
            return stream.read().decode("utf-8")
        finally:
            stream.close()
    except Exception:  # noqa: BLE001 - absent (404, no such file): the names come from elsewhere
        return None


def _dataset_json(folder: Path) -> dict:
    try:
        doc = json.loads((folder / DATASET_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def resolve_labels(raw: list, names: list[str] | None, where, spec: str) -> tuple[np.ndarray, list[str]]:
    """Labels (N,) int64, or (N, K) uint8 for label sets, and the class names, from each sample's raw label
    (int index, str name, or a list of them); ``where(n)`` names sample ``n``'s member in errors."""
    if None in raw:
        raise ImgclfError(f"{where(raw.index(None))}: no label (expected a cls / cls.txt member, or a json member "
                          "with 'label' or 'labels')")  # fmt: skip
    multi = [isinstance(r, list) for r in raw]
    if any(multi) and not all(multi):
        n = multi.index(False) if multi[0] else multi.index(True)
        raise ImgclfError(f"{where(n)}: mixes one-class labels (cls) and label sets (json 'labels') in one data set")
    flat = [v for r in raw for v in (r if isinstance(r, list) else [r])]
    if names is None:
        ints = [isinstance(v, int) for v in flat]
        if any(ints) and not all(ints):
            n = next(i for i, r in enumerate(raw) if any(isinstance(v, int) for v in (r if multi[0] else [r])))
            raise ImgclfError(f"{where(n)}: integer labels mixed with class names and no class list, so '3' could "
                              f"be an index or a name; put a {CLASSES_FILE} beside the shards of {spec}")  # fmt: skip
        names = [str(i) for i in range(max(flat) + 1)] if flat and all(ints) else _natural_sorted(set(flat))
    index = {c: i for i, c in enumerate(names)}

    def to_index(v: int | str, n: int) -> int:
        if isinstance(v, int):
            if v >= len(names):
                raise ImgclfError(f"{where(n)}: label {v} is outside the {len(names)} classes (indices 0.."
                                  f"{len(names) - 1})")  # fmt: skip
            return v
        if v not in index:
            raise ImgclfError(f"{where(n)}: label '{v}' is not one of the classes ({', '.join(names[:10])}"
                              f"{', ...' if len(names) > 10 else ''})")  # fmt: skip
        return index[v]

    if not multi[0]:
        return np.asarray([to_index(v, n) for n, v in enumerate(raw)], dtype=np.int64), names
    hot = np.zeros((len(raw), len(names)), dtype=np.uint8)
    for n, r in enumerate(raw):
        for v in r:
            hot[n, to_index(v, n)] = 1
    return hot, names


# ---------------------------------------------------------------------------------------------------------
# Stores: where a position's bytes come from.


class _Shards:
    """The shards and their indexes, with positions 0..N-1 in shard order."""

    streaming = False

    def __init__(self, shards: list[str], index: list[list[list]]):
        self.shards, self.index = shards, index
        counts = [len(ix) for ix in index]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shard_of = np.repeat(np.arange(len(shards)), counts)

    def entry(self, pos: int) -> list:
        s = int(self.shard_of[pos])
        return self.index[s][pos - int(self.starts[s])]

    def member_at(self, pos: int) -> str:
        """``shard: member`` of position ``pos``'s image, for messages."""
        e = self.entry(pos)
        return f"{self.shards[int(self.shard_of[pos])]}: {e[0]}.{e[1]}"

    def describe(self, pos: int) -> str:
        return self.member_at(pos)

    def identity(self) -> str:
        """What the feature cache keys these samples' content by: every shard's index."""
        h = hashlib.sha256()
        for s, ix in zip(self.shards, self.index):
            h.update(f"{s}|{json.dumps(ix)}\n".encode())
        return h.hexdigest()


class TarStore(_Shards):
    """Random access to the members of local, uncompressed tar shards (a seek and a read per image)."""

    def read(self, pos: int) -> bytes:
        e = self.entry(pos)
        with open(self.shards[int(self.shard_of[pos])], "rb") as f:
            f.seek(e[2])
            return f.read(e[3])

    def raw(self, pos: int) -> tuple[bytes, str]:
        """The image member's bytes and its name (for its extension)."""
        return self.read(pos), self.member_at(pos)

    def load(self, pos: int, decode: DecodePolicy, source: str):
        return decode_image(self.read(pos), source, decode, formats=None)

    def header(self, pos: int, decode: DecodePolicy, source: str) -> str | None:
        return check_header(source, decode, self.read(pos))

    def identity(self) -> str:
        stats = [f"{s}|{os.stat(s).st_size}|{os.stat(s).st_mtime_ns}" for s in self.shards]
        return hashlib.sha256("\n".join(stats).encode()).hexdigest() + super().identity()[:16]


class StreamStore(_Shards):
    """Shards read in order through webdataset (URLs): no random access. ``ShardStream`` hands each sample's
    image bytes to ``current`` just before the dataset asks for that position, so the stream decodes, transforms
    and reports bad images through the same per-item path as files."""

    streaming = True

    def __init__(self, shards: list[str], index: list[list[list]]):
        super().__init__(shards, index)
        self.current: tuple[int, bytes] | None = None

    def load(self, pos: int, decode: DecodePolicy, source: str):
        if self.current is None or self.current[0] != pos:
            raise ImgclfError(f"{source}: a streamed WebDataset ({self.shards[0]}, ...) cannot be read by index; "
                              "download the shards and pass their local paths")  # fmt: skip
        return decode_image(self.current[1], source, decode, formats=None)


def _rank_shards(n_shards: int, train: bool, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """A rank's own shards: ``r, r+W, ...`` of the shard order, which training shuffles per (seed, epoch) and
    evaluation keeps.

    The split is webdataset's ``split_by_node`` (``islice(shards, rank, None, world)``; ``split_by_worker`` the
    same over workers) with the rank passed in rather than read from the process group: inside a DDP job a
    loader meant to be whole (evaluation on rank 0 alone, ``world_size`` 1) must not be split."""
    order = list(range(n_shards))
    if train:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world]


def stream_loader(dataset, batch_size: int, *, train: bool, num_workers: int, seed: int = 0, rank: int = 0,
                  world_size: int = 1, pin_memory: bool = False, repeats: int = 1, sampler: Any = None):  # fmt: skip
    """A ``DataLoader`` over ``ShardStream``: the streaming counterpart of ``loader.make_loader`` (same batches,
    ``Skipped`` records and ``set_epoch`` seeding). Raises ``ImgclfError`` for samplers and repeated
    augmentation, which choose images by index."""
    import torch
    from torch.utils.data import DataLoader

    from .loader import _seed_worker, collate

    if sampler is not None or repeats > 1:
        what = "data.sampler" if sampler is not None else "aug.repeats > 1"
        raise ImgclfError(f"{what} picks images by index, which a streamed WebDataset ({dataset.samples.name}) cannot "
                          "do; use local shards (indexed) or drop it")  # fmt: skip
    stream = ShardStream(dataset, train=train, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                         num_workers=num_workers)  # fmt: skip
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, worker_init_fn=_seed_worker if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _changed(url: str, what: str) -> None:
    """A shard no longer matches its index: forget the cached index (the next run reads the shard again) and stop."""
    _cache_path(_stream_ident(url)).unlink(missing_ok=True)
    raise ImgclfError(f"{url}: changed since it was indexed ({what}); its index is dropped, run again to re-index")


class ShardStream(IterableDataset):
    """The samples of a streamed ``Samples`` (``StreamStore``) for one rank, as ``ImageDataset`` items.

    Training: ``ceil(N / world_size)`` samples per rank in whole batches (``drop_last`` as ``make_loader``),
    divided among the loader's workers by batches, so every rank and epoch has the same number of batches
    (``len``). Evaluation: every sample of the rank's shards that is in ``samples.items``, once. Order is a
    function of (seed, epoch, rank, worker) (``set_epoch``)."""

    def __init__(self, dataset, *, train: bool, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int):  # fmt: skip
        self.ds, self.train, self.bs, self.seed = dataset, train, batch_size, seed
        self.rank, self.world, self.workers = rank, world_size, max(num_workers, 1)
        self.store: StreamStore = dataset.samples.store
        self.epoch = 0
        items = np.asarray(dataset.samples.items, dtype=np.int64)
        whole = np.array_equal(items, np.arange(len(self.store.shard_of)))  # the usual case: no lookup table
        self.local = None if whole else {int(p): i for i, p in enumerate(items)}
        self.n_rank = math.ceil(len(items) / world_size)
        batches = self.n_rank // batch_size if self.n_rank > batch_size else 1
        self.per_worker = [batches // self.workers + (w < batches % self.workers) for w in range(self.workers)]
        self.drop = self.n_rank > batch_size
        if not train:  # each worker's last batch may be partial: count the batches worker by worker
            own = _rank_shards(len(self.store.shards), False, seed, 0, rank, world_size)
            starts = self.store.starts
            per = [np.isin(items, np.arange(starts[s], starts[s + 1])).sum() for s in own]
            self.eval_batches = sum(math.ceil(sum(per[w :: self.workers]) / batch_size) for w in range(self.workers))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Set so that ``len(loader)`` (``ceil(len / batch_size)``) is the number of batches the loader yields."""
        if not self.train:
            return max(self.eval_batches - 1, 0) * self.bs + (self.eval_batches > 0)
        return sum(self.per_worker) * self.bs if self.drop else self.n_rank

    def __iter__(self):
        from torch.utils.data import get_worker_info
        from webdataset.filters import shuffle

        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = _rank_shards(len(self.store.shards), self.train, self.seed, self.epoch, self.rank, self.world)
        if not self.train:
            yield from self._items(self._read(shards[worker :: self.workers]))
            return
        quota = self.per_worker[worker] * self.bs if self.drop else (self.n_rank if worker == 0 else 0)
        if quota == 0:
            return
        mine = shards[worker :: self.workers]
        # past its own shards a worker short of its quota reads the others' (padding, as DistributedSampler pads)
        others = [x for x in range(len(self.store.shards)) if x not in mine]
        pad = itertools.cycle(others[worker % max(len(others), 1) :] + others[: worker % max(len(others), 1)] or mine)
        rng_seed = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        own = shuffle(SHUFFLE_BUFFER, initial=100, seed=rng_seed)(self._read(iter(mine)))
        yield from itertools.islice(self._items(itertools.chain(own, self._read(pad))), quota)

    def _read(self, shards):
        """(position, image bytes) of the wanted samples in ``shards``, read with webdataset's tar reader; the
        sample at each position must carry the key the index recorded."""
        from webdataset.tariterators import tarfile_samples

        for s in shards:
            url, start, ix = self.store.shards[s], int(self.store.starts[s]), self.store.index[s]
            j = -1
            try:
                for j, sample in enumerate(tarfile_samples([{"url": url}])):
                    if j >= len(ix) or sample["__key__"] != ix[j][0]:
                        _changed(url, f"sample {j} is '{sample['__key__']}', expected "
                                      f"{repr(ix[j][0]) if j < len(ix) else 'its end'}")  # fmt: skip
                    if self.local is None or start + j in self.local:
                        yield start + j, sample.get(ix[j][1], b"")
            except ImgclfError:
                raise
            except Exception as e:  # noqa: BLE001 - tar, pipe and network errors
                raise ImgclfError(f"{url}: reading the shard failed at sample {j + 1} ({first_line(e)})") from None
            if j + 1 != len(ix):
                _changed(url, f"{j + 1} samples, {len(ix)} indexed")

    def _items(self, data):
        for pos, payload in data:
            self.store.current = (pos, payload)
            try:
                yield self.ds[pos if self.local is None else self.local[pos]]
            finally:
                self.store.current = None


__all__ = ["ShardStream", "StreamStore", "TarStore", "expand_shards", "index_stream", "index_tar", "is_wds_spec",
           "open_wds", "resolve_labels", "stream_loader"]  # fmt: skip
