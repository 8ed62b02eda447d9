"""The int8 formats (onnx-int8, openvino-int8, executorch-int8): calibration on training images, quantization, and the
tolerance gate that refuses a model losing too much top-1 accuracy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...errors import ImgclfError
from .graph import to_input
from .onnx import _ort_logits, _quantize_onnx
from .openvino import HELD_N, _ov_runner, _quantize_openvino
from .verification import _calibration_batches, _Job, decider

log = logging.getLogger("imgclf")


def _int8(job: _Job, fmt: str, calib_data: str | None, calib_n: int, tolerance: float, force: bool,
          gate: bool = True) -> dict[str, Any]:  # fmt: skip
    run_dir, art, pixels = job.run_dir, job.art, job.pixels
    held_n = HELD_N if fmt == "openvino-int8" else 0
    calib_b, held_b = _calibration_batches(run_dir, art, calib_data, calib_n, held_n)
    calib = [to_input(px, pixels, art) for px, _ in calib_b]
    held = [to_input(px, pixels, art) for px, _ in held_b]
    if fmt == "onnx-int8":
        q = _quantize_onnx(job.onnx_path, job.path, [{"input": x} for x in calib])
        check = job.verify(_ort_logits(q))
    elif fmt == "executorch-int8":
        from .executorch import load_runner, write_pte

        q = write_pte(job, calib)
        runner = load_runner(q, fmt)
        check = job.verify(lambda x: runner(x)[0])
    else:
        if not held:  # every training image went into calibration: NNCF's check can only use those
            log.warning("openvino-int8: no training images left beyond the %d for calibration; the accuracy-"
                        "controlled quantization checks on the calibration images", calib_n)  # fmt: skip
            held = calib
        q = _quantize_openvino(job.onnx_path, job.path, job.meta, calib, held, tolerance, decider(job.art))
        check = job.verify(_ov_runner(q, None))
    accepted = _int8_gate(fmt, q, check, tolerance, force) if gate else True  # the caller judges (compress)
    return {"path": str(q), "verify": check, "calibration_images": sum(len(x) for x in calib),
            "held_out_images": sum(len(x) for x in held) if fmt == "openvino-int8" else 0,
            "accepted": accepted}  # fmt: skip


def remove_model(path: Path) -> None:
    """Delete a refused model file (an OpenVINO IR's ``.bin`` with its ``.xml``)."""
    path.unlink(missing_ok=True)
    if path.suffix == ".xml":
        path.with_suffix(".bin").unlink(missing_ok=True)


def _int8_gate(fmt: str, path: Path, check: dict[str, Any], tolerance: float, force: bool) -> bool:
    """Refuse (delete) an int8 model that loses more than ``tolerance`` top-1 points, unless ``force``.

    Without labelled verification images (no --data) the disagreement with fp32 stands in for the drop: it
    is never smaller. True when within the tolerance; False when kept by ``force`` (never chosen
    automatically then)."""
    labelled = check.get("labelled", check["images"]) > 0
    loss = check["top1_drop_points"] if labelled else round(100 * (1 - check["top1_agreement"]), 3)
    if loss <= tolerance:
        return True
    what = "loses" if labelled else "disagrees with fp32 on"
    msg = f"{fmt} model {what} {loss:.2f} top-1 points on {check['images']} images (tolerance {tolerance})"
    if not force:
        remove_model(path)
        raise ImgclfError(msg + "; pass --force to keep the int8 model anyway or raise --int8-tolerance")
    log.warning(msg + " (--force: int8 model kept; --runtime auto will not pick it)")
    return False
