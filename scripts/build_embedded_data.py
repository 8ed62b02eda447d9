"""Rebuild the embedded Fashion-MNIST subset shipped in ``src/imgclf/data/embedded/``.

Source: the official Fashion-MNIST IDX files (MIT, (c) 2017 Zalando SE) from the Debian package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``, files in
/usr/share/datasets/fashion-mnist/). Deterministic: a fixed seed picks, per class, 500 images from
the official training split and 100 from the official test split, so anyone gets the same bytes.

Usage: python scripts/build_embedded_data.py [--src DIR] [--train-per-class 500] [--test-per-class 100]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
import sys
from pathlib import Path

import numpy as np

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
OUT = Path(__file__).resolve().parents[1] / "src/imgclf/data/embedded/fashion_mnist_subset.npz"
SEED = 20170825  # the Fashion-MNIST release date


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX (optionally gzipped) file into a numpy array."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(src: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return read_idx(src / f"{prefix}-images-idx3-ubyte.gz"), read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")


def stratified_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [np.sort(rng.permutation(np.flatnonzero(labels == c))[:per_class]) for c in range(len(CLASS_NAMES))]
    return np.concatenate(idx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if not (a.src / "train-images-idx3-ubyte.gz").is_file():
        print(
            f"error: Fashion-MNIST IDX files not found in {a.src} (apt-get install dataset-fashion-mnist)",
            file=sys.stderr,
        )
        return 2
    rng = np.random.default_rng(SEED)
    xtr, ytr = load_split(a.src, "train")
    xte, yte = load_split(a.src, "t10k")
    tr = stratified_pick(ytr, a.train_per_class, rng)
    te = stratified_pick(yte, a.test_per_class, rng)
    arrays = {
        "train_images": xtr[tr],
        "train_labels": ytr[tr].astype(np.int64),
        "train_source_index": tr.astype(np.int64),
        "test_images": xte[te],
        "test_labels": yte[te].astype(np.int64),
        "test_source_index": te.astype(np.int64),
        "class_names": np.array(CLASS_NAMES),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(buf.getvalue())
    digest = hashlib.sha256(
        np.ascontiguousarray(np.concatenate([xtr[tr].ravel(), xte[te].ravel()])).tobytes()
    ).hexdigest()
    print(
        f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB): "
        f"train {len(tr)}, test {len(te)}; pixels sha256 {digest[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
