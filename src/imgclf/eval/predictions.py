"""Saved validation predictions of a run (logits, labels, sample names) for reports and analysis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from ..data.sources import Samples
from ..io import save_safetensors
from ..models.inference import Outputs


class Saved(NamedTuple):
    logits: torch.Tensor  # (N, K)
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) positions in the validation split
    names: list[str]  # file path (or array item) of each row


def save_predictions(path: Path, out: Outputs, samples: Samples) -> None:
    names = [samples.describe(int(i)) for i in out.indices]
    save_safetensors(path, {"logits": out.logits, "labels": out.labels, "indices": out.indices},
                     {"names": json.dumps(names)})  # fmt: skip


def load_predictions(path: Path) -> Saved | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = json.loads((f.metadata() or {}).get("names", "[]"))
        return Saved(f.get_tensor("logits"), f.get_tensor("labels"), f.get_tensor("indices"), names)


def top_losses(saved: Saved, class_names: list[str], n: int, temperature: float = 1.0) -> list[dict]:
    """The ``n`` most confidently wrong predictions: name, true/predicted label, their probabilities."""
    probs = (saved.logits.float() / temperature).softmax(1)
    conf, pred = probs.max(1)
    wrong = (pred != saved.labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:n]
    return [
        {
            "row": int(i),
            "index": int(saved.indices[i]),
            "name": saved.names[i] if i < len(saved.names) else str(int(saved.indices[i])),
            "true": class_names[int(saved.labels[i])],
            "pred": class_names[int(pred[i])],
            "p_pred": float(conf[i]),
            "p_true": float(probs[i, saved.labels[i]]),
        }
        for i in order
    ]
