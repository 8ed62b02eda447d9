"""Export a run for serving: ONNX, torch.export (.pt2), TorchScript (deprecated upstream), OpenVINO IR, int8 ONNX
(QDQ), ExecuTorch (.pte, XNNPACK; fp32 or int8), Core ML (.mlpackage), LiteRT (.tflite) and a Triton repository.

Every exported graph is the run's model wrapped in ``ServingModel``: optionally preprocessing in the
graph (uint8 pixels at the model's input size, NHWC or NCHW, scaled and normalised inside), then the
logits, and calibrated probabilities (``softmax(logits / T)`` with the run's temperature). Labels,
preprocessing, temperature and OOD thresholds go into the model's metadata and into
``export.json`` next to it. Each export is verified against PyTorch on validation images (max abs
logit difference, top-1 agreement) and the figures are stored.

One module per concern: ``graph`` (``ServingModel``, its input and metadata), ``verification`` (the
images and the comparison with PyTorch), one module per format (``onnx``, ``pt2``, ``torchscript``,
``openvino``, ``executorch``, ``coreml``, ``litert``, ``triton``) and ``int8`` (calibration and the tolerance
gate); this module dispatches and writes ``export.json``.

Example:
    >>> export_run("runs/x", "onnx", pixels="nhwc")  # doctest: +SKIP
    {'format': 'onnx', 'path': 'runs/x/export/model.onnx', 'verify': {'top1_agreement': 1.0, ...}}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ...artifact import Artifact, as_artifact, content_key, load_artifact, require, run_path
from ...errors import ImgclfError
from ...io import write_json
from ...models.inference import reparameterized
from ...rundir import EXPORT_FILE, RunDir
from .coreml import _coreml
from .executorch import _executorch
from .graph import OUTPUTS, PIXELS, ServingModel, example_input, metadata, to_input
from .int8 import _int8
from .litert import _litert
from .onnx import _export_onnx, _onnx, ort_session
from .openvino import HELD_MAX_DISAGREEMENT, HELD_N, _openvino
from .pt2 import _pt2
from .torchscript import _torchscript
from .triton import _triton
from .verification import _Job, generated_batches, parity_ok, pixel_batches, verification_batches, verify

__all__ = [
    "FILES", "FORMATS", "HELD_MAX_DISAGREEMENT", "HELD_N", "OUTPUTS", "PIXELS", "ServingModel", "example_input",
    "export_run", "generated_batches", "metadata", "ort_session", "parity_ok", "pixel_batches", "set_int8_accepted",
    "to_input", "verification_batches", "verify",
]  # fmt: skip

log = logging.getLogger("imgclf")

FORMATS = ("onnx", "pt2", "torchscript", "openvino", "openvino-int8", "onnx-int8", "executorch", "executorch-int8",
           "coreml", "litert", "triton")  # fmt: skip
#: formats made from the PyTorch graph directly (the others go through a staged fp32 ONNX graph)
FROM_TORCH = frozenset({"pt2", "torchscript", "executorch", "executorch-int8", "coreml", "litert"})
#: the file each format leaves in the export directory
FILES = {
    "onnx": "model.onnx",
    "pt2": "model.pt2",
    "torchscript": "model.ts",
    "openvino": "model.xml",
    "openvino-int8": "model.int8.xml",
    "onnx-int8": "model.int8.onnx",
    "executorch": "model.pte",
    "executorch-int8": "model.int8.pte",
    "coreml": "model.mlpackage",
    "litert": "model.tflite",
    "triton": "triton",
}


def export_run(
    run: str | Path | Artifact,
    fmt: str = "onnx",
    *,
    output: str | Path | None = None,
    pixels: str = "nhwc",
    opset: int | None = None,
    data: Any = None,
    calib_data: str | None = None,
    verify_n: int = 500,
    calib_n: int = 256,
    int8_tolerance: float = 1.0,
    force: bool = False,
    triton_max_batch: int = 64,
    triton_delay_us: int = 2000,
    generated_ok: bool = False,
    int8_gate: bool = True,
) -> dict[str, Any]:
    """Export ``run`` (a run directory or an ``Artifact`` read from one) as ``fmt`` into ``output`` (default
    ``<run>/export``), verify it against PyTorch, write ``export.json``.

    Verification uses ``data`` (a source, or labelled ``Samples`` already opened: agreement, logit difference and
    the top-1 drop), or without it generated pictures (agreement and logit difference only; a warning says so
    unless ``generated_ok``). The int8
    formats are calibrated on ``calib_n`` training images (``calib_data`` or the run's training data) and
    refused when they lose more than ``int8_tolerance`` top-1 points on the verification images, unless
    ``force``; ``int8_gate=False`` leaves that judgement to the caller (``compress`` judges against a teacher and
    records its verdict with ``set_int8_accepted``).
    """
    if fmt not in FORMATS:
        raise ImgclfError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    art, run_dir = as_artifact(run), run_path(run)
    require(art, "export")
    model, art = load_artifact(art, "cpu")
    model = reparameterized(model.float(), art.preprocessing.input_size)  # MobileOne, FastViT, ...: fused form
    if not data and not generated_ok:
        log.warning("%s: no --data given: the %s export is verified on %d generated pictures (agreement with "
                    "PyTorch only); pass --data for real images and the top-1 drop",
                    run_dir, fmt, verify_n)  # fmt: skip
    out_dir = Path(output) if output else RunDir(run_dir).export
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # only the onnx format writes model.onnx; the others stage the fp32 graph under a hidden name
    onnx_path = out_dir / ("model.onnx" if fmt == "onnx" else f".model.fp32-for-{fmt}.onnx")
    job = _Job(run_dir, art, ServingModel(model.float(), art, pixels), metadata(art, pixels, run_dir),
               list(verification_batches(art, data, verify_n)), pixels, out_dir, onnx_path,
               out_dir / FILES[fmt])  # fmt: skip
    result: dict[str, Any] = {"format": fmt, "pixels": pixels, "outputs": list(OUTPUTS), "run": str(run_dir),
                              "run_key": content_key(run_dir), "metadata": job.meta}  # fmt: skip
    if fmt not in FROM_TORCH:
        _export_onnx(job.serving, art, pixels, onnx_path, job.meta, opset)
    try:
        if fmt.endswith("int8"):
            result.update(_int8(job, fmt, calib_data, calib_n, int8_tolerance, force, int8_gate))
        elif fmt == "triton":
            result.update(_triton(job, triton_max_batch, triton_delay_us))
        else:
            result.update({"onnx": _onnx, "pt2": _pt2, "torchscript": _torchscript, "openvino": _openvino,
                           "executorch": _executorch, "coreml": _coreml, "litert": _litert}[fmt](job))  # fmt: skip
    finally:
        if fmt != "onnx":
            onnx_path.unlink(missing_ok=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    v = result["verify"]
    if v.get("skipped"):
        log.warning("%s export not verified: %s", fmt, v["skipped"])
    elif not fmt.endswith("int8") and not parity_ok(v):
        log.warning("%s export differs from PyTorch: top-1 agreement %.4f, max relative logit difference %.2e",
                    fmt, v["top1_agreement"], v["max_rel_logit_diff"])  # fmt: skip
    record = out_dir / EXPORT_FILE
    doc = json.loads(record.read_text()) if record.is_file() else {}
    doc[fmt] = result
    write_json(record, doc)
    return result


def set_int8_accepted(run: str | Path, fmt: str, accepted: bool) -> None:
    """Record in ``<run>/export/export.json`` whether the int8 export ``fmt`` may be picked by ``--runtime auto``
    (a caller's own accuracy judgement, e.g. ``compress`` against a teacher)."""
    record = RunDir(run_path(run)).export / EXPORT_FILE
    doc = json.loads(record.read_text())
    doc[fmt]["accepted"] = bool(accepted)
    write_json(record, doc)
