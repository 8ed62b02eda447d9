"""Out-of-distribution scores, their fitted statistics, thresholds and detection metrics.

Every score is "higher = more in-distribution":

- ``msp``: maximum softmax probability (Hendrycks & Gimpel 2017), with the calibration temperature;
- ``max_logit``: the largest logit (Hendrycks et al. 2022);
- ``energy``: ``T * logsumexp(logits / T)``, the negative free energy (Liu et al. 2020);
- ``mahalanobis``: minus the smallest Mahalanobis distance of the pooled penultimate features to a
  class mean, with one covariance shared by all classes (Lee et al. 2018), fitted on training features
  (scikit-learn's Ledoit-Wolf estimator keeps it well conditioned when data are few);
- ``knn``: cosine similarity to the k-th nearest L2-normalised training feature (Sun et al. 2022).

A threshold is the score that keeps ``tpr`` of in-distribution validation images (default 95 %);
below it a prediction is ``unknown``. AUROC, AUPR (in-distribution as positive) and FPR at 95 % TPR
come from torchmetrics.

Example:
    >>> scores = logit_scores(torch.tensor([[5.0, 0.0], [0.1, 0.0]]))
    >>> scores["msp"][0] > scores["msp"][1]
    tensor(True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryROC

LOGIT_SCORES = ("msp", "max_logit", "energy")
FEATURE_SCORES = ("mahalanobis", "knn")
SCORES = LOGIT_SCORES + FEATURE_SCORES


def logit_scores(
    logits: torch.Tensor, temperature: Any = 1.0, bias: Any = None, multi_label: bool = False
) -> dict[str, torch.Tensor]:
    """MSP, max logit and energy for (N, K) logits.

    Multi-label (one sigmoid per class; ``temperature``/``bias``: one value or (K,), the run's calibration):
    ``msp`` is the largest calibrated label probability, ``max_logit`` the largest logit and ``energy`` the joint
    energy ``sum_k log(1 + exp(z_k / T_k + b_k))`` (Wang et al. 2021, "Can multi-label classification networks
    know what they don't know?"), which grows with the evidence for any label.
    """
    z = logits.float()
    if multi_label:
        c = z / torch.as_tensor(temperature, dtype=torch.float32, device=z.device)
        c = c + torch.as_tensor(bias, dtype=torch.float32, device=z.device) if bias is not None else c
        return {"msp": c.sigmoid().max(1).values, "max_logit": z.max(1).values,
                "energy": torch.nn.functional.softplus(c).sum(1)}  # fmt: skip
    return {
        "msp": (z / temperature).softmax(1).max(1).values,
        "max_logit": z.max(1).values,
        "energy": temperature * torch.logsumexp(z / temperature, dim=1),
    }


@dataclass
class FeatureStats:
    """Class means and shared precision (Mahalanobis) plus a bank of normalised training features (k-NN)."""

    means: torch.Tensor  # (K, D)
    precision: torch.Tensor  # (D, D)
    bank: torch.Tensor  # (M, D), L2-normalised
    knn_k: int = 10

    def mahalanobis(self, feats: torch.Tensor) -> torch.Tensor:
        """(N,) minus the smallest class-conditional Mahalanobis distance (squared)."""
        f = feats.float()
        fp = f @ self.precision  # (N, D)
        d = (fp * f).sum(1, keepdim=True) - 2 * fp @ self.means.T + ((self.means @ self.precision) * self.means).sum(1)
        return -d.min(1).values  # (N,)

    def knn(self, feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(N,) cosine similarity to the k-th nearest training feature."""
        q = torch.nn.functional.normalize(feats.float(), dim=1)
        k = min(self.knn_k, len(self.bank))
        out = [(part @ self.bank.T).topk(k, dim=1).values[:, -1] for part in q.split(chunk)]
        return torch.cat(out) if out else torch.empty(0)

    def scores(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mahalanobis": self.mahalanobis(feats), "knn": self.knn(feats)}

    def state(self) -> dict[str, torch.Tensor]:
        return {"ood.means": self.means, "ood.precision": self.precision, "ood.bank": self.bank}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], knn_k: int) -> FeatureStats:
        return cls(state["ood.means"], state["ood.precision"], state["ood.bank"], knn_k)


def fit_feature_stats(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, knn_k: int = 10, bank_size: int = 20000, seed: int = 0
) -> FeatureStats:
    """Class means, a Ledoit-Wolf shared covariance of the class-centred features, and a feature bank.

    Multi-label ``labels`` (N, K): an image belongs to several classes (or none), so the covariance is of the
    features centred by their overall mean, and the centres are the mean feature of each class's positive
    images plus the overall mean (the all-negative images have no class of their own).
    """
    from sklearn.covariance import LedoitWolf

    if labels.ndim == 2:
        return _multilabel_stats(feats, labels, knn_k, bank_size, seed)
    f = feats.double()
    means = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
    present = labels.unique()
    for c in present:
        means[c] = f[labels == c].mean(0)
    lw = LedoitWolf(assume_centered=True).fit((f - means[labels]).numpy())
    means = means[present]  # a class without training features must not become a centre at the origin
    precision = torch.from_numpy(lw.precision_).float()
    return FeatureStats(means.float(), precision, _bank(feats, bank_size, seed), knn_k)


def _bank(feats: torch.Tensor, bank_size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(feats), generator=g)[:bank_size]
    return torch.nn.functional.normalize(feats[keep].float(), dim=1)


def _multilabel_stats(feats: torch.Tensor, labels: torch.Tensor, knn_k: int, bank_size: int, seed: int) -> FeatureStats:
    from sklearn.covariance import LedoitWolf

    f, y = feats.double(), labels.double()
    mean = f.mean(0, keepdim=True)  # (1, D)
    pos = y.sum(0)  # (K,)
    centres = (y.T @ f)[pos > 0] / pos[pos > 0, None]  # (K', D) mean of each class's positives
    lw = LedoitWolf(assume_centered=True).fit((f - mean).numpy())
    precision = torch.from_numpy(lw.precision_).float()
    return FeatureStats(torch.cat([centres, mean]).float(), precision, _bank(feats, bank_size, seed), knn_k)


def threshold_for_tpr(id_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """The score above which a fraction ``tpr`` of in-distribution samples lies."""
    return float(torch.quantile(id_scores.float(), 1 - tpr))


def detection_metrics(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> dict[str, float]:
    """AUROC, AUPR (in-distribution positive) and FPR at 95 % TPR of one score."""
    s = torch.cat([id_scores, ood_scores]).double()
    # torchmetrics squashes scores outside [0, 1] through a sigmoid, which ties every large score
    # (e.g. Mahalanobis distances of hundreds); the metrics only depend on the order, so use ranks
    uniq, inv = torch.unique(s, return_inverse=True)
    s = (inv.double() / max(len(uniq) - 1, 1)).float()
    y = torch.cat([torch.ones(len(id_scores)), torch.zeros(len(ood_scores))]).long()
    fpr, tpr, _ = BinaryROC(thresholds=None)(s, y)
    at95 = fpr[tpr >= 0.95]
    return {
        "auroc": float(BinaryAUROC(thresholds=None)(s, y)),
        "aupr": float(BinaryAveragePrecision(thresholds=None)(s, y)),
        "fpr_at_95_tpr": float(at95.min()) if len(at95) else 1.0,
    }


def ood_report(id_scores: dict[str, torch.Tensor], ood_scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``detection_metrics`` for every score present in both dicts."""
    return {k: detection_metrics(id_scores[k], ood_scores[k]) for k in SCORES if k in id_scores and k in ood_scores}
