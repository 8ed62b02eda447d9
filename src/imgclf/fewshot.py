"""Few-shot classification without training: a k-NN / nearest-prototype index over pooled embeddings.

Any timm backbone embeds a labelled support set (folder, CSV, .npz or ``builtin:NAME``) with its own
eval preprocessing; the pooled features (``forward_head(pre_logits=True)``) are L2-normalised and kept
as an index. A query is classified by

- ``knn``: the ``k`` most cosine-similar support images vote, each with weight ``softmax(sim / temperature)``
  over those ``k`` (the distance-weighted vote of Wu et al. 2018 / DINO), or
- ``prototype``: the nearest class mean of the normalised embeddings (cosine), probabilities
  ``softmax(cos / temperature)`` (SimpleShot, Wang et al. 2019).

Adding a class is adding its images: nothing is trained. The index is saved as a normal run directory
(``model.safetensors`` + ``imgclf.json`` with ``"kind": "knn"``), so ``load_artifact``, ``predict`` and
``eval`` use it like any trained classifier: ``KNNClassifier.forward`` returns log-probabilities whose
softmax is the vote distribution.

``episode_accuracy`` measures N-way K-shot accuracy (mean and 95 % CI over random episodes) on
embeddings computed once; ``few_shot_report`` does that for K = 1, 5, 10 straight from a data spec.

Example:
    >>> clf, art = build_index("support/", "tf_efficientnet_lite0", "packaged", k=10)  # doctest: +SKIP
    >>> save_index("runs/pets-knn", clf, art)                                           # doctest: +SKIP
    >>> add_to_index("runs/pets-knn", "more_support/")   # new classes welcome, no training  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .artifact import META_FILE, WEIGHTS_FILE, Artifact, load_artifact, package_versions
from .config import DataConfig, ModelConfig
from .data.images import DecodePolicy
from .data.loader import ImageDataset, SkipLog, make_loader
from .data.sources import open_source
from .data.transforms import eval_transform, resolve_preprocessing
from .dist import resolve_device
from .errors import ImgclfError
from .io import atomic_path, write_json
from .models.factory import architecture_of, create_model
from .models.inference import extract_features
from .models.knn import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    KIND,
    MODES,
    KNNClassifier,
    check_params,
    class_prototypes,
    classify_embeddings,
    vote,
)

DEFAULT_MODEL = "tf_efficientnet_lite0"


# --------------------------------------------------------------------------- embedding data


class Embeddings(NamedTuple):
    """A data source embedded by one backbone."""

    features: torch.Tensor  # (N, D) L2-normalised float32 on CPU
    labels: torch.Tensor  # (N,) indices into class_names
    class_names: list[str]  # only classes with at least one embedded image
    preprocessing: dict[str, Any]
    arch: str
    weights_source: str
    skipped: dict[str, str]  # unreadable file -> reason


def _backbone(
    model_name: str, weights: str, input_size: int | None, crop_pct: float | None, interpolation: str | None
) -> tuple[nn.Module, str, str, dict[str, Any]]:
    """(headless model, weights source, timm arch, preprocessing with the overrides applied)."""
    overrides = DataConfig(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation)
    model, source = create_model(ModelConfig(name=model_name, weights=weights), num_classes=0)
    return model.eval(), source, architecture_of(model, model_name), resolve_preprocessing(model, overrides)


def _open(data: str | Path, split: str, per_class: int | None, seed: int, pre: dict[str, Any]):
    """The labelled ``Samples`` of ``data`` decoded per ``pre``, at most ``per_class`` per class (seeded)."""
    samples = open_source(data, split, DecodePolicy.from_preprocessing(pre))
    if per_class is None:
        return samples
    if per_class < 1:
        raise ImgclfError(f"per_class must be >= 1 (got {per_class})")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(samples.labels == c))[:per_class] for c in np.unique(samples.labels)]
    return samples.subset(np.sort(np.concatenate(keep)))


def _embed_samples(
    model: nn.Module,
    samples,
    pre: dict[str, Any],
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    strict_images: bool,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(N, D) normalised embeddings, (N,) labels of ``samples`` and the unreadable files."""
    loader = make_loader(ImageDataset(samples, eval_transform(pre)), batch_size, train=False,
                         num_workers=num_workers, pin_memory=device.type == "cuda")  # fmt: skip
    skips = SkipLog(strict=strict_images)
    model = model.to(device, memory_format=torch.channels_last)  # measured ~3x faster on a busy 2-core CPU
    feats = extract_features(model, loader, device, skips=skips, channels_last=True, progress=progress, desc="embed")
    return F.normalize(feats.features, dim=-1), feats.labels, dict(skips.items)


def _present_classes(labels: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Drop classes without embedded images (empty in the source or all unreadable); relabel densely."""
    present = sorted(set(labels.tolist()))
    lut = torch.full((len(class_names),), -1, dtype=torch.long)
    lut[present] = torch.arange(len(present))
    return lut[labels], [class_names[i] for i in present]


def _embed(
    data: str | Path, model_name: str, weights: str, *, split: str, per_class: int | None, seed: int,
    input_size: int | None, crop_pct: float | None, interpolation: str | None, device: str,
    batch_size: int, num_workers: int, strict_images: bool, progress: bool,
) -> tuple[Embeddings, nn.Module]:  # fmt: skip
    dev = resolve_device(device)
    model, source, arch, pre = _backbone(model_name, weights, input_size, crop_pct, interpolation)
    samples = _open(data, split, per_class, seed, pre)
    feats, labels, skipped = _embed_samples(
        model, samples, pre, dev, batch_size=batch_size, num_workers=num_workers,
        strict_images=strict_images, progress=progress,
    )  # fmt: skip
    if len(labels) == 0:
        raise ImgclfError(f"{samples.name}: no readable images to embed")
    labels, names = _present_classes(labels, samples.class_names)
    return Embeddings(feats, labels, names, pre, arch, source, skipped), model


def embed(
    data: str | Path,
    model_name: str = DEFAULT_MODEL,
    weights: str = "auto",
    *,
    split: str = "train",
    per_class: int | None = None,
    seed: int = 0,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = -1,
    strict_images: bool = False,
    progress: bool = True,
) -> Embeddings:
    """L2-normalised pooled embeddings of a labelled data source, with the backbone's eval preprocessing.

    Args:
        data: folder, CSV, .npz or ``builtin:NAME[:split]``.
        model_name: timm architecture.
        weights: ``auto``, ``packaged``, ``hub``, ``none`` or a weights file (see ``imgclf models``).
        split: split of a multi-split .npz / built-in set.
        per_class: embed at most this many images per class (seeded random choice); None = all.
        seed: seed of that choice.
        input_size, crop_pct, interpolation: preprocessing overrides (default: the model's pretrained config).
        device: ``auto``, ``cpu``, ``cuda``, ...
        batch_size, num_workers, strict_images, progress: loader and reporting options.

    Returns:
        ``Embeddings`` (features (N, D), labels (N,), class names, preprocessing, arch, weights source, skipped).

    Example:
        >>> e = embed("builtin:fashion-mnist", weights="packaged", per_class=20, input_size=64)  # doctest: +SKIP
        >>> e.features.shape  # doctest: +SKIP
        torch.Size([200, 1280])
    """
    return _embed(
        data, model_name, weights, split=split, per_class=per_class, seed=seed, input_size=input_size,
        crop_pct=crop_pct, interpolation=interpolation, device=device, batch_size=batch_size,
        num_workers=num_workers, strict_images=strict_images, progress=progress,
    )[0]  # fmt: skip


# --------------------------------------------------------------------------- the saved index


def support_loo_accuracy(clf: KNNClassifier, max_queries: int = 2000, seed: int = 0) -> float | None:
    """Leave-one-out top-1 of the index on its own support set (at most ``max_queries`` sampled queries).

    Each query is classified by the rest of the index (in ``prototype`` mode its own class mean excludes it),
    a quick check that the embedding separates the classes. None with fewer than 2 support images.

    Example:
        >>> support_loo_accuracy(clf)  # doctest: +SKIP
        0.87
    """
    emb, lab, n = clf.embeddings, clf.labels, clf.embeddings.shape[0]
    if n < 2:
        return None
    q = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(n)[:max_queries])).to(lab.device)
    counts = torch.bincount(lab, minlength=clf.num_classes)
    sums = torch.zeros(clf.num_classes, emb.shape[1], device=emb.device).index_add_(0, lab, emb)
    right = 0
    for chunk in q.split(512):
        x, y = emb[chunk], lab[chunk]  # (B, D), (B,)
        if clf.mode == "knn":
            sims = x @ emb.T  # (B, S)
            sims[torch.arange(len(chunk)), chunk] = -math.inf  # not its own neighbour
            out = vote(sims, lab, clf.num_classes, min(clf.k, n - 1), clf.temperature)
        else:
            out = x @ F.normalize(sums, dim=-1).T  # (B, K)
            own = sums[y] - x  # its class sum without itself
            own_sim = (x * F.normalize(own, dim=-1)).sum(-1)
            out[torch.arange(len(chunk)), y] = torch.where(counts[y] > 1, own_sim, -math.inf)
        right += int((out.argmax(1) == y).sum())
    return right / len(q)


def _index_info(clf: KNNClassifier, class_names: list[str], sources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "k": clf.k,
        "mode": clf.mode,
        "temperature": clf.temperature,
        "embedding_dim": clf.num_features,
        "n_support_total": int(clf.embeddings.shape[0]),
        "n_support": dict(zip(class_names, clf.support_counts())),
        "sources": sources,
    }


def build_index(
    support: str | Path,
    model_name: str = DEFAULT_MODEL,
    weights: str = "auto",
    *,
    k: int = DEFAULT_K,
    mode: str = "knn",
    temperature: float = DEFAULT_TEMPERATURE,
    split: str = "train",
    per_class: int | None = None,
    seed: int = 0,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = -1,
    strict_images: bool = False,
    progress: bool = True,
) -> tuple[KNNClassifier, Artifact]:
    """Embed a labelled support set and return the k-NN classifier and its artifact metadata.

    Args:
        support: folder (one sub-folder per class, any number of shots), CSV, .npz or ``builtin:NAME``.
        model_name, weights: backbone and weight source, as for training.
        k, mode, temperature: the classification rule (see the module docstring).
        split, per_class, seed, input_size, crop_pct, interpolation, device, batch_size, num_workers,
            strict_images, progress: as in ``embed``.

    Returns:
        ``(KNNClassifier in eval mode on the device, Artifact)``; pass both to ``save_index``.
        Classes without a readable image are left out; unreadable files are listed in the artifact.

    Example:
        >>> clf, art = build_index("support/", weights="packaged", mode="prototype")  # doctest: +SKIP
        >>> clf(images).argmax(1)                                                      # doctest: +SKIP
    """
    check_params(k, mode, temperature)
    emb, model = _embed(
        support, model_name, weights, split=split, per_class=per_class, seed=seed, input_size=input_size,
        crop_pct=crop_pct, interpolation=interpolation, device=device, batch_size=batch_size,
        num_workers=num_workers, strict_images=strict_images, progress=progress,
    )  # fmt: skip
    clf = KNNClassifier(model, emb.features, emb.labels, len(emb.class_names), k=k, mode=mode, temperature=temperature)
    clf = clf.to(next(model.parameters()).device).eval()
    source = {"data": str(support), "split": split, "n": len(emb.labels), "skipped": emb.skipped}
    art = Artifact(
        arch=emb.arch,
        class_names=emb.class_names,
        preprocessing=emb.preprocessing,
        config={
            "model": {"name": model_name, "weights": weights},
            "data": {
                "path": str(support),
                "split": split,
                "per_class": per_class,
                "seed": seed,
                "input_size": input_size,
                "crop_pct": crop_pct,
                "interpolation": interpolation,
            },
            "knn": {"k": k, "mode": mode, "temperature": temperature},
        },  # fmt: skip
        metrics={"support_loo_top1": support_loo_accuracy(clf)},
        weights_source=emb.weights_source,
        extra={"kind": KIND, KIND: _index_info(clf, emb.class_names, [source])},
    )
    return clf, art


def save_index(run_dir: str | Path, clf: KNNClassifier, art: Artifact, *, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` (backbone + index tensors) and ``imgclf.json`` into ``run_dir``.

    Both files are written to temporary files and renamed into place one after the other; a load that
    finds them from different writes refuses with a clear error. The backbone keys are timm's own, so
    ``timm.create_model(arch, num_classes=0).load_state_dict({k: v for k, v in
    safetensors.torch.load_file(path).items() if not k.startswith("knn.")})`` loads them in plain timm.

    Args:
        run_dir: the directory (created if missing).
        clf, art: as returned by ``build_index`` (``art.extra['knn']`` is refreshed from ``clf``).
        overwrite: replace an existing index in ``run_dir`` (``add_to_index`` does).

    Returns:
        ``run_dir`` as a Path.

    Example:
        >>> save_index("runs/knn1", *build_index("support/", weights="packaged"))  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if (run_dir / META_FILE).exists() and not overwrite:
        raise ImgclfError(f"{run_dir}: already holds a run; choose another directory or pass overwrite=True")
    if len(art.class_names) != clf.num_classes:
        raise ImgclfError(f"save_index: {len(art.class_names)} class names for an index of {clf.num_classes} classes")
    info = art.extra.get(KIND) if isinstance(art.extra.get(KIND), dict) else {}
    art.extra = {**art.extra, "kind": KIND, KIND: _index_info(clf, art.class_names, info.get("sources", []))}
    art.created = art.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    art.versions = art.versions or package_versions()
    meta = {
        "arch": art.arch,
        "kind": KIND,
        "num_classes": str(clf.num_classes),
        "class_names": json.dumps(art.class_names),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in clf.index_state().items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / META_FILE) as tmp_meta, atomic_path(run_dir / WEIGHTS_FILE) as tmp_weights:
        save_file(tensors, str(tmp_weights), metadata=meta)
        write_json(tmp_meta, art.to_json())
    return run_dir  # on leaving the block the weights are renamed into place first, then the JSON


def load_index(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[KNNClassifier, Artifact]:
    """The ``KNNClassifier`` (eval mode) and ``Artifact`` of a saved index.

    Example:
        >>> clf, art = load_index("runs/knn1")  # doctest: +SKIP
        >>> art.class_names[clf(images).argmax(1)[0]]  # doctest: +SKIP
    """
    model, art = load_artifact(run_dir, device)
    if not isinstance(model, KNNClassifier):
        raise ImgclfError(f"{run_dir}: a trained classifier, not a k-NN index (build one with `imgclf knn`)")
    return model, art


def add_to_index(
    run_dir: str | Path,
    more_support: str | Path,
    *,
    split: str = "train",
    per_class: int | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = -1,
    strict_images: bool = False,
    progress: bool = True,
) -> tuple[KNNClassifier, Artifact]:
    """Add labelled images to a saved index in place; unseen class names become new classes. No training.

    The images are embedded with the index's own backbone and stored preprocessing; class names are
    matched by name (new ones are appended, so existing class indices never change). Both files are
    rewritten as in ``save_index``.

    Args:
        run_dir: a directory written by ``save_index``.
        more_support: folder, CSV, .npz or ``builtin:NAME`` with the images to add.
        split, per_class, seed, device, batch_size, num_workers, strict_images, progress: as in ``embed``.

    Returns:
        The updated ``(KNNClassifier, Artifact)``.

    Example:
        >>> clf, art = add_to_index("runs/knn1", "new_classes/")  # doctest: +SKIP
        >>> art.class_names[-1]  # doctest: +SKIP
        'zebra'
    """
    dev = resolve_device(device)
    clf, art = load_index(run_dir, dev)
    samples = _open(more_support, split, per_class, seed, art.preprocessing)
    feats, labels, skipped = _embed_samples(
        clf.backbone, samples, art.preprocessing, dev, batch_size=batch_size, num_workers=num_workers,
        strict_images=strict_images, progress=progress,
    )  # fmt: skip
    if len(labels) == 0:
        raise ImgclfError(f"{samples.name}: no readable images to add")
    labels, new_names = _present_classes(labels, samples.class_names)
    names = art.class_names + [c for c in new_names if c not in art.class_names]
    lut = torch.tensor([names.index(c) for c in new_names], dtype=torch.long)
    clf.add_support(feats, lut[labels], len(names))
    art.class_names = names
    art.metrics = {**art.metrics, "support_loo_top1": support_loo_accuracy(clf)}
    info = art.extra.get(KIND, {})
    info["sources"] = [*info.get("sources", []), {"data": str(more_support), "split": split, "n": len(labels),
                                                   "skipped": skipped}]  # fmt: skip
    save_index(run_dir, clf, art, overwrite=True)
    return clf, art


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
    model_name: str = DEFAULT_MODEL,
    weights: str = "auto",
    *,
    shots: Sequence[int] = (1, 5, 10),
    ways: int | None = None,
    queries: int = 15,
    episodes: int = 200,
    seed: int = 0,
    modes: str | Sequence[str] = ("prototype", "knn"),
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    split: str = "train",
    per_class: int | None = None,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = -1,
    strict_images: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed a labelled data set once and report N-way K-shot episode accuracy for every K and mode.

    Args:
        data_spec: folder, CSV, .npz or ``builtin:NAME`` (the pool episodes are drawn from).
        model_name, weights: backbone and weight source.
        shots: the K values.
        ways, queries, episodes, seed, k, temperature: as in ``episode_accuracy`` (ways None = all classes).
        modes: ``knn``, ``prototype`` or both.
        split, per_class, input_size, crop_pct, interpolation, device, batch_size, num_workers,
            strict_images, progress: as in ``embed`` (``per_class`` embeds a seeded subset, for speed).

    Returns:
        JSON-ready dict: ``results[mode][str(K)] = {"mean", "ci95", "std", "ways", "chance", ...}`` plus the
        model, weights source, preprocessing, pool size, timings and package versions.

    Example:
        >>> r = few_shot_report("builtin:fashion-mnist", weights="packaged", per_class=100)  # doctest: +SKIP
        >>> r["results"]["prototype"]["5"]["mean"]  # doctest: +SKIP
        0.72
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    for m in modes:
        check_params(k, m, temperature, where="few_shot_report")
    t0 = time.perf_counter()
    emb = embed(
        data_spec, model_name, weights, split=split, per_class=per_class, seed=seed, input_size=input_size,
        crop_pct=crop_pct, interpolation=interpolation, device=device, batch_size=batch_size,
        num_workers=num_workers, strict_images=strict_images, progress=progress,
    )  # fmt: skip
    t1 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for m in modes:
        results[m] = {}
        for s in shots:
            r = episode_accuracy(emb.features, emb.labels, ways=ways, shots=s, queries=queries, episodes=episodes,
                                 seed=seed, mode=m, k=k, temperature=temperature)  # fmt: skip
            results[m][str(s)] = {key: v for key, v in r.items() if key != "accuracies"}
    return {
        "data": str(data_spec), "split": split, "model": model_name, "arch": emb.arch, "weights": emb.weights_source,
        "preprocessing": emb.preprocessing, "n_images": len(emb.labels), "num_classes": len(emb.class_names),
        "class_names": emb.class_names, "per_class": per_class, "ways": ways or "all", "queries": queries,
        "episodes": episodes, "seed": seed, "k": k, "temperature": temperature, "results": results,
        "skipped_files": emb.skipped, "embed_seconds": round(t1 - t0, 2),
        "episode_seconds": round(time.perf_counter() - t1, 2), "versions": package_versions(),
    }  # fmt: skip


__all__ = [
    "DEFAULT_K",
    "DEFAULT_TEMPERATURE",
    "KIND",
    "MODES",
    "Embeddings",
    "KNNClassifier",
    "add_to_index",
    "build_index",
    "class_prototypes",
    "classify_embeddings",
    "embed",
    "episode_accuracy",
    "few_shot_report",
    "load_index",
    "sample_episodes",
    "save_index",
    "support_loo_accuracy",
]
