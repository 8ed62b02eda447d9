"""A served model: one run behind a runtime, with its OOD rule, drift monitor, batcher and Prometheus metrics.

``ServedModel.infer`` is what the batcher calls with a batch of uint8 pixels: the runtime's logits,
calibrated probabilities and embeddings, plus the OOD score and ``unknown`` flag of the run's rule,
and the batch goes into the drift window. ``load_models`` turns ``RUN``, ``NAME=RUN`` or
``NAME:VERSION=RUN`` specs into models (several versions of a name are allowed; the highest
version answers when none is asked for).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifact import Artifact, read_artifact, require
from ..config import opt
from ..data.images import MAX_ASPECT
from ..dist import resolve_device
from ..errors import ImgclfError
from ..eval.inference import run_decode_policy
from ..eval.trust import Trust
from .batcher import Batcher
from .monitor import DriftMonitor
from .runtime import Predictor, auto_predictor, pixel_fn

log = logging.getLogger("imgclf")
_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.-]+)(?::(?P<version>[0-9]+))?=)?(?P<run>.+)$")


@dataclass
class ServeOptions:
    """Limits and batching of ``imgclf serve`` (all per server; batching and the queue per model)."""

    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "TCP port (0: any free port, see --ready-file)")
    runtime: str = opt("auto", "inference runtime (auto: the fastest installed; PyTorch on a GPU)")
    device: str = opt("auto", "device of the torch runtimes: auto | cpu | cuda | cuda:N | mps")
    max_batch: int = opt(32, "images per runtime call (1: batching off)")
    max_delay_ms: float = opt(5.0, "how long the oldest request may wait for a batch to fill")
    max_queue: int = opt(512, "images waiting per model; beyond it requests get 503 + Retry-After")
    max_body_mb: float = opt(32.0, "largest request body (413 beyond)")
    max_pixels: int = opt(
        40_000_000,
        "largest image in pixels, checked from its header before decoding (413); "
        "the limit is this value, above or below Pillow's own default",
    )
    max_images: int = opt(64, "most images in one request (413 beyond)")
    timeout_s: float = opt(30.0, "seconds a request may wait for its answer once read (504 beyond)")
    read_timeout_s: float = opt(30.0, "seconds to receive a request body (408 beyond)")
    drain_s: float = opt(30.0, "on SIGTERM/SIGINT: seconds queued requests may take to finish")
    top_k: int = opt(5, "labels per image in /predict answers (?top_k= overrides)")
    drift_window: int = opt(1000, "images in the sliding drift window, per model")
    drift_min_samples: int = opt(100, "images before drift is judged")
    drift_thresholds: dict[str, float] = field(default_factory=dict)
    decode_threads: int = opt(2, "threads decoding and resizing uploads")
    max_inflight: int = opt(1024, "requests being read, decoded or queued at once (503 beyond)")
    refuse_pause_ms: float = opt(
        250.0,
        "after a 503, how long the refused connection is not read again: a client retrying at once, "
        "ignoring Retry-After, waits that long (0: off)",
    )
    repository: str | None = opt(
        None,
        "model repository REPO/NAME/VERSION/ (run dirs): served, rescanned every --poll-s and on SIGHUP; a new "
        "highest version is loaded while the old answers, then the old is drained and unloaded",
    )
    poll_s: float = opt(2.0, "seconds between rescans of --repository (0: on SIGHUP and load requests only)")
    keep_versions: int = opt(1, "versions of each repository model kept loaded (the highest)")
    capture_dir: str | None = opt(
        None,
        "keep served images here (off by default): every unknown and low-confidence one plus a --capture-rate "
        "share, with labels.csv to fill in for train/audit/retrain",
    )
    capture_rate: float = opt(0.0, "share of the other (confident, known) images captured, 0-1")
    capture_below: float = opt(0.5, "images whose top probability is under this are always captured (0: none)")
    capture_max_mb: float = opt(512.0, "size cap of the captured images (MB); the oldest are removed beyond")
    on_drift: str | None = opt(
        None,
        "shell command (drift report as JSON on stdin; IMGCLF_RUN, IMGCLF_CAPTURE_DIR, ... in its environment) "
        "or http(s):// URL (report POSTed) run once per drift episode; its failure never affects serving",
    )
    on_drift_cooldown_s: float = opt(600.0, "drift returning within this many seconds after an episode: same episode")
    on_drift_timeout_s: float = opt(600.0, "seconds the --on-drift command or webhook may take (killed beyond)")

    def __post_init__(self) -> None:
        for k in ("max_batch", "max_queue", "max_pixels", "max_images", "top_k", "drift_window", "decode_threads",
                  "max_inflight", "drift_min_samples", "keep_versions"):  # fmt: skip
            if getattr(self, k) < 1:
                raise ImgclfError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(self, k)})")
        for k in ("max_delay_ms", "timeout_s", "read_timeout_s", "drain_s", "refuse_pause_ms", "poll_s",
                  "on_drift_cooldown_s", "on_drift_timeout_s"):  # fmt: skip
            if getattr(self, k) < 0:
                raise ImgclfError(f"--{k.replace('_', '-')} must be >= 0 (got {getattr(self, k)})")
        if self.max_body_mb <= 0:
            raise ImgclfError(f"--max-body-mb must be > 0 (got {self.max_body_mb})")
        if self.drift_min_samples > self.drift_window:
            raise ImgclfError(f"--drift-min-samples ({self.drift_min_samples}) must be <= --drift-window "
                              f"({self.drift_window})")  # fmt: skip
        if self.max_queue < self.max_images:
            raise ImgclfError(f"--max-queue ({self.max_queue}) must be >= --max-images ({self.max_images})")


class ServedModel:
    """One run, loaded on a runtime, ready for batches."""

    def __init__(self, name: str, version: str, run_dir: Path, predictor: Predictor, opts: ServeOptions):
        self.name, self.version, self.run_dir, self.predictor = name, version, run_dir, predictor
        self.art: Artifact = predictor.art
        self.trust = Trust.load(run_dir, self.art)
        ref = self.art.drift
        if ref is None:
            log.warning("model %s: %s has no drift reference (trained before drift monitoring); "
                        "`imgclf calibrate %s` adds one", name, run_dir, run_dir)  # fmt: skip
        self.monitor = DriftMonitor(ref, opts.drift_window, opts.drift_min_samples,
                                    check_every=max(1, opts.drift_window // 10), thresholds=opts.drift_thresholds,
                                    name=f"{name}:{version}", task=self.trust)  # fmt: skip
        self.batcher = Batcher(self.infer, opts.max_batch, opts.max_delay_ms, opts.max_queue)
        c, h, w = self.art.preprocessing.input_size
        self.input_hwc = (h, w, c)
        # uploads decode as the run's training data did (bit depth, transparency), within the server's limits
        self.decode = run_decode_policy(self.art, opts.max_pixels, MAX_ASPECT)
        self.to_pixels = pixel_fn(self.art)  # PIL image -> (H, W, C) uint8: the run's resize and crop
        self.feat_dim = -1  # known after the first call
        self.busy_body = json.dumps({"error": f"model {self.key} is busy"}).encode()  # the 503's, made once
        self.origin = "spec"  # or "repository": loaded (and retired) by the model repository watcher
        self.active = 0  # requests that have chosen this model and are not answered yet (a retired one waits)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """One runtime call on (N, H, W, C) uint8 pixels -> every output, N rows each."""
        logits, probs, feats = self.predictor(pixels)
        out = {"logits": logits, "probs": probs, "features": feats}
        judged = self.trust.unknown(torch.from_numpy(logits), torch.from_numpy(feats))
        if judged is not None:
            out["ood_score"], out["unknown"] = judged[0].numpy().astype(np.float32), judged[1].numpy()
        self.monitor.update(probs, feats, out.get("unknown"))
        return out

    def label_sets(self, probs: np.ndarray) -> list[list[int]]:
        """A multi-label run's decided label sets of calibrated ``probs`` (N, K): class indices per image, most
        probable first (its decision thresholds, as predict applies them)."""
        on = self.trust.decide(torch.from_numpy(probs)).numpy()
        return [sorted(np.flatnonzero(row).tolist(), key=lambda c, i=i: -probs[i, c]) for i, row in enumerate(on)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run": str(self.run_dir),
            "arch": self.art.arch,
            "runtime": self.predictor.name,
            "classes": self.art.class_names,
            "task": self.trust.task.kind,
            **({"decision": self.art.decision} if self.trust.multi_label else {}),
            "input": list(self.input_hwc),
            "ood_score": self.trust.ood_score if self.trust.thresholds else None,
            "drift_reference": self.monitor.enabled,
        }


def parse_spec(spec: str) -> tuple[str | None, str | None, Path]:
    m = _SPEC.match(spec)
    if not m:
        raise ImgclfError(f"model spec {spec!r}: expected RUN, NAME=RUN or NAME:VERSION=RUN")
    return m["name"], m["version"], Path(m["run"])


def load_models(specs: list[str], opts: ServeOptions) -> dict[str, dict[str, ServedModel]]:
    """``{name: {version: model}}`` for ``specs`` (see the module docstring)."""
    models: dict[str, dict[str, ServedModel]] = {}
    for spec in specs:
        name, version, run = parse_spec(spec)
        if not run.is_dir():
            raise ImgclfError(f"{run}: not a run directory")
        name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", run.resolve().name)
        version = version or str(len(models.get(name, {})) + 1)
        if version in models.get(name, {}):
            raise ImgclfError(f"model {name} version {version} is given twice")
        models.setdefault(name, {})[version] = load_one(name, version, run, opts)
    return models


def load_one(name: str, version: str, run: Path, opts: ServeOptions, origin: str = "spec") -> ServedModel:
    """One run loaded on its runtime and warmed up (batch 1 and ``max_batch``: the first calls of a shape
    compile kernels), ready to serve. Raises ImgclfError for a run that cannot be served."""
    art = read_artifact(run)
    require(art, "serve")
    t0 = time.perf_counter()
    pred = auto_predictor(art, opts.runtime, str(resolve_device(opts.device)))
    m = ServedModel(name, version, run, pred, opts)
    m.origin = origin
    for n in (1, opts.max_batch):
        m.feat_dim = pred(np.zeros((n, *m.input_hwc), np.uint8))[2].shape[1]
    log.info("model %s:%s from %s on %s (%.1f s)", name, version, run, pred.name, time.perf_counter() - t0)
    return m
