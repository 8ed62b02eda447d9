"""The data audit behind ``imgclf audit``: what is wrong with a labelled data set before training on it.

Findings, each listed with the images concerned:

- **files** (``data.audit.file_findings``): unreadable, tiny, extreme aspect, colour-mode mix, EXIF-rotated,
  extension against content;
- **duplicates**: exact (equal hash of the decoded pixels) and near: perceptual hashes (ImageHash's pHash) at
  most ``phash_distance`` bits apart, or backbone embeddings at least ``cosine``-similar, or both signals
  moderately close (at most ``joint_phash`` bits and at least ``joint_cosine``). Either signal alone is noisy
  on small, similar pictures (28 px garments: many distinct items share a pHash within 6 bits), so the
  single-signal thresholds are strict and the joint rule catches re-encoded, resized and cropped copies
  (calibrated with ``bench/audit_injected.py``). A pair inside one split with one label is a *duplicate*,
  with two labels a *label conflict*; a pair across train / val / test is a *leak*. Each exact copy is paired
  with the first copy of its group; near partners are the ``neighbours`` closest per image (a bounded search:
  chunked Hamming distances and a chunked matrix product top-k over L2-normalised embeddings, never an N x N
  matrix);
- **label issues** (training split): Confident Learning (Northcutt, Jiang & Chuang 2021, JAIR, "Confident
  Learning: Estimating Uncertainty in Dataset Labels"; cleanlab's ``find_label_issues``, ``prune_by_noise_rate``,
  ranked by self-confidence) on out-of-fold probabilities of a stratified ``folds``-fold logistic-regression
  probe (``train.probe.fit_lbfgs``) on cached embeddings; the suggested label is the probe's most probable
  class. Multi-label data uses cleanlab's multi-label API (suggested set: probabilities >= 0.5);
- **outliers**: images whose k-th nearest neighbour (cosine distance of normalised embeddings, k =
  ``neighbours``) is far: over the median + ``outlier_z`` robust standard deviations (1.4826 x MAD) of all
  images' (the k-th neighbour distance of Sun, Ming, Zhu & Li 2022, "Out-of-Distribution Detection with Deep
  Nearest Neighbors");
- **balance**: images per class, imbalance ratio (largest / smallest class), classes under ``min_count``.

Hashes and embeddings are cached (``probe.cache_dir``'s folder), keyed by the data's content and the decoding;
a second audit of the same data only searches. ``write_fix`` writes a cleaned copy of the training list (a CSV,
or an .npz for in-memory arrays); the user's files are never changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AuditConfig, Config, DataConfig, EmbedConfig, InferConfig, ModelConfig, ProbeConfig, RunConfig
from ..data.audit import Scan, exact_groups, file_findings, hamming_pairs, mode_counts, scan_samples
from ..data.images import policy_from_config
from ..data.sources import Samples, open_source
from ..errors import ImgclfError

log = logging.getLogger("imgclf")
SCAN_FORMAT = 1
PAIR_KINDS = ("duplicates", "conflicts", "leaks")
FILE_KINDS = ("unreadable", "tiny", "aspect", "mode", "exif_rotated", "extension")
INSTALL = "pip install 'imgclf[audit]'"


def require(module: str) -> None:
    """Import ``module`` (cleanlab, imagehash) or raise a one-line error naming the extra to install."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ImgclfError(f"imgclf audit needs {module}: {INSTALL}") from None


@dataclass
class Split:
    """One audited split: its samples, scan and (when embedded) L2-normalised features of its readable items."""

    name: str
    samples: Samples
    scan: Scan
    feats: torch.Tensor | None = None  # (M, D) float32, rows for ``rows``
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (M,) item indices


@dataclass
class Audit:
    """The report (``doc``, what ``--json`` writes) and the splits it refers to (for thumbnails and ``--fix``)."""

    doc: dict[str, Any]
    splits: dict[str, Split]
    cfg: AuditConfig


# --------------------------------------------------------------------------- opening and caching


def open_splits(data: str, val: str | None, test: str | None, emb: EmbedConfig, infer: InferConfig,
                companions: bool) -> tuple[dict[str, Samples], list[str]]:  # fmt: skip
    """``train`` (DATA, ``emb.split``) and the val/test splits: given, else stored with DATA when ``companions``;
    val/test labels in the training class order. Notes say which companions were added."""
    decode = policy_from_config(emb.data_config(infer))
    train = open_source(data, emb.split, decode)
    if getattr(train.store, "streaming", False):
        raise ImgclfError(f"{data}: the audit reads images by index, which a streamed WebDataset cannot do; pass the "
                          "shards' local paths")  # fmt: skip
    out, notes = {"train": train}, []
    for name, spec in (("val", val), ("test", test)):
        if spec is not None:
            s = open_source(spec, name, decode, train.label_format)
        elif companions and name in train.other_splits:
            s = train.companion(name)
            notes.append(f"the {name} split stored with {data} is audited too (--no-companions: train only)")
        else:
            continue
        if s.multi_label != train.multi_label:
            raise ImgclfError(f"{s.name}: {'label sets' if s.multi_label else 'one label per image'}, unlike "
                              f"{train.name}; audit splits of one kind")  # fmt: skip
        out[name] = s.remap_to(train.class_names)
    return out, notes


def cache_root(cfg: AuditConfig) -> Path:
    """The feature cache folder of the probe (``train.probe.cache_dir``) or ``cfg.cache_dir``."""
    from ..train.probe import cache_dir

    return cache_dir(Config(probe=ProbeConfig(cache_dir=cfg.cache_dir)))


def cached_scan(samples: Samples, cfg: AuditConfig, progress: bool, desc: str) -> Scan:
    """``data.audit.scan_samples`` of ``samples``, from the cache when the data and decoding are unchanged."""
    from ..io import atomic_path
    from ..train.probe import data_identity

    key = {"format": SCAN_FORMAT, "data": data_identity(samples), "items": len(samples),
           "decode": dataclasses.asdict(samples.decode), "bad": sorted(samples.bad.items())}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:40]
    path = cache_root(cfg) / f"audit-scan-{digest}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            log.info("hashes %s: cache hit (%d images)", desc, len(samples))
            return Scan.from_arrays(z)
    scan = scan_samples(samples, progress=progress, desc=f"hash {desc}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **scan.to_arrays())
    return scan


def embed_splits(splits: dict[str, Split], emb: EmbedConfig, infer: InferConfig, cfg: AuditConfig) -> dict:
    """L2-normalised backbone features of every split (the probe's feature cache: ``cached_features``)."""
    from ..artifact import package_versions
    from ..data.loader import SkipLog
    from ..dist import Dist, resolve_device
    from ..models.embedding import backbone
    from ..train.probe import cached_features, weights_identity

    model, source, arch, pre = backbone(emb, infer)
    pcfg = Config(data=DataConfig(batch_size=infer.batch_size, eval_batch_size=infer.batch_size,
                                  num_workers=infer.workers), model=ModelConfig(name=emb.model, weights=emb.weights),
                  probe=ProbeConfig(cache_dir=cfg.cache_dir), run=RunConfig(progress=infer.progress))  # fmt: skip
    dist = Dist(resolve_device(infer.device))
    model = model.to(dist.device, memory_format=torch.channels_last)
    versions = {k: v for k, v in package_versions().items() if k in ("torch", "timm", "imgclf")}
    base = {"arch": arch, "weights": weights_identity(source, pcfg, model), "preprocessing": pre.to_json(),
            "versions": versions}  # fmt: skip
    for sp in splits.values():
        f = cached_features(model, sp.samples, pre.eval(), {"name": f"audit-{sp.name}"}, base, pcfg, dist, SkipLog())
        sp.feats, sp.rows = F.normalize(f.features.float(), dim=-1), f.indices.numpy().astype(np.int64)
    return {"model": arch, "weights": source, "input_size": list(pre.input_size)}


# --------------------------------------------------------------------------- the pool of all splits


@dataclass
class Pool:
    """Every item of every split in one index space (train first)."""

    split: np.ndarray  # (P,) int: position of the item's split in ``names``
    index: np.ndarray  # (P,) item index in its split
    names: list[str]
    pixel_hash: np.ndarray
    phash: np.ndarray
    readable: np.ndarray
    feats: torch.Tensor | None  # (M, D) rows for ``feat_rows``
    feat_rows: np.ndarray  # (M,) pool indices

    @classmethod
    def of(cls, splits: dict[str, Split]) -> Pool:
        names = list(splits)
        sizes = [len(s.samples) for s in splits.values()]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        cat = lambda key: np.concatenate([getattr(s.scan, key) for s in splits.values()])  # noqa: E731
        have = all(s.feats is not None for s in splits.values())
        feats = torch.cat([s.feats for s in splits.values()]) if have else None
        rows = np.concatenate([s.rows + o for s, o in zip(splits.values(), offsets)]) if have else np.zeros(0, int)
        return cls(np.repeat(np.arange(len(names)), sizes), np.concatenate([np.arange(n) for n in sizes]), names,
                   cat("pixel_hash"), cat("phash"), cat("readable"), feats, rows)  # fmt: skip


def cosine_topk(x: torch.Tensor, k: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most similar other rows of L2-normalised ``x`` (N, D): (N, k) cosine similarities
    (descending) and (N, k) row indices, by chunked matrix products (memory ~ 4 x chunk x N bytes)."""
    n = len(x)
    k = min(k, n - 1)
    sims, idx = torch.empty(n, max(k, 0)), torch.empty(n, max(k, 0), dtype=torch.long)
    if k <= 0:
        return sims, idx
    for s in range(0, n, chunk):
        block = x[s : s + chunk] @ x.T  # (c, N)
        r = torch.arange(len(block))
        block[r, r + s] = -float("inf")  # not its own neighbour
        sims[s : s + chunk], idx[s : s + chunk] = block.topk(k, dim=1)
    return sims, idx


def find_pairs(pool: Pool, cfg: AuditConfig) -> tuple[list[tuple[int, int, str]], np.ndarray | None]:
    """(a, b, "exact" | "near") pool index pairs, a < b, and each embedded item's k-th neighbour cosine
    distance (None without embeddings)."""
    pairs: dict[tuple[int, int], str] = {}
    for g in exact_groups(pool.pixel_hash, pool.readable):
        for b in g[1:]:
            pairs[(int(g[0]), int(b))] = "exact"
    ok = np.flatnonzero(pool.readable)
    for i, j, _ in hamming_pairs(pool.phash[ok], max_distance=cfg.phash_distance, per_item=cfg.neighbours):
        pairs.setdefault((int(ok[i]), int(ok[j])), "near")
    kth = None
    if pool.feats is not None and len(pool.feats) > 1:
        sims, idx = cosine_topk(pool.feats, cfg.neighbours)
        kth = (1 - sims[:, -1]).numpy()
        for r, c in zip(*np.nonzero((sims >= min(cfg.cosine, cfg.joint_cosine)).numpy())):
            a, b = int(pool.feat_rows[r]), int(pool.feat_rows[idx[r, c]])
            cos, bits = float(sims[r, c]), int(np.bitwise_count(pool.phash[a] ^ pool.phash[b]))
            if cos >= cfg.cosine or (cos >= cfg.joint_cosine and bits <= cfg.joint_phash):
                pairs.setdefault((min(a, b), max(a, b)), "near")
    return [(a, b, m) for (a, b), m in sorted(pairs.items())], kth


# --------------------------------------------------------------------------- label issues


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each item: every class dealt round-robin over the folds in a seeded order (multi-label: the
    items in a seeded order)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    if labels.ndim == 2:
        fold[rng.permutation(len(labels))] = np.arange(len(labels)) % folds
        return fold
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    return fold


def out_of_fold_probs(x: torch.Tensor, y: np.ndarray, k: int, cfg: AuditConfig) -> np.ndarray:
    """(N, k) probabilities of each item from a logistic-regression probe fitted on the other folds
    (``fit_lbfgs``, one L2 strength ``probe_wd``: nothing is chosen on the held-out fold)."""
    from ..train.probe import fit_lbfgs
    from ..train.tasks import MultiLabelTask, SingleLabelTask

    multi = y.ndim == 2
    task = MultiLabelTask() if multi else SingleLabelTask()
    yt = torch.as_tensor(y, dtype=torch.float32 if multi else torch.long)
    fold = stratified_folds(y, cfg.folds, cfg.seed)
    probs = np.zeros((len(y), k), dtype=np.float64)
    for f in range(cfg.folds):
        tr, va = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if not len(va) or not len(tr):
            continue
        w, b, _ = fit_lbfgs(x[tr], yt[tr], x[va], yt[va], k, [cfg.probe_wd], cfg.probe_iter, task=task)
        z = x[va] @ w.T + b
        probs[va] = (z.sigmoid() if multi else z.softmax(-1)).double().numpy()
    return probs


def label_issues(sp: Split, cfg: AuditConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Suspected label errors of the split's embedded items, most likely first, and the probe's summary."""
    s = sp.samples
    y = s.labels[sp.rows]
    keep = np.ones(len(y), dtype=bool) if s.multi_label else y >= 0
    rows, y, x = sp.rows[keep], y[keep], sp.feats[torch.as_tensor(keep)]
    k = len(s.class_names)
    if s.multi_label:
        return _multilabel_issues(sp, rows, y, x, cfg)
    present = np.unique(y)
    if len(present) < 2:
        return [], {"note": "fewer than two classes: no label issues searched"}
    dense = np.searchsorted(present, y)  # cleanlab wants every class 0..K-1 present
    probs = out_of_fold_probs(x, dense, len(present), cfg)
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(dense, probs, return_indices_ranked_by="self_confidence",
                               filter_by="prune_by_noise_rate", n_jobs=1)  # fmt: skip
    quality = get_label_quality_scores(dense, probs)
    out = []
    for r, i in enumerate(ranked):
        sug = s.class_names[present[probs[i].argmax()]]
        out.append({"rank": r + 1, **ref(sp, int(rows[i])), "suggested": sug, "quality": round(float(quality[i]), 6),
                    "given_prob": round(float(probs[i, dense[i]]), 6)})  # fmt: skip
    acc = float((probs.argmax(1) == dense).mean())
    return out, {"folds": cfg.folds, "oof_accuracy": round(acc, 6), "n": int(len(y)), "classes": int(k)}


def _multilabel_issues(sp: Split, rows: np.ndarray, y: np.ndarray, x: torch.Tensor, cfg: AuditConfig):
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    k = y.shape[1]
    probs = out_of_fold_probs(x, y, k, cfg)
    sets = [list(np.flatnonzero(r)) for r in y]
    ranked = find_label_issues(sets, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(sets, probs)
    s = sp.samples
    out = []
    for r, i in enumerate(ranked):
        sug = s.label_format.sep.join(s.class_names[c] for c in np.flatnonzero(probs[i] >= 0.5))
        out.append({"rank": r + 1, **ref(sp, int(rows[i])), "suggested": sug, "quality": round(float(quality[i]), 6)})
    exact = float(((probs >= 0.5) == (y == 1)).all(1).mean())
    return out, {"folds": cfg.folds, "oof_exact_match": round(exact, 6), "n": int(len(y)), "classes": int(k)}


# --------------------------------------------------------------------------- the report


def label_text(s: Samples, i: int) -> str:
    """Item ``i``'s label as text (a label set joined by the separator; ``-`` unknown)."""
    if s.multi_label:
        return s.label_format.sep.join(s.class_names[c] for c in np.flatnonzero(s.labels[i]))
    return s.class_names[s.labels[i]] if s.labels[i] >= 0 else "-"


def ref(sp: Split, i: int) -> dict[str, Any]:
    """How the report names item ``i`` of a split."""
    return {"split": sp.name, "index": i, "path": sp.samples.describe(i), "label": label_text(sp.samples, i)}


def classify_pairs(pool: Pool, splits: dict[str, Split], pairs: list[tuple[int, int, str]]) -> dict[str, list]:
    """Pairs as report rows under ``duplicates`` (one split, one label), ``conflicts`` (one split, two labels)
    and ``leaks`` (two splits), each with its match (exact | near), Hamming distance and cosine similarity."""
    out: dict[str, list] = {k: [] for k in PAIR_KINDS}
    feat_pos = {int(p): r for r, p in enumerate(pool.feat_rows)}
    for a, b, match in pairs:
        sa, sb = splits[pool.names[pool.split[a]]], splits[pool.names[pool.split[b]]]
        ia, ib = int(pool.index[a]), int(pool.index[b])
        ra, rb = ref(sa, ia), ref(sb, ib)
        cos = None
        if pool.feats is not None and a in feat_pos and b in feat_pos:
            cos = round(float(pool.feats[feat_pos[a]] @ pool.feats[feat_pos[b]]), 6)
        row = {"a": ra, "b": rb, "match": match, "phash_distance": int(np.bitwise_count(pool.phash[a] ^ pool.phash[b])),
               "cosine": cos}  # fmt: skip
        kind = "leaks" if sa.name != sb.name else ("duplicates" if ra["label"] == rb["label"] else "conflicts")
        out[kind].append(row)
    return out


def outliers(pool: Pool, splits: dict[str, Split], kth: np.ndarray | None, z: float) -> list[dict[str, Any]]:
    """Items whose k-th neighbour distance is over median + z x 1.4826 x MAD, farthest first."""
    if kth is None or not len(kth):
        return []
    med = float(np.median(kth))
    mad = 1.4826 * float(np.median(np.abs(kth - med)))
    cut = med + z * max(mad, 1e-6)
    out = []
    for r in np.argsort(-kth):
        if kth[r] <= cut:
            break
        p = int(pool.feat_rows[r])
        sp = splits[pool.names[pool.split[p]]]
        out.append({**ref(sp, int(pool.index[p])), "score": round(float(kth[r]), 6), "threshold": round(cut, 6)})
    return out


def balance(s: Samples, min_count: int) -> dict[str, Any]:
    """Images per class, imbalance ratio (largest / smallest, None with an empty class) and classes under
    ``min_count`` (multi-label: positive images per class)."""
    counts = s.class_counts()
    ratio = float(counts.max() / counts.min()) if len(counts) and counts.min() > 0 else None
    return {"counts": {c: int(n) for c, n in zip(s.class_names, counts)},
            "imbalance_ratio": None if ratio is None else round(ratio, 4),
            "below_min": [c for c, n in zip(s.class_names, counts) if n < min_count]}  # fmt: skip


def run_audit(
    data: str, val_data: str | None, test_data: str | None, cfg: AuditConfig, emb: EmbedConfig, infer: InferConfig
) -> Audit:
    """Audit ``data`` (and its val/test splits); see the module docstring. Raises ImgclfError for unreadable data
    or a missing optional dependency (``pip install 'imgclf[audit]'``)."""
    t0 = time.perf_counter()
    require("imagehash")
    if cfg.embeddings:
        require("cleanlab")
    samples, notes = open_splits(str(data), val_data, test_data, emb, infer, cfg.companions)
    splits = {n: Split(n, s, cached_scan(s, cfg, infer.progress, n)) for n, s in samples.items()}
    model = embed_splits(splits, emb, infer, cfg) if cfg.embeddings else None
    pool = Pool.of(splits)
    pairs, kth = find_pairs(pool, cfg)
    found = classify_pairs(pool, splits, pairs)
    train = splits["train"]
    issues, probe = ([], None)
    if cfg.embeddings and len(train.rows):
        issues, probe = label_issues(train, cfg)
    if not cfg.embeddings:
        notes.append("--no-embeddings: near-duplicates by perceptual hash only; no label issues or outliers")
    files = [{"kind": f["kind"], **ref(sp, f["index"]), "detail": f["detail"]} for sp in splits.values()
             for f in file_findings(sp.samples, sp.scan, cfg.min_side, cfg.max_ratio)]  # fmt: skip
    doc = {
        "imgclf_audit": 1,
        "data": {n: sp.samples.name for n, sp in splits.items()},
        "splits": {
            n: {"n": len(sp.samples), "readable": int(sp.scan.readable.sum()), "multi_label": sp.samples.multi_label}
            for n, sp in splits.items()
        },  # fmt: skip
        "class_names": list(train.samples.class_names),
        "settings": {**dataclasses.asdict(cfg), **(model or {}), "weights_setting": emb.weights},
        "summary": {},
        "files": files,
        "modes": {n: mode_counts(sp.scan) for n, sp in splits.items()},
        **found,
        "label_issues": issues,
        "probe": probe,
        "outliers": outliers(pool, splits, kth, cfg.outlier_z),
        "balance": {n: balance(sp.samples, cfg.min_count) for n, sp in splits.items()},
        "notes": notes + [n for sp in splits.values() for n in sp.samples.notes],
    }
    doc["summary"] = summarize(doc)
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    return Audit(doc, splits, cfg)


def summarize(doc: dict[str, Any]) -> dict[str, int]:
    """Counts per finding kind (pairs split by exact / near)."""
    out = {k: sum(f["kind"] == k for f in doc["files"]) for k in FILE_KINDS}
    for kind in PAIR_KINDS:
        for m in ("exact", "near"):
            out[f"{kind}_{m}"] = sum(p["match"] == m for p in doc[kind])
    out["label_issues"] = len(doc["label_issues"])
    out["outliers"] = len(doc["outliers"])
    out["classes_below_min"] = len(doc["balance"]["train"]["below_min"])
    return out
