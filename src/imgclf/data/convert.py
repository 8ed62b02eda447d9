"""``imgclf convert DATA --to wds``: any source imgclf reads, written as WebDataset tar shards.

Each sample is written as its **original encoded bytes** (a file's bytes, a shard member's, a Hugging Face row's
stored image; in-memory arrays as lossless PNG), under a zero-padded key (``00000042.png``), never re-encoded, so
it decodes exactly as the source did. Its label follows the labels contract of ``imgclf.data.wds``: ``cls`` (the
class index) for one class per image, ``json`` ``{"labels": [names]}`` for label sets. Beside the shards:
``classes.txt`` (one name per line, line ``i`` is class ``i``) and ``dataset.json`` (format ``imgclf-wds``: the
classes, the task, the number of samples, the class counts and each shard's sample count, the source and the
images left out).

Shards (``shard-000000.tar``, ...) hold ``shard_size`` samples (and at most about ``shard_bytes``), written with
``webdataset.ShardWriter`` in a seeded random order by default, so that every shard mixes the classes (a stream's
shuffle buffer only mixes nearby samples). Files that are not images or cannot be read (the source's skipped
items) are left out and listed. The output folder is written as a temporary folder beside it and renamed when
complete; an existing folder is refused unless ``overwrite``, which replaces it only after the new one is complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import ConvertConfig
from ..errors import ImgclfError
from ..io import write_json, write_text
from .images import DecodePolicy
from .sources import LabelFormat, Samples, _image_suffixes, open_source
from .wds import CLASSES_FILE, DATASET_FILE, DATASET_FORMAT, require

SHARD_PATTERN = "shard-%06d.tar"
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp", "GIF": "gif", "MPO": "jpg"}


def convert_to_wds(data: str, output: str | Path, cfg: ConvertConfig | None = None) -> dict[str, Any]:
    """Write ``data`` (any spec ``open_source`` reads) as WebDataset shards in the folder ``output``.

    Returns ``{"output", "shards", "samples", "classes", "task", "bytes", "skipped": {item: reason}, "seconds"}``.

    Raises:
        ImgclfError: ``output`` exists (without ``overwrite``), the source cannot be read, or it is a streamed
        WebDataset (no random access: download its shards first), or nothing could be written.
    """
    cfg = cfg or ConvertConfig()
    require("webdataset", "imgclf convert --to wds")
    t0, out = time.perf_counter(), Path(output).expanduser()
    if out.exists() and not cfg.overwrite:
        raise ImgclfError(f"{out}: already exists; choose another --output or pass --overwrite")
    fmt = LabelFormat(cfg.task, tuple(cfg.classes) if cfg.classes else None, cfg.label_sep, cfg.image_column,
                      cfg.label_column)  # fmt: skip
    s = open_source(data, cfg.split, DecodePolicy(max_pixels=None, max_aspect=None), fmt)
    if getattr(s.store, "streaming", False):
        raise ImgclfError(f"{data}: streamed shards are WebDataset already; to keep a local copy, download them")
    order = np.random.default_rng(cfg.seed).permutation(len(s)) if cfg.shuffle else np.arange(len(s))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards, written, skipped, nbytes = _write_shards(s, order, tmp, cfg)
        if not len(written):
            raise ImgclfError(f"{data}: no image could be written ({len(skipped)} unreadable)")
        _write_meta(tmp, s, shards, written, skipped, data, cfg)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(out), "shards": len(shards), "samples": int(len(written)), "classes": len(s.class_names),
            "task": "multi_label" if s.multi_label else "single_label", "bytes": nbytes, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip


def _write_shards(s: Samples, order: np.ndarray, folder: Path, cfg: ConvertConfig):
    """Write the samples in ``order``; returns ([(shard name, samples)], source positions written, skipped, bytes)."""
    from tqdm.auto import tqdm
    from webdataset import ShardWriter

    shards: list[tuple[str, int]] = []
    written, skipped, nbytes = [], {}, 0
    bad = dict(s.check_files().bad) if s.arrays is None else {}
    writer = None

    def done(fname: str) -> None:
        if writer is not None and writer.count:
            shards.append((Path(fname).name, writer.count))

    writer = ShardWriter(str(folder / SHARD_PATTERN), maxcount=cfg.shard_size, maxsize=cfg.shard_bytes, post=done,
                         verbose=0, encoder=False, mtime=0)  # fmt: skip
    try:
        for i in tqdm(order, desc="convert", unit="img", disable=not cfg.progress, leave=False):
            i = int(i)
            if i in bad:
                skipped[s.describe(i)] = bad[i]
                continue
            got = _encoded(s, i)
            if isinstance(got, str):
                skipped[s.describe(i)] = got
                continue
            data, ext = got
            sample = {"__key__": f"{len(written):08d}", ext: data, **_label_member(s, i)}
            writer.write(sample)
            written.append(i)
            nbytes += len(data)
    finally:
        writer.close()
    return shards, np.asarray(written, dtype=np.int64), skipped, nbytes


def _encoded(s: Samples, i: int) -> tuple[bytes, str] | str:
    """Item ``i``'s encoded image and its extension, or the reason it is left out."""
    item = s.items[i]
    if s.arrays is not None:
        arr = s.arrays[item]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)).save(
            buf, "PNG"
        )
        return buf.getvalue(), "png"
    if s.store is not None:
        data, name = s.store.raw(item)
    else:
        try:
            data = Path(item).read_bytes()
        except OSError as e:
            return f"cannot read ({e.strerror or e})"
        name = str(item)
    ext = Path(name).suffix.lower().lstrip(".")
    if "." + ext in _image_suffixes():
        return data, ext
    try:
        with Image.open(io.BytesIO(data or b"")) as img:
            fmt = img.format
    except Exception:  # noqa: BLE001 - not an image
        return "not an image (unrecognised format)"
    return data, _FORMAT_EXT.get(fmt, next((e.lstrip(".") for e, f in Image.registered_extensions().items()
                                            if f == fmt), "img"))  # fmt: skip


def _label_member(s: Samples, i: int) -> dict[str, bytes]:
    if s.multi_label:
        names = [s.class_names[k] for k in np.flatnonzero(s.labels[i])]
        return {"json": json.dumps({"labels": names}, ensure_ascii=False).encode()}
    return {"cls": str(int(s.labels[i])).encode()}


def _write_meta(folder: Path, s: Samples, shards, written: np.ndarray, skipped: dict, data: str,
                cfg: ConvertConfig) -> None:  # fmt: skip
    """``classes.txt`` and ``dataset.json`` beside the shards."""
    kept = s.subset(np.sort(written))
    write_text(folder / CLASSES_FILE, "".join(f"{c}\n" for c in s.class_names))
    write_json(folder / DATASET_FILE, {
        "format": DATASET_FORMAT, "version": 1, "source": str(data), "split": cfg.split,
        "task": "multi_label" if s.multi_label else "single_label", "classes": s.class_names,
        "samples": int(len(written)), "class_counts": kept.class_counts().tolist(),
        "shards": [{"name": n, "samples": c} for n, c in shards], "skipped": skipped,
        "shuffled": cfg.shuffle, "seed": cfg.seed,
    })  # fmt: skip


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` (an existing ``out`` is removed only after that)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
