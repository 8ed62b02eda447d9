"""Few-shot evaluation: N-way K-shot accuracy (mean and 95 % CI over random episodes) on embeddings computed
once; ``few_shot_report`` does that for K = 1, 5, 10 straight from a data spec.

Episodes classify by ``knn`` (the ``k`` most cosine-similar support images vote with weight
``softmax(sim / temperature)``, Wu et al. 2018 / DINO) or ``prototype`` (nearest class mean, SimpleShot,
Wang et al. 2019).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..artifact import package_versions
from ..config import EmbedConfig, InferConfig
from ..errors import ImgclfError
from ..models.embedding import embed, embed_configs
from ..models.knn import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    check_params,
    classify_embeddings,
)

# --------------------------------------------------------------------------- episodes


def sample_episodes(
    labels: torch.Tensor | np.ndarray,
    *,
    ways: int | None = None,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of random N-way K-shot episodes.

    Each episode picks ``ways`` classes, then per class ``shots`` support and ``queries`` query images, all
    without replacement, from a numpy Generator seeded with ``seed``.

    Only classes with at least ``shots + queries`` images take part; ``ways=None`` uses all of them.
    In an episode, class ``j`` (0..ways-1) owns support columns ``j*shots:(j+1)*shots`` and query
    columns ``j*queries:(j+1)*queries``.

    Returns:
        ``(support_idx (E, ways * shots), query_idx (E, ways * queries))`` int64 positions into ``labels``.

    Example:
        >>> s, q = sample_episodes(np.repeat(np.arange(3), 4), ways=2, shots=1, queries=2, episodes=5)
        >>> s.shape, q.shape
        ((5, 2), (5, 4))
    """
    y = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    for name, v in (("shots", shots), ("queries", queries), ("episodes", episodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ImgclfError(f"episodes: {name} must be an integer >= 1 (got {v!r})")
    pools = {c: np.flatnonzero(y == c) for c in np.unique(y[y >= 0])}
    eligible = np.array(sorted(c for c, idx in pools.items() if len(idx) >= shots + queries))
    n_ways = len(eligible) if ways is None else ways
    if n_ways < 2 or n_ways > len(eligible):
        raise ImgclfError(
            f"episodes: {len(eligible)} of {len(pools)} classes have >= shots + queries = {shots + queries} images,"
            f" need ways = {n_ways} (>= 2); lower queries, shots or ways"
        )
    rng = np.random.default_rng(seed)
    sup = np.empty((episodes, n_ways, shots), dtype=np.int64)
    qry = np.empty((episodes, n_ways, queries), dtype=np.int64)
    for e in range(episodes):
        for j, c in enumerate(rng.permutation(eligible)[:n_ways]):
            pick = rng.choice(pools[c], size=shots + queries, replace=False)
            sup[e, j], qry[e, j] = pick[:shots], pick[shots:]
    return sup.reshape(episodes, -1), qry.reshape(episodes, -1)


def episode_accuracy(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    ways: int | None = None,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 200,
    seed: int = 0,
    mode: str = "prototype",
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 50,
) -> dict[str, Any]:
    """N-way K-shot accuracy over random episodes drawn from precomputed embeddings.

    Episodes come from ``sample_episodes`` and depend only on (labels, seed, ways, shots, queries), so two
    backbones or modes compared with one seed see the same episodes. ``chunk`` episodes are scored at once.

    Args:
        features: (N, D) embeddings (normalised here if they are not).
        labels: (N,) integer class labels.
        ways: classes per episode; None = every class with at least ``shots + queries`` images.
        shots, queries: support and query images per class and episode.
        episodes: number of episodes.
        seed: seed of the numpy Generator that draws them.
        mode, k, temperature: the classification rule (see ``classify_embeddings``).
        chunk: episodes scored per batched call (memory: chunk x ways x (shots + queries) x D floats).

    Returns:
        ``{"mean", "ci95", "std", "accuracies" (one per episode), "ways", "shots", "queries", "episodes",
        "seed", "mode", "k", "temperature", "chance"}``; ``ci95 = 1.96 * std / sqrt(episodes)`` with the
        population std (``np.std``), as in the few-shot literature.

    Example:
        >>> r = episode_accuracy(e.features, e.labels, ways=5, shots=1, episodes=600)  # doctest: +SKIP
        >>> f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} %"  # doctest: +SKIP
        '61.2 ± 0.8 %'
    """
    check_params(k, mode, temperature, where="episodes")
    x = F.normalize(torch.as_tensor(features).detach().float().cpu(), dim=-1)  # (N, D)
    if x.ndim != 2 or len(labels) != x.shape[0]:
        raise ImgclfError(f"episodes: features must be (N, D) and labels (N,), got {tuple(x.shape)}, {len(labels)}")
    s_idx, q_idx = sample_episodes(labels, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed)
    n_ways = s_idx.shape[1] // shots
    s_lab = torch.arange(n_ways).repeat_interleave(shots)  # (ways * shots,)
    q_lab = torch.arange(n_ways).repeat_interleave(queries)  # (ways * queries,)
    accs = []
    for lo in range(0, episodes, max(1, chunk)):
        s, q = torch.from_numpy(s_idx[lo : lo + chunk]), torch.from_numpy(q_idx[lo : lo + chunk])  # (E, S), (E, Q)
        lab = s_lab.expand(len(s), -1)  # (E, S)
        out = classify_embeddings(x[q], x[s], lab, n_ways, mode=mode, k=k, temperature=temperature)  # (E, Q, W)
        accs.append((out.argmax(-1) == q_lab).double().mean(-1))  # (E,)
    a = torch.cat(accs).numpy()
    std = float(a.std())
    return {
        "mean": float(a.mean()), "ci95": 1.96 * std / math.sqrt(episodes), "std": std,
        "accuracies": a.tolist(), "ways": n_ways, "shots": shots, "queries": queries, "episodes": episodes,
        "seed": seed, "mode": mode, "k": k, "temperature": temperature, "chance": 1 / n_ways,
    }  # fmt: skip


def few_shot_report(
    data_spec: str | Path,
    cfg: EmbedConfig | None = None,
    infer: InferConfig | None = None,
    *,
    shots: Sequence[int] = (1, 5, 10),
    ways: int | None = None,
    queries: int = 15,
    episodes: int = 200,
    modes: str | Sequence[str] = ("prototype", "knn"),
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    **fields: Any,
) -> dict[str, Any]:
    """Embed a labelled data set once and report N-way K-shot episode accuracy for every K and mode.

    Args:
        data_spec: folder, CSV, .npz or ``builtin:NAME`` (the pool episodes are drawn from).
        cfg, infer, **fields: backbone, images, preprocessing, loader and device, as in
            ``models.embedding.embed`` (``per_class`` embeds a seeded subset, for speed; ``cfg.seed`` also
            seeds the episodes).
        shots: the K values.
        ways, queries, episodes, k, temperature: as in ``episode_accuracy`` (ways None = all classes).
        modes: ``knn``, ``prototype`` or both.

    Returns:
        JSON-ready dict: ``results[mode][str(K)] = {"mean", "ci95", "std", "ways", "chance", ...}`` plus the
        model, weights source, preprocessing, pool size, timings and package versions.

    Raises:
        ImgclfError: bad k / mode / temperature (before any embedding), unreadable data, too few images
        per class for the episodes.

    Example:
        >>> r = few_shot_report("builtin:fashion-mnist", weights="packaged", per_class=100)  # doctest: +SKIP
        >>> r["results"]["prototype"]["5"]["mean"]  # doctest: +SKIP
        0.72
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    for m in modes:
        check_params(k, m, temperature, where="few_shot_report")
    t0 = time.perf_counter()
    cfg, infer = embed_configs(cfg, infer, fields)
    emb = embed(data_spec, cfg, infer)
    seed = cfg.seed
    t1 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for m in modes:
        results[m] = {}
        for s in shots:
            r = episode_accuracy(emb.features, emb.labels, ways=ways, shots=s, queries=queries, episodes=episodes,
                                 seed=seed, mode=m, k=k, temperature=temperature)  # fmt: skip
            results[m][str(s)] = {key: v for key, v in r.items() if key != "accuracies"}
    return {
        "data": str(data_spec), "split": cfg.split, "model": cfg.model, "arch": emb.arch, "weights": emb.weights_source,
        "preprocessing": emb.preprocessing.to_json(), "n_images": len(emb.labels), "num_classes": len(emb.class_names),
        "class_names": emb.class_names, "per_class": cfg.per_class, "ways": ways or "all", "queries": queries,
        "episodes": episodes, "seed": seed, "k": k, "temperature": temperature, "results": results,
        "skipped_files": emb.skipped, "embed_seconds": round(t1 - t0, 2),
        "episode_seconds": round(time.perf_counter() - t1, 2), "versions": package_versions(),
    }  # fmt: skip
