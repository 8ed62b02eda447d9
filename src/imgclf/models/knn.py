"""The k-NN / nearest-prototype classifier over L2-normalised pooled embeddings of a timm backbone.

- ``knn``: the ``k`` most cosine-similar support images vote, each with weight ``softmax(sim / temperature)``
  over those ``k`` (the distance-weighted vote of Wu et al. 2018 / DINO), or
- ``prototype``: the nearest class mean of the normalised embeddings (cosine), probabilities
  ``softmax(cos / temperature)`` (SimpleShot, Wang et al. 2019).

``KNNClassifier.forward`` returns log-probabilities whose softmax is the vote distribution, so code
written for classifiers works unchanged. Building, extending and testing indexes lives in
``imgclf.fewshot``.
"""

from __future__ import annotations

import json
import math
import typing
import unicodedata
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import KNNConfig
from ..errors import ImgclfError, first_line
from .inference import embedding_dim

KIND = "knn"  #: ``imgclf.json`` ``kind`` of a saved index
MODES = typing.get_args(typing.get_type_hints(KNNConfig)["mode"])  # ("knn", "prototype")
DEFAULT_K = KNNConfig.k
DEFAULT_TEMPERATURE = KNNConfig.temperature  # 0.07, DINO's k-NN temperature; cosines of one backbone differ by ~0.01
EMB_KEY, LABEL_KEY = "knn.embeddings", "knn.labels"  # index tensors next to the backbone's own keys
_LOG_FLOOR = 1e-12  # classes without votes get log(1e-12), not -inf, so NLL and calibration stay finite


def check_params(k: int, mode: str, temperature: float, where: str = "knn") -> None:
    """Raise ``ImgclfError`` naming the field when ``k``, ``mode`` or ``temperature`` is invalid."""
    if mode not in MODES:
        raise ImgclfError(f"{where}: mode must be one of {', '.join(MODES)} (got {mode!r})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ImgclfError(f"{where}: k must be an integer >= 1 (got {k!r})")
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise ImgclfError(f"{where}: temperature must be > 0 (got {temperature!r})")


# --------------------------------------------------------------------------- scoring on embeddings


def class_prototypes(support: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised mean of the normalised embeddings of each class.

    Args:
        support: (..., S, D) L2-normalised embeddings (leading dims: independent problems, e.g. episodes).
        labels: (..., S) class indices in ``[0, num_classes)``.
        num_classes: K.

    Returns:
        (..., K, D) unit vectors (a zero vector for a class without support).

    Example:
        >>> class_prototypes(torch.eye(2), torch.tensor([0, 1]), 2)
        tensor([[1., 0.],
                [0., 1.]])
    """
    *batch, s, d = support.shape
    n = math.prod(batch)
    offset = torch.arange(n, device=labels.device).repeat_interleave(s) * num_classes  # problem i -> rows i*K..
    sums = torch.zeros(n * num_classes, d, dtype=support.dtype, device=support.device)
    sums.index_add_(0, labels.reshape(-1) + offset, support.reshape(-1, d))  # one op for every problem
    return F.normalize(sums.view(*batch, num_classes, d), dim=-1)


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """(..., B, K) log vote shares from (..., B, S) similarities: the top ``k`` vote with ``softmax(sim / T)``."""
    top, idx = sims.topk(min(k, sims.shape[-1]), dim=-1)  # (..., B, k)
    w = torch.softmax(top / temperature, dim=-1)  # stable for any T; -inf sims (masked) get weight 0
    voter = labels.unsqueeze(-2).expand(sims.shape).gather(-1, idx)  # (..., B, k) labels of the k nearest
    votes = torch.zeros(*sims.shape[:-1], num_classes, dtype=w.dtype, device=w.device)
    votes.scatter_add_(-1, voter, w)  # (..., B, K), rows sum to 1
    return votes.clamp_min(_LOG_FLOOR).log()


def classify_embeddings(
    query: torch.Tensor,
    support: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mode: str = "knn",
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    prototypes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities of each query over the classes, from L2-normalised embeddings.

    Leading dimensions are independent problems (``episode_accuracy`` scores many episodes at once).

    Args:
        query: (..., B, D) normalised query embeddings.
        support: (..., S, D) normalised support embeddings.
        labels: (..., S) support labels in ``[0, num_classes)``.
        num_classes: K.
        mode: ``knn`` (weighted vote of the ``k`` nearest) or ``prototype`` (nearest class mean).
        k: neighbours that vote (``knn`` only; at most S are used).
        temperature: softness of the vote weights / prototype probabilities.
        prototypes: (..., K, D) precomputed ``class_prototypes`` (``prototype`` only).

    Returns:
        (..., B, K) log-probabilities; ``softmax`` of them is the vote distribution (to within 1e-11).

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> classify_embeddings(torch.tensor([[0.6, 0.8]]), s, torch.tensor([0, 1]), 2, k=1).exp()
        tensor([[1.0000e-12, 1.0000e+00]])
    """
    check_params(k, mode, temperature)
    if mode == "prototype":
        protos = class_prototypes(support, labels, num_classes) if prototypes is None else prototypes
        return torch.log_softmax(query @ protos.transpose(-1, -2) / temperature, dim=-1)  # (..., B, K)
    return vote(query @ support.transpose(-1, -2), labels, num_classes, k, temperature)


# --------------------------------------------------------------------------- the classifier module


class KNNClassifier(nn.Module):
    """A timm backbone plus an index of support embeddings that classifies without a trained head.

    ``forward(x)`` returns (B, K) log-probabilities, so code written for classifiers (``model(x)`` then
    softmax/argmax) works unchanged. The timm contract is kept: ``forward_features``,
    ``forward_head(pre_logits=True)`` (the pooled backbone features), ``num_features``, ``num_classes``,
    ``pretrained_cfg``.

    Example:
        >>> backbone = timm.create_model("test_efficientnet", num_classes=0)            # doctest: +SKIP
        >>> clf = KNNClassifier(backbone, torch.randn(6, backbone.num_features),
        ...                     torch.tensor([0, 0, 1, 1, 2, 2]), 3, k=3)                 # doctest: +SKIP
        >>> clf(torch.randn(2, 3, 32, 32)).softmax(-1).sum(-1)                            # doctest: +SKIP
        tensor([1.0000, 1.0000])
    """

    embeddings: torch.Tensor  # (S, D) L2-normalised, float32
    labels: torch.Tensor  # (S,) int64
    prototypes: torch.Tensor  # (K, D) derived from the two above

    def __init__(
        self,
        backbone: nn.Module,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        *,
        k: int = DEFAULT_K,
        mode: str = "knn",
        temperature: float = DEFAULT_TEMPERATURE,
        normalised: bool = False,
    ):
        super().__init__()
        check_params(k, mode, temperature)
        self.backbone = backbone
        self.k, self.mode, self.temperature = k, mode, float(temperature)
        self.num_classes = 0
        # not persistent: ``save_index`` writes them next to the backbone's keys (see ``index_state``)
        self.register_buffer("embeddings", torch.empty(0, 0), persistent=False)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("prototypes", torch.empty(0, 0), persistent=False)
        self.set_support(embeddings, labels, num_classes, normalised=normalised)

    @property
    def num_features(self) -> int:
        """The embedding width D (``forward_head(pre_logits=True)``, timm's ``head_hidden_size``)."""
        return embedding_dim(self.backbone)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.backbone, "pretrained_cfg", {})

    def set_support(
        self, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, *, normalised: bool = False
    ) -> None:
        """Replace the index; every class in ``[0, num_classes)`` needs at least one support embedding.

        ``embeddings`` (S, D) are L2-normalised here unless ``normalised`` says they already are.
        """
        emb, lab = torch.as_tensor(embeddings), torch.as_tensor(labels)
        d = self.num_features
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] != d:
            raise ImgclfError(f"knn: support embeddings must be (S >= 1, {d}), got {tuple(emb.shape)}")
        if lab.shape != (emb.shape[0],) or lab.dtype.is_floating_point:
            raise ImgclfError(f"knn: support labels must be {emb.shape[0]} integers, got {tuple(lab.shape)}")
        counts = torch.bincount(lab.long().clamp_min(0), minlength=num_classes)
        if lab.min() < 0 or len(counts) > num_classes or (counts == 0).any():
            empty = (counts[:num_classes] == 0).nonzero().flatten().tolist()
            raise ImgclfError(
                f"knn: support labels must cover every class in [0, {num_classes}) "
                f"(labels {int(lab.min())}..{int(lab.max())}; classes without images: {empty[:10]})"
            )
        dev = self.embeddings.device
        self.embeddings = (
            emb.detach().float().to(dev) if normalised else F.normalize(emb.detach().float(), dim=-1).to(dev)
        )
        self.labels = lab.detach().long().to(dev)
        self.num_classes = int(num_classes)
        self.prototypes = class_prototypes(self.embeddings, self.labels, self.num_classes)

    def add_support(self, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> None:
        """Append support embeddings (new labels ``>= num_classes`` add classes); nothing is retrained."""
        lab = torch.as_tensor(labels).long().to(self.labels.device)
        k = max(self.num_classes, int(lab.max()) + 1 if len(lab) else 0) if num_classes is None else num_classes
        emb = torch.as_tensor(embeddings).float().to(self.embeddings.device)
        both = torch.cat([self.embeddings, F.normalize(emb, dim=-1)])  # the existing rows stay bit-identical
        self.set_support(both, torch.cat([self.labels, lab]), k, normalised=True)

    def support_counts(self) -> list[int]:
        """Support images per class, in class order."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # (B, C, H, W) for CNNs, (B, N, C) for ViTs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        f = self.backbone.forward_head(x, pre_logits=True)  # (B, D) pooled
        return f if pre_logits else self.classify(f)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) L2-normalised float32 embeddings."""
        return F.normalize(self.forward_head(self.forward_features(x), pre_logits=True).float(), dim=-1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features (normalised here) -> (B, K) log-probabilities."""
        q = F.normalize(features.float(), dim=-1)
        return classify_embeddings(
            q, self.embeddings, self.labels, self.num_classes,
            mode=self.mode, k=self.k, temperature=self.temperature, prototypes=self.prototypes,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_head(self.forward_features(x), pre_logits=True))  # (B, K)

    def index_state(self) -> dict[str, torch.Tensor]:
        """What ``model.safetensors`` holds: the backbone's own keys plus ``knn.embeddings``/``knn.labels``."""
        return {**self.backbone.state_dict(), EMB_KEY: self.embeddings, LABEL_KEY: self.labels}

    def extra_repr(self) -> str:
        n = self.embeddings.shape[0]
        return f"mode={self.mode}, k={self.k}, temperature={self.temperature}, classes={self.num_classes}, support={n}"


def load_knn(wpath: Path, mpath: Path, art: Any, device: str | torch.device = "cpu") -> KNNClassifier:
    """Rebuild the ``KNNClassifier`` saved as ``wpath`` (weights + index) described by ``art`` (from ``mpath``).

    ``imgclf.artifact.load_artifact`` calls this for runs whose ``imgclf.json`` says ``"kind": "knn"``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .factory import build_model

    run_dir = wpath.parent
    info = art.extra.get(KIND)
    if not isinstance(info, dict):
        raise ImgclfError(f"{mpath}: missing the '{KIND}' section of a k-NN index")
    k, mode, temperature = info.get("k"), info.get("mode"), info.get("temperature")
    check_params(k, mode, temperature, where=f"{mpath}: field '{KIND}'")  # type: ignore[arg-type]
    if not wpath.is_file():
        raise ImgclfError(f"{run_dir}: weights file {wpath.name} is missing")
    try:
        with safe_open(str(wpath), framework="pt") as f:
            stored_names = json.loads((f.metadata() or {}).get("class_names", "null"))
        state = load_file(str(wpath))
        emb, labels = state.pop(EMB_KEY), state.pop(LABEL_KEY)
        backbone = build_model(art.arch, 0, art.model_kwargs)
        backbone.load_state_dict(state, strict=True)
    except ImgclfError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt file, missing index tensors, mismatched backbone
        first = first_line(e)
        raise ImgclfError(f"{wpath}: cannot load the k-NN index into {art.arch} ({first})") from None
    if stored_names is None or [unicodedata.normalize("NFC", c) for c in stored_names] != art.class_names:
        raise ImgclfError(
            f"{run_dir}: {wpath.name} and {mpath.name} come from different writes (interrupted save?);"
            " rebuild the index"
        )
    # stored normalised: normalising again would move them by an ulp and loads would not reproduce saves
    clf = KNNClassifier(
        backbone, emb, labels, art.num_classes, k=k, mode=mode, temperature=temperature, normalised=True
    )
    return clf.to(device).eval()
