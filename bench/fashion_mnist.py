"""The official Fashion-MNIST split (60k train / 10k test) as one .npz that `imgclf train --data` reads.

Reads the IDX files of the Debian package `dataset-fashion-mnist` (MIT, (c) 2017 Zalando SE) and writes
`bench/data/fashion_mnist_full.npz` with train_/test_ images and labels plus class_names. The test
split is picked up automatically as the run's test set; validation is a stratified 10 % of train.

Usage: python bench/fashion_mnist.py [--src /usr/share/datasets/fashion-mnist] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_embedded_data import CLASS_NAMES, load_split  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "data" / "fashion_mnist_full.npz"


def ensure_full(src: Path = Path("/usr/share/datasets/fashion-mnist"), out: Path = DEFAULT_OUT) -> Path:
    """Write the .npz once (if missing) and return its path."""
    if out.is_file():
        return out
    if not (src / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"error: Fashion-MNIST IDX files not found in {src} (apt-get install dataset-fashion-mnist)")
    xtr, ytr = load_split(src, "train")
    xte, yte = load_split(src, "t10k")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, train_images=xtr, train_labels=ytr.astype(np.int64), test_images=xte,
             test_labels=yte.astype(np.int64), class_names=np.array(CLASS_NAMES))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    print(ensure_full(a.src, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
