"""One ``Predictor`` interface over PyTorch (eager fp32, channels_last, bf16 autocast), ONNX Runtime
(fp32, int8) and OpenVINO (fp32, bf16 where the CPU has it), all fed the same uint8 pixels.

Every predictor takes uint8 NHWC pixels at the model's input size (``to_pixels`` makes them from
PIL images with the artifact's resize and centre crop) and returns ``(logits, probs)`` as float32
numpy arrays, ``probs`` calibrated. Exported files come from ``<run>/export`` and are exported (and
verified) on first use.

Example:
    >>> p = load_predictor("runs/x", "openvino")          # doctest: +SKIP
    >>> logits, probs = p(to_pixels([img], p.art))        # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifact import Artifact, load_artifact, read_artifact
from ..errors import ImgclfError

RUNTIMES = ("torch", "torch-cl", "torch-bf16", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16")


def available_runtimes() -> list[str]:
    have = [r for r in RUNTIMES if r.startswith("torch")]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        have += ["onnxruntime", "onnxruntime-int8"]
        if importlib.util.find_spec("openvino"):
            have += ["openvino"] + (["openvino-bf16"] if cpu_has_bf16() else [])
    return have


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 Linux (OpenVINO's bf16 path is only fast there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_runtime() -> str:
    """The fastest runtime installed (measured by ``imgclf bench``): OpenVINO, then ONNX Runtime, then torch."""
    have = available_runtimes()
    for r in ("openvino-bf16", "openvino", "onnxruntime", "torch-cl"):
        if r in have:
            return r
    return "torch"


def to_pixels(images: list, art: Artifact) -> np.ndarray:
    """PIL images -> (N, H, W, 3) uint8 at the input size (the artifact's resize + centre crop)."""
    from ..data.transforms import pixel_transform

    t = pixel_transform(art.preprocessing)
    return np.stack([t(im).permute(1, 2, 0).numpy() for im in images])


class Predictor:
    """Callable: uint8 NHWC pixels -> (logits, calibrated probs)."""

    name: str
    art: Artifact
    path: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class TorchPredictor(Predictor):
    def __init__(self, run_dir: Path, mode: str = "torch", device: str = "cpu"):
        from .export import ServingModel

        model, self.art = load_artifact(run_dir, device)
        self.name, self.path, self.device = mode, str(run_dir), torch.device(device)
        self.model = ServingModel(model.float(), self.art, "nhwc").to(self.device)
        self.channels_last = mode in ("torch-cl", "torch-bf16")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = torch.bfloat16 if mode == "torch-bf16" else None

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits, probs = self.model(x)
        return logits.float().cpu().numpy(), probs.float().cpu().numpy()


class OnnxPredictor(Predictor):
    def __init__(self, run_dir: Path, int8: bool = False, threads: int | None = None):
        import onnxruntime as ort

        self.art, self.name = read_artifact(run_dir), "onnxruntime-int8" if int8 else "onnxruntime"
        path = _exported(run_dir, "onnx-int8" if int8 else "onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.sess, self.path = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), str(path)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.sess.run(["logits", "probs"], {"input": np.ascontiguousarray(pixels)})
        return logits, probs


class OpenVinoPredictor(Predictor):
    def __init__(self, run_dir: Path, precision: str = "f32", threads: int | None = None):
        import openvino as ov

        self.art, self.name = read_artifact(run_dir), "openvino-bf16" if precision == "bf16" else "openvino"
        path = _exported(run_dir, "openvino")
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        self.compiled, self.path = ov.Core().compile_model(str(path), "CPU", cfg), str(path)
        self.request = self.compiled.create_infer_request()
        self.out_logits, self.out_probs = self.compiled.output("logits"), self.compiled.output("probs")

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.request.infer({0: np.ascontiguousarray(pixels)})
        return np.asarray(res[self.out_logits]), np.asarray(res[self.out_probs])


def _exported(run_dir: Path, fmt: str) -> Path:
    """``<run>/export/<file>`` for ``fmt`` with uint8 NHWC input, exported and verified on first use."""
    from .export import EXPORT_FILE, FILES, export_run

    path = run_dir / "export" / FILES[fmt]
    rec_path = run_dir / "export" / EXPORT_FILE
    rec = json.loads(rec_path.read_text()).get(fmt, {}) if rec_path.is_file() else {}
    if rec.get("pixels") == "nhwc" and path.is_file() and _newer(path, run_dir):
        return path
    export_run(run_dir, fmt, pixels="nhwc", verify_n=200)
    return path


def _newer(path: Path, run_dir: Path) -> bool:
    """An export older than the run's weights is stale (the run was retrained or recalibrated)."""
    src = [run_dir / "model.safetensors", run_dir / "imgclf.json"]
    return all(os.path.getmtime(path) >= os.path.getmtime(p) for p in src if p.exists())


def load_predictor(run_dir: str | Path, runtime: str = "auto", device: str = "cpu") -> Predictor:
    run_dir = Path(run_dir)
    runtime = default_runtime() if runtime == "auto" else runtime
    if runtime not in RUNTIMES:
        raise ImgclfError(f"--runtime must be auto or one of {', '.join(RUNTIMES)} (got {runtime!r})")
    if runtime not in available_runtimes():
        why = "a CPU with AVX512-BF16/AMX" if runtime.endswith("bf16") else "pip install 'imgclf[deploy]'"
        raise ImgclfError(f"runtime {runtime} is not available here ({why})")
    if runtime.startswith("torch"):
        return TorchPredictor(run_dir, runtime, device)
    if runtime.startswith("onnxruntime"):
        return OnnxPredictor(run_dir, int8=runtime.endswith("int8"))
    return OpenVinoPredictor(run_dir, "bf16" if runtime.endswith("bf16") else "f32")
