"""OpenVINO IR: converted from the fp32 ONNX graph, the metadata in its rt_info; int8 by NNCF."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ImgclfError
from .graph import export_failure
from .verification import _Job, _rows_equal

#: openvino-int8: training images (not the calibration ones) on which NNCF keeps top-1 agreement with fp32
HELD_N = 1000
#: ... within this many points (stricter than the user's tolerance, which is judged on other images)
HELD_MAX_DISAGREEMENT = 0.5


class _StackT(ctypes.Structure):  # POSIX stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_altstack() -> Iterator[None]:
    """Give the calling thread back its signal stack after OpenVINO work.

    Compiling a model on OpenVINO's CPU plugin (2025-2026 releases, seen on AMD Zen 5) points the thread's
    ``sigaltstack`` at a buffer of its own and puts back what it found when the compiled model is destroyed. When
    compiled models are destroyed in another order than they were made (a served version swapped out, NNCF's
    candidate models, several predictors in one process), a thread is left with a signal stack that is no longer
    mapped, and the next signal handled on it (Python's own handlers use SA_ONSTACK: SIGCHLD, SIGTERM) kills the
    process with SIGSEGV. Restoring the stack found before (its owner, such as faulthandler, keeps it) makes every
    saved value the same one, so no destruction order leaves it dangling. Our value: no library does this; a
    no-op where ``sigaltstack`` is not available."""
    libc = _libc()
    before = _StackT()
    if libc is None or libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        now = _StackT()
        read = libc.sigaltstack(None, ctypes.byref(now)) == 0
        if read and (now.ss_sp, now.ss_size, now.ss_flags) != (before.ss_sp, before.ss_size, before.ss_flags):
            libc.sigaltstack(ctypes.byref(before), None)  # (with SS_DISABLE as read when there was none)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    if not hasattr(os, "fork"):  # not POSIX
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _export_openvino(onnx_path: Path, out_xml: Path, meta: dict[str, str], arch: str = "model") -> Path:
    try:
        import openvino as ov
    except ImportError:
        raise ImgclfError("OpenVINO export needs the openvino package: pip install 'imgclf[deploy]'") from None
    try:
        converted = ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - OpenVINO's conversion errors have their own types
        raise ImgclfError(export_failure(arch, "openvino", e)) from None
    return _save_openvino(converted, out_xml, meta)


def _save_openvino(model: Any, out_xml: Path, meta: dict[str, str]) -> Path:
    """Write an ``ov.Model`` with the imgclf metadata in its rt_info; .xml and .bin replace the old ones together."""
    import openvino as ov

    for k, v in meta.items():
        model.set_rt_info(v, ["imgclf", k.removeprefix("imgclf.")])
    with tempfile.TemporaryDirectory(dir=out_xml.parent, prefix=".ov-") as tmp:
        staged = Path(tmp) / out_xml.name  # OpenVINO wants a .xml name and writes the .bin next to it
        ov.save_model(model, str(staged), compress_to_fp16=False)
        staged.with_suffix(".bin").replace(out_xml.with_suffix(".bin"))
        staged.replace(out_xml)
    return out_xml


def _ov_runner(xml: Path | Any, precision: str | None = "f32"):
    """``x -> logits`` of an OpenVINO model (a path or an ``ov.Model``); ``precision`` None: the device's choice."""
    import openvino as ov

    cfg = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    with keep_altstack():
        compiled = ov.Core().compile_model(str(xml) if isinstance(xml, Path) else xml, "CPU", cfg)
    out = compiled.output("logits")
    return lambda x: compiled(x)[out]


def _openvino(job: _Job) -> dict[str, Any]:
    xml = _export_openvino(job.onnx_path, job.path, job.meta, job.art.arch)
    return {"path": str(xml), "verify": job.verify(_ov_runner(xml))}


def _quantize_openvino(
    fp32_onnx: Path, out_xml: Path, meta: dict[str, str], calib: list[np.ndarray], held: list[np.ndarray],
    tolerance: float, decide=None,
) -> Path:  # fmt: skip
    """int8 OpenVINO IR by NNCF post-training quantization with accuracy control.

    Calibrated on ``calib``; NNCF then keeps reverting the layers that hurt most to floating point until
    agreement of the run's decisions (``decide``: logits -> top-1 classes, or multi-label label sets;
    ``verification.decider``) with the fp32 model on ``held`` (other training images, no labels needed) is
    within ``tolerance`` points. The verification images are not used, so their figures stay honest.
    """
    decide = decide or (lambda z: torch.as_tensor(z).argmax(1))
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise ImgclfError("openvino-int8 needs nncf and openvino: pip install 'imgclf[deploy]'") from None
    model = ov.convert_model(str(fp32_onnx))
    ref_fn = _ov_runner(model)
    held_ref = [(x, decide(ref_fn(x))) for x in held]

    def agreement(compiled, data) -> float:
        out = compiled.output("logits")
        hits = sum(int(_rows_equal(decide(compiled(x)[out]), r).sum()) for x, r in data)
        return hits / max(sum(len(r) for _, r in data), 1)

    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)  # NNCF reports every reverted layer at INFO
    try:
        with keep_altstack():  # NNCF compiles and drops candidate models
            q = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(calib), nncf.Dataset(held_ref), validation_fn=agreement,
                max_drop=max(0.0, min(tolerance, HELD_MAX_DISAGREEMENT)) / 100,
                drop_type=nncf.DropType.ABSOLUTE, preset=nncf.QuantizationPreset.MIXED,
                subset_size=sum(len(x) for x in calib),
            )  # fmt: skip
    finally:
        nncf_log.setLevel(level)
    return _save_openvino(q, out_xml, meta)
