"""TorchScript: the serving graph traced, with the metadata as extra files."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...artifact import Artifact
from ...errors import ImgclfError
from ...io import atomic_path
from .graph import ServingModel, example_input, export_failure
from .verification import _Job

log = logging.getLogger("imgclf")


def _export_torchscript(serving: ServingModel, art: Artifact, pixels: str, out: Path, meta: dict[str, str]):
    x = example_input(art, pixels)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export; it is still what many C++ and
        # mobile deployments load, so it stays as an option (ONNX / OpenVINO are the default paths)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.trace(serving, (x,), check_trace=False)
        except Exception as e:  # noqa: BLE001 - tracing raises many types
            raise ImgclfError(export_failure(art.arch, "torchscript", e)) from None
        with atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={k: v.encode() for k, v in meta.items()})
    return out


def _torchscript(job: _Job) -> dict[str, Any]:
    log.warning("TorchScript is deprecated in PyTorch 2.x; --format pt2 (torch.export) is its successor")
    path = _export_torchscript(job.serving, job.art, job.pixels, job.path, job.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))

    def run_ts(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x))[0].numpy()

    return {"path": str(path), "verify": job.verify(run_ts)}
