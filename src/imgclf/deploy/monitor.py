"""Live monitoring of a served model: a sliding window of its outputs compared with the run's drift reference.

``DriftMonitor.update`` is called with every batch's calibrated probabilities, embeddings and
``unknown`` flags; every ``check_every`` images, but at most once every ``min_interval_s`` seconds (at
thousands of images a second a window of 1,000 would otherwise be recomputed many times a second for
nothing), it recomputes the distances (``eval.drift``), and logs a warning when a statistic crosses its
threshold (and an info line when it comes back); ``listener``, when set, gets every report (the server's
``--on-drift`` hook, ``deploy.hooks``). ``check`` recomputes them at once.
Thread-safe: batches arrive from the inference thread, reports are read by HTTP handlers.

Example:
    >>> mon = DriftMonitor(art.drift, window=1000)   # doctest: +SKIP
    >>> mon.update(probs, feats, unknown); mon.check()       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np

from ..eval.drift import THRESHOLDS, drift_scores, drifted

log = logging.getLogger("imgclf")


class DriftMonitor:
    """Sliding window of the last ``window`` images' probabilities, embeddings and unknown flags."""

    def __init__(
        self,
        reference: dict[str, Any] | None,
        window: int = 1000,
        min_samples: int = 100,
        check_every: int = 100,
        thresholds: dict[str, float] | None = None,
        name: str = "model",
        task: Any = None,
        min_interval_s: float = 1.0,
    ):
        self.ref, self.window, self.min_samples, self.name = reference, window, min_samples, name
        self.task = task  # the run's Trust (or task): what a decision and its confidence are
        self.check_every, self.thresholds = check_every, {**THRESHOLDS, **(thresholds or {})}
        self.min_interval, self._checked_at = min_interval_s, -math.inf
        self._lock = threading.Lock()
        self._probs: np.ndarray | None = None
        self._feats: np.ndarray | None = None
        self._unknown = np.zeros(window, dtype=bool)
        self._pos = self._count = self._since_check = 0
        self.last: dict[str, Any] = {"n": 0, "status": "warming up" if reference else "no reference"}
        self.listener: Any = None  # called with every report (the --on-drift hook); must not block

    @property
    def enabled(self) -> bool:
        return self.ref is not None

    def update(self, probs: np.ndarray, feats: np.ndarray | None, unknown: np.ndarray | None) -> None:
        with self._lock:
            n = len(probs)
            if self._probs is None:
                self._probs = np.zeros((self.window, probs.shape[1]), np.float32)
                if feats is not None:
                    self._feats = np.zeros((self.window, feats.shape[1]), np.float32)
            idx = (self._pos + np.arange(n)) % self.window  # a batch larger than the window keeps its last rows
            self._probs[idx] = probs
            if self._feats is not None and feats is not None:
                self._feats[idx] = feats
            self._unknown[idx] = unknown if unknown is not None else False
            self._pos, self._count = (self._pos + n) % self.window, min(self._count + n, self.window)
            self._since_check += n
            due = self._since_check >= self.check_every and time.monotonic() - self._checked_at >= self.min_interval
        if due and self.enabled:
            self.check()

    def _snapshot(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        with self._lock:
            self._since_check, self._checked_at = 0, time.monotonic()
            n = self._count
            if self._probs is None or n == 0:
                return np.zeros((0, 1)), None, np.zeros(0, bool)
            feats = self._feats[:n].copy() if self._feats is not None else None
            return self._probs[:n].copy(), feats, self._unknown[:n].copy()

    def check(self) -> dict[str, Any]:
        """Recompute the distances on the current window; log crossings; return the report."""
        probs, feats, unknown = self._snapshot()
        rep: dict[str, Any] = {"n": len(probs), "window": self.window, "thresholds": self.thresholds}
        rep["unknown_rate"] = float(unknown.mean()) if len(unknown) else 0.0
        if not self.enabled:
            rep["status"] = "no reference"
        elif len(probs) < self.min_samples:
            rep["status"] = "warming up"
        else:
            rep.update(drift_scores(self.ref, probs, feats, self.task))
            over = drifted(rep, self.thresholds)
            rep["status"], rep["drifted"] = ("drift" if over else "ok"), over
            was = self.last.get("status")
            if over and was != "drift":
                detail = ", ".join(f"{k} {rep[k]:.3f} > {self.thresholds[k]}" for k in over)
                log.warning("drift on model %s over the last %d images: %s", self.name, len(probs), detail)
            elif not over and was == "drift":
                log.info("drift on model %s is back under the thresholds", self.name)
        self.last = rep
        if self.listener is not None:
            self.listener(rep)
        return rep
