"""ExecuTorch (``.pte``): the serving graph (uint8 pixels in, preprocessing inside) lowered to the XNNPACK delegate
for phones and embedded CPUs, in fp32 or in int8 through the PT2E flow (``XNNPACKQuantizer``: per-channel
symmetric weights, per-tensor activations, calibrated on training images). Verified against PyTorch with
ExecuTorch's own Python runtime (``executorch.runtime``), which also serves as the ``executorch`` /
``executorch-int8`` runtimes of ``imgclf bench``. A ``.pte`` is a flatbuffer: loading one runs no pickle.

Source: ExecuTorch's XNNPACK backend and PT2E quantization guides (docs.pytorch.org/executorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ImgclfError
from ...io import atomic_path
from .graph import example_input, export_failure, export_program, load_written
from .verification import _Job

#: the batch dimension is dynamic up to this (ExecuTorch plans memory for the largest batch); predictors split
#: larger batches into chunks of it
PTE_MAX_BATCH = 32


def _require_executorch() -> None:
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise ImgclfError("the executorch formats need ExecuTorch: pip install 'imgclf[edge]'")


def _export(module: torch.nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """``x`` has ``PTE_MAX_BATCH`` images: ExecuTorch 1.5 sizes the planned memory from the example batch, not from
    the symbolic bound (an example of 2 gave a program refusing batches over 15)."""
    return export_program(module, x, PTE_MAX_BATCH)


def _quantized(job: _Job, calib: list[np.ndarray]) -> torch.nn.Module:
    """The serving graph quantized with the XNNPACK PT2E quantizer, calibrated on ``calib`` inputs."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    x = example_input(job.art, job.pixels, PTE_MAX_BATCH)
    captured = _export(job.serving.eval(), x).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for batch in calib:
            for s in range(0, len(batch), PTE_MAX_BATCH):
                prepared(torch.from_numpy(batch[s : s + PTE_MAX_BATCH]))
    return convert_pt2e(prepared)


def write_pte(job: _Job, calib: list[np.ndarray] | None = None) -> Path:
    """Lower the serving graph (int8 when ``calib`` inputs are given) to XNNPACK and write ``job.path``."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    fmt = "executorch-int8" if calib else "executorch"
    try:
        with torch.no_grad():
            module = _quantized(job, calib) if calib else job.serving.eval()
            ep = _export(module, example_input(job.art, job.pixels, PTE_MAX_BATCH))
            program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    except ImgclfError:
        raise
    except Exception as e:  # noqa: BLE001 - export, quantization and lowering raise many types
        raise ImgclfError(export_failure(job.art.arch, fmt, e)) from None
    with atomic_path(job.path) as tmp:
        tmp.write_bytes(program.buffer)
    return job.path


class PteRunner:
    """A ``.pte`` program's ``forward`` on ExecuTorch's Python runtime: input array -> the graph's outputs as numpy,
    batches larger than ``PTE_MAX_BATCH`` run in chunks."""

    def __init__(self, path: str | Path):
        _require_executorch()
        from executorch.runtime import Runtime

        # a bad file raises the runtime's own error: ``load_predictor`` rebuilds a damaged cache entry on it
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        parts = []
        for s in range(0, len(x), PTE_MAX_BATCH):
            out = self.method.execute([torch.from_numpy(np.ascontiguousarray(x[s : s + PTE_MAX_BATCH]))])
            parts.append([o.numpy() for o in out])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def load_runner(path: Path, fmt: str) -> PteRunner:
    """``PteRunner`` of a file just written; ImgclfError when ExecuTorch cannot load it."""
    return load_written(lambda: PteRunner(path), f"{path}: ExecuTorch cannot load the {fmt} program")


def _executorch(job: _Job, calib: list[np.ndarray] | None = None) -> dict[str, Any]:
    path = write_pte(job, calib)
    runner = load_runner(path, "executorch")
    return {"path": str(path), "verify": job.verify(lambda x: runner(x)[0])}
