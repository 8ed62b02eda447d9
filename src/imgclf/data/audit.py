"""Per-image facts for the data audit (``imgclf audit``; the rest of it is ``eval.audit``): what each file is
(readable, size, colour mode, EXIF rotation, extension against content), the hash of its decoded pixels, its
perceptual hash, and the bounded search for pairs of images with close perceptual hashes.

- **Pixel hash**: BLAKE2b-128 of the decoded RGB picture (``Samples.load``: the decoding training uses, EXIF
  rotation, bit depth and transparency applied) and its size. A PNG and a lossless re-save of it, a grey file
  and its RGB copy, hash alike; any changed pixel does not.
- **Perceptual hash**: ImageHash's ``phash`` (64-bit: the signs of the 8 x 8 lowest frequencies of the DCT of
  a 32 x 32 grey thumbnail, against their median; Zauner 2010, "Implementation and benchmarking of perceptual
  image hash functions"), also of the decoded picture. Re-encoding, resizing and small crops change few bits.
- **Hamming search**: chunked XOR + popcount over the 64-bit hashes (``hamming_pairs``): memory ~ 8 x chunk x N
  bytes, never an N x N matrix.

Example:
    >>> a = np.array([0b1011, 0b1001, 0xFF00], dtype=np.uint64)
    >>> hamming_pairs(a, max_distance=1).tolist()
    [[0, 1, 1]]
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import BadImage, file_facts
from .sources import Samples

#: Pillow modes read as more than 8 bits per sample (windowed to 0-255 by the decode policy)
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: formats that are one another's (a .jpg holding an MPO is a JPEG)
_SAME_FORMAT = {"MPO": "JPEG"}


@dataclass
class Scan:
    """Per-item facts of one ``Samples`` (N items), in item order.

    ``size``: (N, 2) int64 width, height of the decoded picture (0, 0 when unreadable); ``pixel_hash``: (N,)
    ``S16`` (empty when unreadable); ``phash``: (N,) uint64; ``readable``: (N,) bool; ``facts``: one dict per
    item (``kind``: grey | colour | alpha | cmyk | 16-bit; ``mode``, ``format``, ``exif_rotated``,
    ``suffix_format``, ``bytes``; ``error``: why it is unreadable, else None).
    """

    size: np.ndarray
    pixel_hash: np.ndarray
    phash: np.ndarray
    readable: np.ndarray
    facts: list[dict[str, Any]]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The scan as plain arrays (an .npz without pickles: facts as one JSON string)."""
        import json

        return {"size": self.size, "pixel_hash": self.pixel_hash, "phash": self.phash, "readable": self.readable,
                "facts": np.array(json.dumps(self.facts))}  # fmt: skip

    @classmethod
    def from_arrays(cls, z: Any) -> Scan:
        import json

        return cls(z["size"], z["pixel_hash"], z["phash"], z["readable"], json.loads(str(z["facts"])))


def phash64(img: Image.Image) -> int:
    """ImageHash's 64-bit ``phash`` of a picture as an unsigned integer (bit 63 = the first DCT sign)."""
    import imagehash

    bits = imagehash.phash(img).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def pixel_hash(img: Image.Image) -> bytes:
    """BLAKE2b-128 of a decoded picture's mode, size and pixels."""
    h = hashlib.blake2b(f"{img.mode}{img.size}".encode(), digest_size=16)
    h.update(img.tobytes())
    return h.digest()


def _array_kind(a: np.ndarray) -> str:
    return "grey" if a.ndim == 2 or a.shape[-1] == 1 else ("alpha" if a.shape[-1] == 4 else "colour")


def _mode_kind(facts: dict[str, Any]) -> str:
    mode = facts["mode"]
    if mode in HIGH_DEPTH_MODES or facts["bits16"]:
        return "16-bit"
    if mode == "CMYK":
        return "cmyk"
    if mode in ALPHA_MODES or facts["transparency"]:
        return "alpha"
    return "grey" if mode in ("L", "1") else "colour"


def _suffix_format(path: str) -> str | None:
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return _SAME_FORMAT.get(fmt, fmt) if fmt else None


def _scan_one(samples: Samples, i: int) -> tuple[dict[str, Any], bytes, int, tuple[int, int]]:
    facts: dict[str, Any] = {"kind": None, "mode": None, "format": None, "exif_rotated": False,
                             "suffix_format": None, "bytes": None, "error": None}  # fmt: skip
    try:
        if samples.arrays is not None:
            facts["kind"] = _array_kind(samples.arrays[samples.items[i]])
        elif i not in samples.bad:
            data, path = samples.store.raw(samples.items[i]) if samples.store is not None else (None, samples.items[i])
            facts["bytes"] = len(data) if data is not None else os.path.getsize(path) if os.path.exists(path) else None
            if facts["bytes"] == 0:
                raise BadImage(path, "zero-byte file")
            head = file_facts(path, data)
            facts.update(kind=_mode_kind(head), mode=head["mode"], format=_SAME_FORMAT.get(head["format"],
                         head["format"]), exif_rotated=head["orientation"] not in (0, 1),
                         suffix_format=_suffix_format(path))  # fmt: skip
        img = samples.load(i)  # the training decoding (raises BadImage; bad items included)
    except BadImage as e:
        facts["error"] = e.reason
        return facts, b"", 0, (0, 0)
    except Exception as e:  # noqa: BLE001 - one odd file must never end the audit
        facts["error"] = f"could not be processed ({type(e).__name__}: {e})"
        return facts, b"", 0, (0, 0)
    return facts, pixel_hash(img), phash64(img), img.size


def scan_samples(samples: Samples, progress: bool = False, threads: int = 4, desc: str = "hash") -> Scan:
    """Facts, pixel hash and perceptual hash of every item of ``samples``, decoded per ``samples.decode``.

    Unreadable items (corrupt, zero-byte, over the decode limits, missing) get ``readable`` False and their
    reason in ``facts[i]["error"]``. Threads overlap file reading and decoding (Pillow and the DCT release the GIL).
    """
    from tqdm.auto import tqdm

    n = len(samples)
    size = np.zeros((n, 2), dtype=np.int64)
    ph = np.zeros(n, dtype=np.uint64)
    hashes = np.zeros(n, dtype="S16")
    facts: list[dict[str, Any]] = [{}] * n
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = pool.map(lambda i: _scan_one(samples, i), range(n), chunksize=64)
        for i, (f, h, p, wh) in enumerate(tqdm(results, total=n, desc=desc, unit="img", disable=not progress,
                                               leave=False)):  # fmt: skip
            facts[i], hashes[i], ph[i], size[i] = f, h, p, wh
    readable = np.array([f["error"] is None for f in facts], dtype=bool)
    return Scan(size, hashes, ph, readable, facts)


def file_findings(samples: Samples, scan: Scan, min_side: int = 16, max_ratio: float = 5.0) -> list[dict[str, Any]]:
    """One finding per problem: ``{"kind", "index", "detail"}`` with kind

    - ``unreadable``: corrupt, truncated, zero-byte, not an image, over the decode limits (the reason);
    - ``tiny``: shorter side under ``min_side`` px, or under a quarter of the data's median shorter side;
    - ``aspect``: longer side over ``max_ratio`` x the shorter (training crops a square from it);
    - ``mode``: alpha (composited over the background), CMYK, 16-bit (windowed to 8 bits), and grey or colour
      files when they are the minority kind of the data (a mode mix);
    - ``exif_rotated``: an EXIF orientation other than upright (decoding rotates it: viewers may not);
    - ``extension``: the suffix names another format than the content (``.jpg`` holding a PNG).
    """
    out: list[dict[str, Any]] = []
    ok = scan.readable
    sides = scan.size[ok].min(axis=1) if ok.any() else np.zeros(0)
    floor = max(float(min_side), 0.25 * float(np.median(sides))) if len(sides) else float(min_side)
    kinds = [f["kind"] for f in scan.facts if f["error"] is None and f["kind"] in ("grey", "colour")]
    majority = max(set(kinds), key=kinds.count) if kinds else None
    for i, f in enumerate(scan.facts):
        if f["error"] is not None:
            out.append({"kind": "unreadable", "index": i, "detail": f["error"]})
            continue
        w, h = (int(v) for v in scan.size[i])
        if min(w, h) < floor:
            out.append({"kind": "tiny", "index": i, "detail": f"{w}x{h} (shorter side under {floor:g} px)"})
        if max(w, h) > max_ratio * max(min(w, h), 1):
            ratio = max(w, h) / max(min(w, h), 1)
            out.append({"kind": "aspect", "index": i, "detail": f"{w}x{h} (aspect {ratio:.1f}:1)"})
        if f["kind"] in ("alpha", "cmyk", "16-bit") or (f["kind"] in ("grey", "colour") and f["kind"] != majority):
            out.append({"kind": "mode", "index": i, "detail": f"{f['kind']} ({f['mode'] or 'array'}; most are "
                                                              f"{majority})"})  # fmt: skip
        if f["exif_rotated"]:
            out.append({"kind": "exif_rotated", "index": i, "detail": "EXIF orientation: decoded rotated"})
        if f["suffix_format"] and f["format"] and f["suffix_format"] != f["format"]:
            suffix = Path(samples.describe(i)).suffix
            out.append({"kind": "extension", "index": i, "detail": f"named {suffix} but holds {f['format']}"})
    return out


def mode_counts(scan: Scan) -> dict[str, int]:
    """Readable images per colour kind (grey, colour, alpha, cmyk, 16-bit)."""
    kinds = [f["kind"] for f in scan.facts if f["error"] is None]
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def hamming_pairs(
    a: np.ndarray, b: np.ndarray | None = None, max_distance: int = 4, per_item: int = 10, chunk: int = 256
) -> np.ndarray:
    """Pairs of 64-bit hashes within ``max_distance`` bits: (P, 3) int64 rows ``[i, j, distance]``.

    ``b`` None: pairs inside ``a`` with i < j; else ``i`` in ``a``, ``j`` in ``b``. At most ``per_item`` closest
    partners per ``i`` (bounded output when many hashes coincide). Memory ~ 9 x ``chunk`` x len(b) bytes.
    """
    a = np.ascontiguousarray(a, dtype=np.uint64)
    other = a if b is None else np.ascontiguousarray(b, dtype=np.uint64)
    rows: list[np.ndarray] = []
    for s in range(0, len(a), chunk):
        q = a[s : s + chunk]
        start = s if b is None else 0  # self-search: only the columns from this chunk on
        d = np.bitwise_count(q[:, None] ^ other[None, start:]).astype(np.int16)
        if b is None:
            d[np.arange(len(q))[:, None] >= np.arange(d.shape[1])[None, :]] = 99  # j <= i: masked
        ii, jj = np.nonzero(d <= max_distance)
        if not len(ii):
            continue
        dist = d[ii, jj]
        order = np.lexsort((jj, dist, ii))  # by i, then distance, then j
        ii, jj, dist = ii[order], jj[order], dist[order]
        rank = np.arange(len(ii)) - np.searchsorted(ii, ii)  # position within each i's partners
        keep = rank < per_item
        rows.append(np.stack([ii[keep] + s, jj[keep] + start, dist[keep]], axis=1).astype(np.int64))
    return np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)


def exact_groups(hashes: np.ndarray, readable: np.ndarray) -> list[np.ndarray]:
    """Groups (2+ members, ascending indices) of readable items with equal pixel hashes, by first member."""
    idx = np.flatnonzero(readable)
    if not len(idx):
        return []
    _, inverse, counts = np.unique(hashes[idx], return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # members of a group together, ascending within it
    groups = np.split(idx[order], np.cumsum(counts)[:-1])
    return sorted((g for g in groups if len(g) > 1), key=lambda g: int(g[0]))
