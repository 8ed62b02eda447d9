"""``imgclf audit --fix OUT``: a cleaned copy of the training list, by the audit's findings.

Files-based data (folders, CSVs) gives a CSV ``path,label`` (multi-label: ``path,labels`` with label sets
joined by the data's separator) with absolute paths, which ``imgclf train --data OUT.csv`` reads. In-memory
arrays (.npz, ``builtin:``) have no paths: OUT must then be an .npz (``images``, ``labels``, ``class_names`` of
the kept rows and ``kept_indices``: their positions in the source). The user's images and lists are never
written, moved or deleted; OUT may not be one of the audited files. Written atomically.

What is dropped or changed, in this order (an image dropped for one reason is not counted again):

1. unreadable images (training would skip them anyway);
2. ``fix_duplicates drop``: the later image of each duplicate pair whose earlier image is kept, and both images
   of each label conflict (the same picture under two labels: neither label can be trusted);
3. ``fix_leaks drop``: the training image of each train / val / test pair;
4. ``fix_labels relabel | drop``: the top ``fix_max_labels`` suspected label errors (all by default) get the
   suggested label, or are dropped.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImgclfError
from ..io import atomic_path, write_text
from .audit import Audit


def fix_plan(audit: Audit) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(keep (N,) bool, labels after relabelling, counts per reason) for the training split."""
    cfg, sp = audit.cfg, audit.splits["train"]
    s, doc = sp.samples, audit.doc
    keep, labels = sp.scan.readable.copy(), s.labels.copy()
    counts = {"unreadable": int((~keep).sum()), "duplicates": 0, "conflicts": 0, "leaks": 0, "label_dropped": 0,
              "relabelled": 0}  # fmt: skip

    def drop(i: int, why: str) -> None:
        if keep[i]:
            keep[i] = False
            counts[why] += 1

    if cfg.fix_duplicates == "drop":
        for p in doc["duplicates"]:
            if p["a"]["split"] == "train" and keep[p["a"]["index"]]:
                drop(p["b"]["index"], "duplicates")
        for p in doc["conflicts"]:
            if p["a"]["split"] == "train":
                drop(p["a"]["index"], "conflicts")
                drop(p["b"]["index"], "conflicts")
    if cfg.fix_leaks == "drop":
        for p in doc["leaks"]:
            for side in (p["a"], p["b"]):
                if side["split"] == "train":
                    drop(side["index"], "leaks")
    if cfg.fix_labels != "keep":
        issues = doc["label_issues"]
        names = {c: i for i, c in enumerate(s.class_names)}
        for it in issues if cfg.fix_max_labels is None else issues[: cfg.fix_max_labels]:
            i = it["index"]
            if not keep[i]:
                continue
            if cfg.fix_labels == "drop":
                drop(i, "label_dropped")
            elif s.multi_label:
                labels[i] = 0
                labels[i, [names[c] for c in it["suggested"].split(s.label_format.sep) if c]] = 1
                counts["relabelled"] += 1
            else:
                labels[i] = names[it["suggested"]]
                counts["relabelled"] += 1
    return keep, labels, counts


def _inputs(audit: Audit) -> set[str]:
    """Every file the audit read: images, lists (CSV, labels.csv, .npz)."""
    out = set()
    for sp in audit.splits.values():
        s = sp.samples
        if s.arrays is None:
            out.update(os.path.realpath(p) for p in s.items)
        for spec in (s.name, s.origin):
            p = Path(spec)
            if spec and p.exists():
                out.add(os.path.realpath(p / "labels.csv" if p.is_dir() else p))
    return out


def write_fix(audit: Audit, out: str | Path) -> dict[str, Any]:
    """Write the cleaned training list to ``out`` (see the module docstring); returns what was done:
    ``{"path", "kept", "of", "dropped": {reason: n}, "relabelled"}``. Raises ImgclfError when ``out`` is an
    audited file or has the wrong suffix for the data."""
    out = Path(out)
    s = audit.splits["train"].samples
    if os.path.realpath(out) in _inputs(audit):
        raise ImgclfError(f"--fix {out}: that is one of the audited files; write the cleaned list elsewhere")
    if s.store is not None:
        raise ImgclfError(f"--fix {out}: {s.name} is not a list of files or arrays (WebDataset shards, a Hugging Face "
                          "dataset); drop --fix and act on the report")  # fmt: skip
    want = ".npz" if s.arrays is not None else ".csv"
    if out.suffix.lower() != want:
        what = "in-memory arrays (.npz / builtin) have no file paths" if want == ".npz" else "the data are image files"
        raise ImgclfError(f"--fix {out}: {what}, so the cleaned list is written as {want} (e.g. --fix cleaned{want})")
    keep, labels, counts = fix_plan(audit)
    idx = np.flatnonzero(keep)
    if s.arrays is not None:
        rows = np.asarray(s.items)[idx]
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=s.arrays[rows], labels=labels[idx], class_names=np.array(s.class_names),
                     kept_indices=idx)  # fmt: skip
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        sep = s.label_format.sep
        w.writerow(["path", "labels" if s.multi_label else "label"])
        for i in idx:
            lab = (sep.join(s.class_names[c] for c in np.flatnonzero(labels[i])) if s.multi_label
                   else s.class_names[labels[i]])  # fmt: skip
            w.writerow([os.path.abspath(s.items[i]), lab])
        write_text(out, buf.getvalue())
    relabelled = counts.pop("relabelled")
    return {"path": str(out), "kept": int(len(idx)), "of": len(s), "dropped": counts, "relabelled": relabelled}
