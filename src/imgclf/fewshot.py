"""Few-shot classification without training (the public entry points; the code lives in ``models.embedding``,
``train.knn_index`` and ``eval.fewshot``): a k-NN / nearest-prototype index over pooled embeddings.

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
    >>> clf, art = build_index("support/", weights="packaged", k=10)  # doctest: +SKIP
    >>> save_index("runs/pets-knn", clf, art)                                           # doctest: +SKIP
    >>> add_to_index("runs/pets-knn", "more_support/")   # new classes welcome, no training  # doctest: +SKIP
"""

from __future__ import annotations

from .config import EmbedConfig, EpisodeConfig, KNNConfig
from .eval.fewshot import episode_accuracy, few_shot_report, sample_episodes
from .models.embedding import DEFAULT_MODEL, Embeddings, embed
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
)  # fmt: skip
from .train.knn_index import add_to_index, build_index, load_index, save_index, support_loo_accuracy

__all__ = [
    "DEFAULT_K", "DEFAULT_TEMPERATURE", "KIND", "MODES", "check_params", "class_prototypes", "classify_embeddings",
    "vote", "DEFAULT_MODEL", "EmbedConfig", "EpisodeConfig", "KNNConfig", "Embeddings", "KNNClassifier",
    "add_to_index", "build_index", "embed", "episode_accuracy", "few_shot_report", "load_index", "sample_episodes",
    "save_index", "support_loo_accuracy",
]  # fmt: skip
