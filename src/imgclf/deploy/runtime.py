"""One ``Predictor`` interface over PyTorch (eager fp32, channels_last, bf16 autocast), ONNX Runtime
(fp32, int8) and OpenVINO (fp32, bf16 where the CPU has it), all fed the same uint8 pixels.

Every predictor takes uint8 NHWC pixels at the model's input size (``to_pixels`` makes them from
PIL images with the artifact's resize and centre crop) and returns ``(logits, probs, features)`` as
float32 numpy arrays, ``probs`` calibrated, ``features`` the pooled embedding. Exported files come
from ``<run>/export`` and are exported (and verified) on first use.

Example:
    >>> p = load_predictor("runs/x", "openvino")          # doctest: +SKIP
    >>> logits, probs, feats = p(to_pixels([img], p.art))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifact import Artifact, load_artifact, read_artifact
from ..errors import ImgclfError
from .export import EXPORT_FILE, FILES, OUTPUTS, export_run, ort_session

RUNTIMES = ("torch", "torch-cl", "torch-bf16", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
            "openvino-int8")  # fmt: skip


def available_runtimes() -> list[str]:
    have = [r for r in RUNTIMES if r.startswith("torch")]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        have += ["onnxruntime", "onnxruntime-int8"]
        if importlib.util.find_spec("openvino"):
            have += ["openvino"] + (["openvino-bf16"] if cpu_has_bf16() else [])
            have += ["openvino-int8"] if importlib.util.find_spec("nncf") else []
    return have


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 Linux (OpenVINO's bf16 path is only fast there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_runtime(run_dir: str | Path | None = None) -> str:
    """The fastest runtime installed (measured by ``imgclf bench``): OpenVINO int8 when the run already has an
    accepted int8 export (it needs calibration data and an accuracy check, so it is never made implicitly),
    then OpenVINO bf16 / fp32, ONNX Runtime, torch."""
    have = available_runtimes()
    if run_dir is not None and "openvino-int8" in have and _current(Path(run_dir), "openvino-int8", accepted=True):
        return "openvino-int8"
    for r in ("openvino-bf16", "openvino", "onnxruntime", "torch-cl"):
        if r in have:
            return r
    return "torch"


def to_pixels(images: list, art: Artifact) -> np.ndarray:
    """PIL images -> (N, H, W, 3) uint8 at the input size (the artifact's resize + centre crop)."""
    t = pixel_fn(art)
    return np.stack([t(im) for im in images])


def pixel_fn(art: Artifact):
    """PIL image -> (H, W, 3) uint8 at the input size; built once per preprocessing."""
    return _pixel_fn(json.dumps(art.preprocessing, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _pixel_fn(preprocessing: str):
    from ..data.transforms import pixel_array_transform

    return pixel_array_transform(json.loads(preprocessing))


class Predictor:
    """Callable: uint8 NHWC pixels (N, H, W, 3) -> (logits (N, K), calibrated probs (N, K), features (N, D))."""

    name: str
    art: Artifact
    path: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.model(x)
        return tuple(t.float().cpu().numpy() for t in out)  # type: ignore[return-value]


class OnnxPredictor(Predictor):
    def __init__(self, run_dir: Path, int8: bool = False, threads: int | None = None):
        self.art, self.name = read_artifact(run_dir), "onnxruntime-int8" if int8 else "onnxruntime"
        path = _exported(run_dir, "onnx-int8" if int8 else "onnx")
        self.sess, self.path = ort_session(path, threads or torch.get_num_threads()), str(path)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.sess.run(list(OUTPUTS), {"input": np.ascontiguousarray(pixels)}))  # type: ignore[return-value]


class OpenVinoPredictor(Predictor):
    def __init__(self, run_dir: Path, precision: str = "f32", threads: int | None = None):
        import openvino as ov

        self.art, self.name = (
            read_artifact(run_dir),
            {"bf16": "openvino-bf16", "int8": "openvino-int8"}.get(precision, "openvino"),
        )
        path = _exported(run_dir, "openvino-int8" if precision == "int8" else "openvino")
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision != "int8":  # int8: the layers kept in floating point run at the CPU's best precision
            cfg["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        self.compiled, self.path = ov.Core().compile_model(str(path), "CPU", cfg), str(path)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(n) for n in OUTPUTS]

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        res = self.request.infer({0: np.ascontiguousarray(pixels)})
        return tuple(np.asarray(res[o]) for o in self.outputs)  # type: ignore[return-value]


def _exported(run_dir: Path, fmt: str) -> Path:
    """``<run>/export/<file>`` for ``fmt`` with uint8 NHWC input, exported and verified on first use."""

    path = run_dir / "export" / FILES[fmt]
    if _current(run_dir, fmt):
        return path
    export_run(run_dir, fmt, pixels="nhwc", verify_n=200)
    return path


def _current(run_dir: Path, fmt: str, accepted: bool = False) -> bool:
    """``<run>/export`` holds an up-to-date export of ``fmt`` with uint8 NHWC input and every output."""

    path = run_dir / "export" / FILES[fmt]
    rec_path = run_dir / "export" / EXPORT_FILE
    try:
        rec = json.loads(rec_path.read_text()).get(fmt, {}) if rec_path.is_file() else {}
    except (OSError, ValueError):
        return False
    ok = rec.get("pixels") == "nhwc" and rec.get("outputs") == list(OUTPUTS)  # older exports lack features
    ok = ok and (not accepted or rec.get("accepted", False))  # an int8 model kept by --force is not picked
    return ok and path.is_file() and _newer(path, run_dir)


def _newer(path: Path, run_dir: Path) -> bool:
    """An export older than the run's weights is stale (the run was retrained or recalibrated)."""
    src = [run_dir / "model.safetensors", run_dir / "imgclf.json"]
    return all(os.path.getmtime(path) >= os.path.getmtime(p) for p in src if p.exists())


def load_predictor(run_dir: str | Path, runtime: str = "auto", device: str = "cpu") -> Predictor:
    run_dir = Path(run_dir)
    runtime = default_runtime(run_dir) if runtime == "auto" else runtime
    if runtime not in RUNTIMES:
        raise ImgclfError(f"--runtime must be auto or one of {', '.join(RUNTIMES)} (got {runtime!r})")
    if runtime not in available_runtimes():
        why = "a CPU with AVX512-BF16/AMX" if runtime.endswith("bf16") else "pip install 'imgclf[deploy]'"
        raise ImgclfError(f"runtime {runtime} is not available here ({why})")
    if runtime.startswith("torch"):
        return TorchPredictor(run_dir, runtime, device)
    if runtime.startswith("onnxruntime"):
        return OnnxPredictor(run_dir, int8=runtime.endswith("int8"))
    return OpenVinoPredictor(run_dir, runtime.removeprefix("openvino").removeprefix("-") or "f32")


def resolve_runtime(runtime: str, run_dir: str | Path, *, tta: str | None = None, device: str = "auto") -> str:
    """``auto`` -> the fastest installed runtime, or ``torch`` where only PyTorch can run the job
    (test-time augmentation, a k-NN index, a GPU)."""
    if runtime != "auto":
        return runtime
    from ..dist import resolve_device

    if tta or read_artifact(run_dir).extra.get("kind") == "knn" or resolve_device(device).type != "cpu":
        return "torch"
    return default_runtime(run_dir)


def runtime_outputs(
    run_dir: str | Path,
    samples,
    runtime: str,
    *,
    batch_size: int = 64,
    num_workers: int = -1,
    strict_images: bool = False,
    progress: bool = True,
    desc: str = "infer",
):
    """``eval.inference.Outputs`` (logits, labels, indices, features) of ``samples`` through a runtime,
    decoding with the same loader (and skip log) as the PyTorch path. Returns (outputs, artifact, skips)."""
    from tqdm.auto import tqdm

    from ..data.loader import ImageDataset, SkipLog, make_loader
    from ..data.transforms import pixel_transform
    from ..eval.inference import Outputs

    pred = load_predictor(run_dir, runtime)
    loader = make_loader(ImageDataset(samples, pixel_transform(pred.art.preprocessing)), batch_size, train=False,
                         num_workers=num_workers)  # fmt: skip
    skips = SkipLog(strict=strict_images)
    logits, feats, labels, indices = [], [], [], []
    for batch in tqdm(loader, desc=f"{desc} ({pred.name})", disable=not progress, leave=False, unit="batch"):
        skips.add(batch.skipped)
        if batch.images is None:
            continue
        lg, _, ft = pred(batch.images.permute(0, 2, 3, 1).numpy())  # uint8 (B, C, H, W) -> (B, H, W, C)
        logits.append(torch.from_numpy(lg))
        feats.append(torch.from_numpy(ft))
        labels.append(batch.labels)
        indices.append(batch.indices)
    k = pred.art.num_classes
    cat = lambda xs, empty: torch.cat(xs) if xs else empty  # noqa: E731
    out = Outputs(cat(logits, torch.empty(0, k)), cat(labels, torch.empty(0, dtype=torch.long)),
                  cat(indices, torch.empty(0, dtype=torch.long)), cat(feats, torch.empty(0, 0)))  # fmt: skip
    return out, pred.art, skips
