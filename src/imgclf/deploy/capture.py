"""Keep what the server saw: a bounded, rotating folder of served images that ``imgclf train``, ``audit`` and
``retrain`` read directly once a person has filled in the labels (our value: no peer keeps traffic this way).

Off unless ``imgclf serve --capture-dir DIR`` (privacy first). Every image answered ``unknown`` and every image
whose top probability is under ``--capture-below`` is kept; of the others a ``--capture-rate`` share, drawn at
random. The layout::

    DIR/labels.csv                      path,label,predicted,confidence,unknown,ood_score,model,version,time,
                                        reason,source   (label empty: to fill in; one row per image, oldest first)
    DIR/images/YYYYMMDD/HHMMSS-<n>.<ext>   the bytes as uploaded (KServe UINT8 pixels: a PNG of them)

``labels.csv`` is the layout ``imgclf train DIR`` reads (a folder with ``labels.csv`` at its root; the extra
columns are ignored); a row whose label is still empty is an error naming the row, so fill or delete it.

Bounded: when the images pass ``--capture-max-mb`` the oldest are deleted (down to 90 % of the cap) and their rows
removed from ``labels.csv``, which is read back from disk first so labels a person has typed in meanwhile are
kept, and replaced atomically. Writing happens on one background thread behind a bounded queue: a slow disk makes
the server drop captures (counted in ``imgclf_capture_dropped``), never wait.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImgclfError

log = logging.getLogger("imgclf")
COLUMNS = ("path", "label", "predicted", "confidence", "unknown", "ood_score", "model", "version", "time", "reason",
           "source")  # fmt: skip
LABELS = "labels.csv"
_QUEUE = 1024  # captures waiting for the writer; beyond, dropped (counted)
_SIGNATURES = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"), (b"II*\x00", "tif"),
               (b"MM\x00*", "tif"))  # fmt: skip


@dataclass
class Captured:
    """One image to keep: ``data`` encoded bytes, or ``pixels`` (H, W, C) uint8 to write as PNG."""

    data: bytes | None
    pixels: np.ndarray | None
    predicted: str
    confidence: float
    unknown: bool | None
    ood_score: float | None
    model: str
    version: str
    reason: str
    source: str
    time: float


class Capture:
    """The capture folder and its writer thread. ``choose`` picks which images of a batch to keep; ``offer``
    hands them to the writer without waiting; ``close`` writes what is queued and stops.

    Args:
        root: the capture folder (made if missing; an existing one is continued).
        rate: share in [0, 1] of the confident, known images kept at random.
        below: images whose top probability is under this are always kept (0: none on that ground).
        max_mb: size cap of the stored images in MB (2**20 bytes).
        seed: of the sampling (None: from the OS).

    Raises:
        ImgclfError: bad rate/cap, or an existing ``labels.csv`` without the ``path`` and ``label`` columns.
    """

    def __init__(self, root: str | os.PathLike, rate: float = 0.0, below: float = 0.0, max_mb: float = 512.0,
                 seed: int | None = None):  # fmt: skip
        if not 0 <= rate <= 1:
            raise ImgclfError(f"--capture-rate must be within [0, 1] (got {rate})")
        if not 0 <= below <= 1:
            raise ImgclfError(f"--capture-below must be within [0, 1] (got {below})")
        if max_mb <= 0:
            raise ImgclfError(f"--capture-max-mb must be > 0 (got {max_mb})")
        self.root, self.rate, self.below = Path(root), rate, below
        self.cap = int(max_mb * 2**20)
        self.csv = self.root / LABELS
        self._rng = random.Random(seed)
        self._queue: queue.Queue[Captured | None] = queue.Queue(_QUEUE)
        self.dropped = self.written = self.rotated = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_header()
        self.bytes = sum(f.stat().st_size for f in (self.root / "images").rglob("*") if f.is_file())
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._write_loop, name="imgclf-capture", daemon=True)
        self._thread.start()

    def _check_header(self) -> None:
        if not self.csv.is_file():
            return
        with open(self.csv, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise ImgclfError(f"{self.csv}: not a capture file (missing column {', '.join(missing)}); "
                              "choose another --capture-dir")  # fmt: skip

    # ------------------------------------------------------------ on the event loop

    def choose(self, probs: np.ndarray, unknown: np.ndarray | None) -> list[tuple[int, str]]:
        """(row, reason) of the images of a batch to keep: every ``unknown``, every top probability under
        ``below`` (``low_confidence``), and a ``rate`` share of the rest (``sampled``). ``probs`` (N, K)."""
        top = probs.max(axis=1)
        out = []
        for i in range(len(probs)):
            if unknown is not None and unknown[i]:
                out.append((i, "unknown"))
            elif top[i] < self.below:
                out.append((i, "low_confidence"))
            elif self.rate > 0 and self._rng.random() < self.rate:
                out.append((i, "sampled"))
        return out

    def offer(self, item: Captured) -> bool:
        """Queue ``item`` for the writer; False (and counted as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout`` s) and stop the writer."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # ------------------------------------------------------------ on the writer thread

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while item is not None and len(batch) < 256:  # one CSV append for what has queued up meanwhile
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            items = [b for b in batch if b is not None]
            try:
                if items:
                    self._write(items)
            except Exception:  # noqa: BLE001 - a full disk or a removed folder must not stop the server
                log.exception("capture: could not write %d image(s) to %s", len(items), self.root)
                self.dropped += len(items)
            if None in batch:
                return

    def _write(self, items: list[Captured]) -> None:
        rows = []
        for it in items:
            data, ext = _encoded(it)
            if len(data) > self.cap:
                self.dropped += 1
                continue
            t = time.gmtime(it.time)
            rel = Path("images") / time.strftime("%Y%m%d", t) / f"{time.strftime('%H%M%S', t)}-{next(self._seq)}.{ext}"
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            while dest.exists():  # a folder continued after a restart: never overwrite a kept image
                rel = rel.with_name(f"{rel.stem}-{next(self._seq)}.{ext}")
                dest = self.root / rel
            dest.write_bytes(data)
            self.bytes += len(data)
            rows.append(_row(rel.as_posix(), it))
        if rows:
            new = not self.csv.is_file()
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerows(rows)
            self.written += len(rows)
        if self.bytes > self.cap:
            self._rotate()

    def _rotate(self) -> None:
        """Delete the oldest images until they take at most 90 % of the cap; drop their rows from labels.csv
        (read back first: labels typed in meanwhile stay), written atomically."""
        from ..io import atomic_path

        with open(self.csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or COLUMNS), list(reader)
        keep_from, freed, target = 0, 0, self.bytes - int(0.9 * self.cap)
        for keep_from, row in enumerate(rows):  # noqa: B007 - the index where the kept rows begin
            if freed >= target:
                break
            p = self.root / row.get("path", "")
            try:
                size = p.stat().st_size
                p.unlink()
            except OSError:  # deleted by a person already
                size = 0
            freed += size
        else:
            keep_from = len(rows)
        with atomic_path(self.csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, header, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows[keep_from:])
        self.bytes -= freed
        self.rotated += keep_from
        for d in (self.root / "images").iterdir():  # day folders left empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        log.info("capture: removed the %d oldest image(s) (%.1f MB) to stay under %.0f MB", keep_from, freed / 2**20,
                 self.cap / 2**20)  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return {"dir": str(self.root), "written": self.written, "dropped": self.dropped, "rotated": self.rotated,
                "bytes": self.bytes, "cap_bytes": self.cap, "queued": self._queue.qsize()}  # fmt: skip


def _encoded(it: Captured) -> tuple[bytes, str]:
    """The bytes to store and their file name ending (from the bytes' signature; PIL for the rest)."""
    if it.data is None:
        from PIL import Image

        buf = io.BytesIO()
        px = it.pixels if it.pixels.shape[-1] != 1 else it.pixels[..., 0]
        Image.fromarray(px).save(buf, format="PNG")
        return buf.getvalue(), "png"
    for sig, ext in _SIGNATURES:
        if it.data.startswith(sig):
            return it.data, ext
    try:
        from PIL import Image

        fmt = Image.open(io.BytesIO(it.data)).format  # the header only
        return it.data, (fmt or "img").lower()
    except Exception:  # noqa: BLE001 - decoded fine for the model (e.g. a plugin format): keep the bytes as they are
        return it.data, "img"


def _row(rel: str, it: Captured) -> dict[str, Any]:
    return {
        "path": rel, "label": "", "predicted": it.predicted, "confidence": f"{it.confidence:.6f}",
        "unknown": "" if it.unknown is None else str(bool(it.unknown)).lower(),
        "ood_score": "" if it.ood_score is None else f"{it.ood_score:.6f}", "model": it.model,
        "version": it.version, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(it.time)),
        "reason": it.reason, "source": it.source,
    }  # fmt: skip
