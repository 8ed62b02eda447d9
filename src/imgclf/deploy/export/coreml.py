"""Core ML (``.mlpackage``, ML program): the serving graph converted by coremltools from its ``torch.export``
program, for iPhones, iPads and Macs. Core ML takes no uint8 tensors, so the input is the same pixels as
float32 (0-255, NHWC, batch 1 to ``COREML_MAX_BATCH``); scaling, normalisation and calibration stay in the
graph, computed in fp16 (Core ML's default precision for ML programs). The metadata go into the model's
``user_defined_metadata``.

Core ML runs only on Apple platforms: on macOS the export is verified against PyTorch like the others; elsewhere it
is converted and marked unverified (``verify.skipped`` says why), never reported as checked.

Source: coremltools' "Converting from PyTorch" guide (ExportedProgram input, ``RangeDim`` flexible shapes)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ImgclfError
from .graph import example_input, export_failure, export_program
from .verification import _Job

COREML_MAX_BATCH = 64


def _convert(job: _Job):
    import coremltools as ct

    if job.pixels == "none":
        raise ImgclfError("--format coreml takes pixels (--pixels nhwc or nchw)")
    x = example_input(job.art, job.pixels).float()  # Core ML takes no uint8 tensors: the same pixels as float32
    try:
        ep = export_program(job.serving.eval(), x, COREML_MAX_BATCH)
        model = ct.convert(ep.run_decompositions({}), convert_to="mlprogram",
                           minimum_deployment_target=ct.target.iOS17)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - export and conversion raise many types
        raise ImgclfError(export_failure(job.art.arch, "coreml", e)) from None
    model.user_defined_metadata.update(job.meta)
    model.short_description = f"imgclf {job.art.arch}: pixels (float32 0-255) -> logits, probs, features"
    return model


def _coreml(job: _Job) -> dict[str, Any]:
    if importlib.util.find_spec("coremltools") is None:
        raise ImgclfError("--format coreml needs coremltools: pip install 'imgclf[edge]'")
    model = _convert(job)
    with tempfile.TemporaryDirectory(dir=job.path.parent, prefix=".coreml-") as tmp:  # whole package or nothing
        staged = Path(tmp) / job.path.name
        model.save(str(staged))
        if job.path.exists():
            shutil.rmtree(job.path)
        staged.rename(job.path)
    out: dict[str, Any] = {"path": str(job.path)}
    if sys.platform == "darwin":
        outputs = [o.name for o in model.get_spec().description.output]

        def run(x: np.ndarray) -> np.ndarray:
            name = model.get_spec().description.input[0].name
            return np.asarray(model.predict({name: x.astype(np.float32)})[outputs[0]])

        out["verify"] = job.verify(run)
    else:
        out["verify"] = {"images": 0, "skipped": "Core ML runs only on Apple platforms: not verified here"}
    return out
