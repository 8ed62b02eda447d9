"""One ``Predictor`` interface over PyTorch (eager fp32, channels_last, bf16 autocast), ONNX Runtime
(fp32, int8) and OpenVINO (fp32, bf16 where the CPU has it), all fed the same uint8 pixels.

Every predictor takes uint8 NHWC pixels at the model's input size (``to_pixels`` makes them from
PIL images with the artifact's resize and centre crop) and returns ``(logits, probs, features)`` as
float32 numpy arrays, ``probs`` calibrated, ``features`` the pooled embedding. Exported files come
from ``<run>/export`` when it holds a current export (``imgclf export``); otherwise the fast formats are
compiled on first use into a user cache keyed by the run's content (``~/.cache/imgclf/exports``,
``$IMGCLF_CACHE``) and verified against PyTorch on generated images. Nothing here reads the run's
training data or writes into the run directory, so a run copied alone to another machine predicts and
serves at full speed.

Example:
    >>> p = load_predictor("runs/x", "openvino")          # doctest: +SKIP
    >>> logits, probs, feats = p(to_pixels([img], p.art))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifact import Artifact, as_artifact, content_key, kind_of, load_artifact, require, run_path
from ..errors import ImgclfError
from ..models.inference import reparameterized
from ..rundir import EXPORT_FILE, RunDir
from .export import FILES, OUTPUTS, export_run, ort_session

log = logging.getLogger("imgclf")

RUNTIMES = ("torch", "torch-cl", "torch-bf16", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
            "openvino-int8", "executorch", "executorch-int8", "litert")  # fmt: skip


def available_runtimes() -> list[str]:
    have = [r for r in RUNTIMES if r.startswith("torch")]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        have += ["onnxruntime", "onnxruntime-int8"]
        if importlib.util.find_spec("openvino"):
            have += ["openvino"] + (["openvino-bf16"] if cpu_has_bf16() else [])
            have += ["openvino-int8"] if importlib.util.find_spec("nncf") else []
    if importlib.util.find_spec("executorch"):
        have += ["executorch", "executorch-int8"]
    if importlib.util.find_spec("litert_torch") and importlib.util.find_spec("ai_edge_litert"):
        have += ["litert"]
    return have


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 Linux (OpenVINO's bf16 path is only fast there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_runtime(run: str | Path | Artifact | None = None) -> str:
    """The fastest runtime installed (measured by ``imgclf bench``): OpenVINO int8 when the run already has an
    accepted int8 export (it needs calibration data and an accuracy check, so it is never made implicitly),
    then OpenVINO bf16 / fp32, ONNX Runtime, torch. Multi-label runs skip bf16: their per-class thresholds were
    tuned on fp32 probabilities, and bf16's ~5e-3 differences flip labels that sit near a threshold."""
    have = available_runtimes()
    if run is not None and "openvino-int8" in have and _current(run_path(run), "openvino-int8", accepted=True):
        return "openvino-int8"
    multi = run is not None and as_artifact(run).multi_label
    for r in ("openvino-bf16", "openvino", "onnxruntime", "torch-cl")[int(multi) :]:
        if r in have:
            return r
    return "torch"


def to_pixels(images: list, art: Artifact) -> np.ndarray:
    """PIL images -> (N, H, W, 3) uint8 at the input size (the artifact's resize + centre crop)."""
    t = pixel_fn(art)
    return np.stack([t(im) for im in images])


def pixel_fn(art: Artifact):
    """PIL image -> (H, W, 3) uint8 at the input size; built once per preprocessing."""
    return art.preprocessing.pixels()


class Predictor:
    """Callable: uint8 NHWC pixels (N, H, W, 3) -> (logits (N, K), calibrated probs (N, K), features (N, D))."""

    name: str
    art: Artifact
    path: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class TorchPredictor(Predictor):
    def __init__(self, run: str | Path | Artifact, mode: str = "torch", device: str = "cpu"):
        from .export import ServingModel

        model, self.art = load_artifact(run, device)
        model = reparameterized(model.float(), self.art.preprocessing.input_size)
        self.name, self.path, self.device = mode, str(run_path(run)), torch.device(device)
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
    def __init__(self, art: Artifact, int8: bool = False, threads: int | None = None):
        self.art, self.name = art, "onnxruntime-int8" if int8 else "onnxruntime"
        path = exported(art, "onnx-int8" if int8 else "onnx")
        self.sess, self.path = ort_session(path, threads or torch.get_num_threads()), str(path)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.sess.run(list(OUTPUTS), {"input": np.ascontiguousarray(pixels)}))  # type: ignore[return-value]


class OpenVinoPredictor(Predictor):
    def __init__(self, art: Artifact, precision: str = "f32", threads: int | None = None):
        import openvino as ov

        from .export.openvino import keep_altstack

        self.art = art
        self.name = {"bf16": "openvino-bf16", "int8": "openvino-int8"}.get(precision, "openvino")
        path = exported(art, "openvino-int8" if precision == "int8" else "openvino")
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision != "int8":  # int8: the layers kept in floating point run at the CPU's best precision
            cfg["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        with keep_altstack():  # (see there: a swapped-out model must not leave a dangling signal stack)
            self.compiled, self.path = ov.Core().compile_model(str(path), "CPU", cfg), str(path)
            self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(n) for n in OUTPUTS]

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        res = self.request.infer({0: np.ascontiguousarray(pixels)})
        return tuple(np.asarray(res[o]) for o in self.outputs)  # type: ignore[return-value]


class EdgePredictor(Predictor):
    """An on-device format on its own Python runtime, timed here: ``executorch`` / ``executorch-int8`` (a ``.pte``
    on ExecuTorch, XNNPACK) or ``litert`` (a ``.tflite`` on LiteRT's interpreter, one image per call)."""

    def __init__(self, art: Artifact, runtime: str):
        from .export.executorch import PteRunner
        from .export.litert import TfliteRunner

        self.art, self.name = art, runtime
        path = exported(art, runtime)  # the runtime and its export format share the name
        self.runner, self.path = (TfliteRunner if runtime == "litert" else PteRunner)(path), str(path)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.runner(pixels))  # type: ignore[return-value]


def exported(art: Artifact, fmt: str) -> Path:
    """An up-to-date export of ``fmt`` with uint8 NHWC input and every output, never written into the run:
    ``<run>/export`` when ``imgclf export`` left one there for the run's current content, else the user
    cache (compiled and verified against PyTorch on generated images on first use). int8 needs calibration
    images and an accuracy check, so it is only ever taken from ``<run>/export``."""
    require(art, "export")
    run_dir = run_path(art)
    key = content_key(run_dir)
    if _current(run_dir, fmt, key=key):
        return RunDir(run_dir).export / FILES[fmt]
    if fmt.endswith("int8"):
        raise ImgclfError(f"{run_dir}: no accepted {fmt} export; make one with `imgclf export {run_dir} --format "
                          f"{fmt}` (it calibrates on training images, or --calib-data)")  # fmt: skip
    cache = export_cache_dir(key, fmt)
    if not _recorded(cache, fmt):
        _compile_into_cache(art, fmt, cache)
    return cache / FILES[fmt]


def _compile_into_cache(art: Artifact, fmt: str, cache: Path) -> None:
    """Export into a private folder, then rename it into place: processes compiling the same entry at once
    never see each other's half-written files (the first rename wins; the others discard theirs)."""
    import tempfile

    log.info("compiling %s for %s into %s (once per run content)", fmt, run_path(art), cache)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    except OSError as e:
        raise ImgclfError(f"cannot write the export cache {cache.parent} ({e.strerror or e}); set $IMGCLF_CACHE "
                          "to a writable folder or use --runtime torch") from None  # fmt: skip
    try:
        export_run(art, fmt, output=tmp, pixels="nhwc", verify_n=64, generated_ok=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process put the same entry in place first
            pass
    except OSError as e:
        raise ImgclfError(f"cannot write the export cache {cache.parent} ({e.strerror or e}); set $IMGCLF_CACHE "
                          "to a writable folder or use --runtime torch") from None  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """``$IMGCLF_CACHE`` or ``~/.cache/imgclf``: compiled exports and cached features live here."""
    return Path(os.environ.get("IMGCLF_CACHE") or Path.home() / ".cache" / "imgclf")


def export_cache_dir(key: str, fmt: str) -> Path:
    """``<cache>/exports/<hash>``: of the run's content key (``artifact.content_key``), the format and the
    imgclf, torch, onnx, openvino, executorch and litert-torch versions that export it."""
    from importlib import metadata

    from ..artifact import package_versions

    v = package_versions()
    for pkg in ("onnx", "openvino", "executorch", "litert-torch"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    h = hashlib.sha256(json.dumps([key, fmt, v.get("imgclf"), v.get("torch"), v.get("onnx"), v.get("openvino"),
                                   v.get("executorch"), v.get("litert-torch")]).encode())  # fmt: skip
    return cache_root() / "exports" / h.hexdigest()[:24]


def _recorded(out_dir: Path, fmt: str, accepted: bool = False, rec: dict | None = None) -> bool:
    """``out_dir`` holds an export of ``fmt`` with uint8 NHWC input and every output (per its export.json)."""
    rec = _record(out_dir, fmt) if rec is None else rec
    ok = rec.get("pixels") == "nhwc" and rec.get("outputs") == list(OUTPUTS)  # older exports lack features
    ok = ok and (not accepted or rec.get("accepted", False))  # an int8 model kept by --force is not picked
    return ok and (out_dir / FILES[fmt]).is_file()


def _current(run_dir: Path, fmt: str, accepted: bool = False, key: str | None = None) -> bool:
    """``<run>/export`` holds an export of ``fmt`` made from the run's current weights and metadata (its
    recorded ``run_key`` equals the run's ``content_key``: retraining or recalibrating makes it stale)."""
    rec = _record(RunDir(run_dir).export, fmt)
    return _recorded(RunDir(run_dir).export, fmt, accepted, rec) and rec.get("run_key") == (key or content_key(run_dir))


def _record(out_dir: Path, fmt: str) -> dict:
    try:
        return json.loads((out_dir / EXPORT_FILE).read_text()).get(fmt, {})
    except (OSError, ValueError, AttributeError):
        return {}


def load_predictor(run: str | Path | Artifact, runtime: str = "auto", device: str = "cpu") -> Predictor:
    """A ``Predictor`` of ``run`` (a run directory or an ``Artifact`` read from one) on ``runtime``."""
    art = as_artifact(run)
    runtime = default_runtime(art) if runtime == "auto" else runtime
    if runtime not in RUNTIMES:
        raise ImgclfError(f"--runtime must be auto or one of {', '.join(RUNTIMES)} (got {runtime!r})")
    if runtime not in available_runtimes():
        extra = "edge" if runtime.startswith(("executorch", "litert")) else "deploy"
        why = "a CPU with AVX512-BF16/AMX" if runtime.endswith("bf16") else f"pip install 'imgclf[{extra}]'"
        raise ImgclfError(f"runtime {runtime} is not available here ({why})")
    if runtime.startswith("torch"):
        return TorchPredictor(art, runtime, device)
    for attempt in (1, 2):  # a damaged cache entry (a killed write, a full disk) is removed and made again
        try:
            if runtime.startswith("onnxruntime"):
                return OnnxPredictor(art, int8=runtime.endswith("int8"))
            if runtime.startswith(("executorch", "litert")):
                return EdgePredictor(art, runtime)
            return OpenVinoPredictor(art, runtime.removeprefix("openvino").removeprefix("-") or "f32")
        except ImgclfError:
            raise
        except Exception as e:  # noqa: BLE001 - ONNX Runtime / OpenVINO raise their own types for bad files
            bad = _cached_entry(art, runtime)
            why = " ".join(str(e).split())[-200:] or type(e).__name__
            if bad is None or attempt == 2:
                raise ImgclfError(f"{run_path(art)}: the {runtime} model cannot be loaded ({why})") from None
            log.warning("%s: damaged cached export (%s); compiling it again", bad, why)
            shutil.rmtree(bad, ignore_errors=True)
    raise AssertionError("unreachable")


def _cached_entry(art: Artifact, runtime: str) -> Path | None:
    """The user-cache folder ``runtime`` loads from for ``art`` (None when it loads from ``<run>/export``)."""
    fmt = "onnx" if runtime.startswith("onnxruntime") else runtime.split("-")[0]
    if runtime.endswith("int8") or _current(run_path(art), fmt):
        return None
    entry = export_cache_dir(content_key(run_path(art)), fmt)
    return entry if entry.exists() else None


def resolve_runtime(runtime: str, run: str | Path | Artifact, *, tta: str | None = None, device: str = "auto") -> str:
    """``auto`` -> the fastest installed runtime, or ``torch`` where only PyTorch can run the job
    (test-time augmentation, a k-NN index, a GPU)."""
    if runtime != "auto":
        return runtime
    from ..dist import resolve_device

    if tta or kind_of(as_artifact(run)).torch_only or resolve_device(device).type != "cpu":
        return "torch"
    return default_runtime(run)


def auto_predictor(run: str | Path | Artifact, runtime: str = "auto", device: str = "cpu") -> Predictor:
    """``load_predictor``, except that ``auto`` falls back to PyTorch (with a warning naming the cause) when the
    fast runtime cannot be made for this model, instead of failing."""
    art = as_artifact(run)
    if runtime != "auto":
        return load_predictor(art, runtime, device)
    rt = resolve_runtime(runtime, art, device=device)
    try:
        return load_predictor(art, rt, device)
    except Exception as e:  # noqa: BLE001 - an exporter's failure on an unusual model must not stop predict/serve
        if rt.startswith("torch"):
            raise
        why = " ".join(str(e).split())[-200:] or type(e).__name__  # the end of the message names the cause
        log.warning("%s: %s is not available for %s (%s); using PyTorch", run_path(art), rt, art.arch, why)
        return load_predictor(art, "torch-cl" if device == "cpu" else "torch", device)


def runtime_outputs(
    run: str | Path | Artifact,
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

    from ..data.loader import ImageDataset, ShardSampler, SkipLog, make_loader
    from ..models.inference import Outputs, gather_shards

    pred = auto_predictor(run, runtime)
    loader = make_loader(ImageDataset(samples, pred.art.preprocessing.chw_pixels()), batch_size, train=False,
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
    parts = {
        "logits": cat(logits, torch.empty(0, k)),
        "labels": cat(labels, torch.empty(0, dtype=torch.long)),
        "indices": cat(indices, torch.empty(0, dtype=torch.long)),
        "features": cat(feats, torch.empty(0, 0)),
    }
    if isinstance(loader.sampler, ShardSampler):  # torchrun: every rank's share, in input order
        parts = gather_shards(parts, skips)
    out = Outputs(parts["logits"], parts["labels"], parts["indices"], parts["features"])
    return out, pred.art, skips
