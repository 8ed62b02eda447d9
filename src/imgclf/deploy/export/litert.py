"""LiteRT (``.tflite``, formerly TensorFlow Lite): the serving graph (uint8 NHWC pixels in, preprocessing and
calibration inside) converted by litert-torch, for Android and embedded Linux; run and verified here with LiteRT's
own interpreter (``ai_edge_litert``, XNNPACK on CPU; the conversion runs in a child process, see
``write_tflite``), which is also the ``litert`` runtime of ``imgclf bench``. The
model takes one image per call (batch 1, the on-device case): litert-torch 0.10 cannot lower a symbolic batch
(its JAX lowering of the uint8 -> float division fails), so larger batches run image by image. A ``.tflite`` is a
flatbuffer: loading one runs no pickle. The metadata are in ``export.json`` next to it.

Source: litert-torch's README (``litert_torch.convert(module, sample_args).export(path)``) and the LiteRT
Python interpreter API."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ImgclfError
from .graph import example_input, export_failure, load_written
from .verification import _Job


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImgclfError("the litert format needs litert-torch (ai-edge-litert to run it): pip install 'imgclf[edge]'")


def write_tflite(job: _Job) -> Path:
    """Convert the serving graph at batch 1 and write ``job.path``. The conversion runs in a child process
    (``python -m imgclf.deploy.export.litert RUN PIXELS OUT``): litert-torch loads JAX, whose threads make a later
    ``fork`` (DataLoader workers) deadlock-prone, so JAX never enters the calling process."""
    _require("litert_torch")
    if job.pixels != "nhwc":
        raise ImgclfError("--format litert takes NHWC pixels (--pixels nhwc), the layout LiteRT runs natively")
    proc = subprocess.run([sys.executable, "-m", "imgclf.deploy.export.litert", str(job.run_dir), job.pixels,
                           str(job.path)], capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("imgclf: error: ", "ImgclfError"))]
        why = lines[-1].split(": ", 2)[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImgclfError(why[:300])
    return job.path


def _convert(run_dir: str, pixels: str, out: str) -> None:
    """The child process of ``write_tflite``: the run's serving graph (as ``export_run`` builds it) converted by
    litert-torch, written atomically (converted into a temporary file first)."""
    import litert_torch

    from ...artifact import load_artifact
    from ...models.inference import reparameterized
    from .graph import ServingModel

    model, art = load_artifact(run_dir, "cpu")
    serving = ServingModel(reparameterized(model.float(), art.preprocessing.input_size).float(), art, pixels)
    path = Path(out)
    try:
        with torch.no_grad():
            converted = litert_torch.convert(serving.eval(), (example_input(art, pixels, 1),))
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".litert-") as tmp:
            staged = Path(tmp) / path.name  # litert wants a name ending in .tflite
            converted.export(str(staged))
            staged.replace(path)
    except Exception as e:  # noqa: BLE001 - torch.export, the JAX lowering and the converter raise many types
        raise ImgclfError(export_failure(art.arch, "litert", e)) from None


class TfliteRunner:
    """A ``.tflite`` model on LiteRT's interpreter: (N, H, W, C) uint8 -> its outputs as numpy, one image per call."""

    def __init__(self, path: str | Path, threads: int | None = None):
        _require("ai_edge_litert")
        from ai_edge_litert.interpreter import Interpreter

        # a bad file raises the interpreter's own error: ``load_predictor`` rebuilds a damaged cache entry on it
        interp = Interpreter(str(path), num_threads=threads or torch.get_num_threads())
        (name, sig), *_ = interp.get_signature_list().items()
        self.run, self.input, self.outputs = interp.get_signature_runner(name), sig["inputs"][0], sig["outputs"]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        rows = [self.run(**{self.input: np.ascontiguousarray(x[i : i + 1])}) for i in range(len(x))]
        return [np.concatenate([r[o] for r in rows]) for o in self.outputs]


def _litert(job: _Job) -> dict[str, Any]:
    path = write_tflite(job)
    runner = load_written(lambda: TfliteRunner(path), f"{path}: LiteRT cannot load the model just written")
    return {"path": str(path), "batch": 1, "verify": job.verify(lambda x: runner(x)[0])}


if __name__ == "__main__":
    try:
        _convert(*sys.argv[1:4])
    except ImgclfError as e:
        print(f"imgclf: error: {e}", file=sys.stderr)
        sys.exit(2)
