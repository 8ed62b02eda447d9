"""torch.export (``.pt2``): the serving graph as an ``ExportedProgram`` with a dynamic batch dimension and the
metadata as extra files; the successor of TorchScript, which torch 2.x deprecates. Load it in an application with
``torch.export.load("model.pt2").module()`` (no imgclf or timm needed); it is also the input of ExecuTorch and
AOTInductor. ``torch.export.load`` may fall back to unpickling, so imgclf only ever loads the file it has just
written (to verify it) and no runtime of ``imgclf serve`` reads one."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from ...artifact import Artifact
from ...errors import ImgclfError
from ...io import atomic_path
from .graph import ServingModel, example_input, export_failure, export_program
from .verification import _Job

#: largest batch the exported program accepts (its batch dimension is symbolic up to this)
MAX_BATCH = 4096


def exported_program(serving: ServingModel, art: Artifact, pixels: str) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the serving graph, batch dimension dynamic (1 .. ``MAX_BATCH``); ImgclfError naming
    the operation when the model cannot be captured."""
    try:
        return export_program(serving.eval(), example_input(art, pixels), MAX_BATCH)
    except Exception as e:  # noqa: BLE001 - export raises many types (guards, unsupported ops, data-dependent code)
        raise ImgclfError(export_failure(art.arch, "pt2", e)) from None


def _pt2(job: _Job) -> dict[str, Any]:
    ep = exported_program(job.serving, job.art, job.pixels)
    buf = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer; the file is written atomically
    torch.export.save(ep, buf, extra_files=dict(job.meta))
    with atomic_path(job.path) as tmp:
        tmp.write_bytes(buf.getvalue())
    module = torch.export.load(str(job.path)).module()  # the file just written, not one from elsewhere

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x))[0].numpy()

    return {"path": str(job.path), "verify": job.verify(run)}
