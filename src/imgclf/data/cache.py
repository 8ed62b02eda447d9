"""What identifies a split's content for on-disk caches keyed by content (cached features, decoded pixels)."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from .sources import Samples


def data_identity(samples: Samples) -> str:
    """Content of in-memory arrays, or path + size + mtime of every file, plus the labels."""
    h = hashlib.sha256(np.ascontiguousarray(samples.labels).tobytes())
    if samples.labels.ndim == 2:  # label sets: their shape is part of what the bytes mean
        h.update(f"multi-label {samples.labels.shape}".encode())
    if samples.arrays is not None:
        h.update(np.ascontiguousarray(samples.arrays[np.asarray(samples.items)]).tobytes())
    elif samples.store is not None:  # tar shards, dataset rows: the store's content identity and the positions
        h.update(f"{samples.store.identity()}|{samples.items}".encode())
    else:
        for p in samples.items:
            st = os.stat(p) if os.path.exists(p) else None
            h.update(f"{p}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()
