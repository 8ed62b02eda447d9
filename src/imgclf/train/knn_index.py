"""Few-shot classification without training: the k-NN / nearest-prototype index's life cycle.

``build_index`` embeds a labelled support set with any timm backbone (``models.embedding``); the index is
a ``models.knn.KNNClassifier`` saved as a normal run directory by the one artifact writer
(``model.safetensors`` + ``imgclf.json`` of kind ``knn``), so ``load_artifact``, ``predict`` and ``eval``
use it like any trained classifier. ``add_to_index`` adds images (and new classes): nothing is trained.

Example:
    >>> clf, art = build_index("support/", weights="packaged", k=10)  # doctest: +SKIP
    >>> save_index("runs/pets-knn", clf, art)                                           # doctest: +SKIP
    >>> add_to_index("runs/pets-knn", "more_support/")   # new classes welcome, no training  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..artifact import Artifact, load_artifact, save_artifact
from ..config import EmbedConfig, InferConfig
from ..dist import resolve_device
from ..errors import ImgclfError
from ..models.embedding import embed_configs, embed_samples, embed_source, open_labelled, present_classes
from ..models.factory import size_kwargs
from ..models.knn import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    KIND,
    KNNClassifier,
    check_params,
    vote,
)

#: ``EmbedConfig`` fields recorded under the index's ``config.data``
DATA_FIELDS = ("split", "per_class", "seed", "input_size", "crop_pct", "interpolation", "pixel_range", "background")
#: fields an index fixes when it is built (its backbone and preprocessing)
FIXED_FIELDS = ("model", "weights", "input_size", "crop_pct", "interpolation", "pixel_range", "background")

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
    cfg: EmbedConfig | None = None,
    infer: InferConfig | None = None,
    *,
    k: int = DEFAULT_K,
    mode: str = "knn",
    temperature: float = DEFAULT_TEMPERATURE,
    **fields: Any,
) -> tuple[KNNClassifier, Artifact]:
    """Embed a labelled support set and return the k-NN classifier and its artifact metadata.

    Args:
        support: folder (one sub-folder per class, any number of shots), CSV, .npz or ``builtin:NAME``.
        cfg, infer, **fields: backbone, images, preprocessing, loader and device, as in ``models.embedding.embed``.
        k, mode, temperature: the classification rule (see the module docstring).

    Returns:
        ``(KNNClassifier in eval mode on the device, Artifact)``; pass both to ``save_index``.
        Classes without a readable image are left out; unreadable files are listed in the artifact.

    Raises:
        ImgclfError: bad k / mode / temperature (before any embedding), unreadable data or no readable image.

    Example:
        >>> clf, art = build_index("support/", weights="packaged", mode="prototype")  # doctest: +SKIP
        >>> clf(images).argmax(1)                                                      # doctest: +SKIP
    """
    check_params(k, mode, temperature)
    cfg, infer = embed_configs(cfg, infer, fields)
    emb, model = embed_source(support, cfg, infer)
    clf = KNNClassifier(model, emb.features, emb.labels, len(emb.class_names), k=k, mode=mode, temperature=temperature)
    clf = clf.to(next(model.parameters()).device).eval()
    source = {"data": str(support), "split": cfg.split, "n": len(emb.labels), "skipped": emb.skipped}
    art = Artifact(
        arch=emb.arch,
        class_names=emb.class_names,
        preprocessing=emb.preprocessing,
        config={
            "model": {"name": cfg.model, "weights": cfg.weights},
            "data": {"path": str(support), **{f: getattr(cfg, f) for f in DATA_FIELDS}},
            "knn": {"k": k, "mode": mode, "temperature": temperature},
        },  # fmt: skip
        metrics={"support_loo_top1": support_loo_accuracy(clf)},
        weights_source=emb.weights_source,
        kind=KIND,
        model_kwargs=size_kwargs(cfg.model, cfg.input_size),  # what create_model built the backbone with
        extra={KIND: _index_info(clf, emb.class_names, [source])},
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
    info = art.extra.get(KIND) if isinstance(art.extra.get(KIND), dict) else {}
    art.kind, art.extra = KIND, {**art.extra, KIND: _index_info(clf, art.class_names, info.get("sources", []))}
    return save_artifact(run_dir, clf, art, overwrite=overwrite)


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
    cfg: EmbedConfig | None = None,
    infer: InferConfig | None = None,
    **fields: Any,
) -> tuple[KNNClassifier, Artifact]:
    """Add labelled images to a saved index in place; unseen class names become new classes. No training.

    The images are embedded with the index's own backbone and stored preprocessing; class names are
    matched by name (new ones are appended, so existing class indices never change). Both files are
    rewritten as in ``save_index``.

    Args:
        run_dir: a directory written by ``save_index``.
        more_support: folder, CSV, .npz or ``builtin:NAME`` with the images to add.
        cfg, infer, **fields: as in ``models.embedding.embed``; only ``split``, ``per_class`` and ``seed`` of
            ``cfg`` apply (the backbone and preprocessing are the index's own).

    Returns:
        The updated ``(KNNClassifier, Artifact)``.

    Raises:
        ImgclfError: ``cfg`` asks for another backbone or preprocessing than the index's, the run is not an
        index, unreadable data or no readable image.

    Example:
        >>> clf, art = add_to_index("runs/knn1", "new_classes/")  # doctest: +SKIP
        >>> art.class_names[-1]  # doctest: +SKIP
        'zebra'
    """
    cfg, infer = embed_configs(cfg, infer, fields)
    dev = resolve_device(infer.device)
    clf, art = load_index(run_dir, dev)
    saved = {"model": art.config.get("model", {}).get("name"), "weights": art.config.get("model", {}).get("weights"),
             **{f: art.config.get("data", {}).get(f) for f in FIXED_FIELDS[2:]}}  # fmt: skip
    # a field left at its default is "not given"; one given must be the index's own (JSON turns tuples to lists)
    fixed = [f for f in FIXED_FIELDS if getattr(cfg, f) != getattr(EmbedConfig, f)
             and json.dumps(getattr(cfg, f)) != json.dumps(saved[f])]  # fmt: skip
    if fixed:
        kept = ", ".join(f"{f} ({saved[f]!r})" for f in fixed)
        raise ImgclfError(f"{run_dir}: an index keeps its own backbone and preprocessing; {kept} cannot change "
                          "when adding images")  # fmt: skip
    samples = open_labelled(more_support, cfg, art.preprocessing, infer)
    feats, labels, skipped = embed_samples(clf.backbone, samples, art.preprocessing, infer)
    if len(labels) == 0:
        raise ImgclfError(f"{samples.name}: no readable images to add")
    labels, new_names = present_classes(labels, samples.class_names)
    names = art.class_names + [c for c in new_names if c not in art.class_names]
    lut = torch.tensor([names.index(c) for c in new_names], dtype=torch.long)
    clf.add_support(feats, lut[labels], len(names))
    art.class_names = names
    art.metrics = {**art.metrics, "support_loo_top1": support_loo_accuracy(clf)}
    info = art.extra.get(KIND, {})
    info["sources"] = [*info.get("sources", []), {"data": str(more_support), "split": cfg.split, "n": len(labels),
                                                   "skipped": skipped}]  # fmt: skip
    save_index(run_dir, clf, art, overwrite=True)
    return clf, art
