"""The exported graph: ``ServingModel`` (preprocessing and calibration in the graph), its example input, its
input layouts and outputs, and the metadata every format carries."""

from __future__ import annotations

import contextlib
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...artifact import Artifact, package_versions
from ...config import ExportConfig
from ...errors import ImgclfError
from ...models.inference import forward_both
from ...train.tasks import task_from_json

PIXELS = typing.get_args(typing.get_type_hints(ExportConfig)["pixels"])  # ("nhwc", "nchw", "none")
#: every exported graph's outputs, in order
OUTPUTS = ("logits", "probs", "features")


class ServingModel(nn.Module):
    """The run's model with preprocessing (optional) and calibration in the graph.

    ``pixels``: ``"nhwc"`` / ``"nchw"`` take uint8 pixels (0-255) at the model's input size; ``"none"``
    takes float NCHW already normalised (the artifact's mean/std). Returns ``(logits, probs, features)``:
    the calibrated probabilities and the pooled embedding the classifier sees (timm's
    ``forward_head(pre_logits=True)``), which feature-based OOD scores and drift monitoring use.
    """

    def __init__(self, model: nn.Module, art: Artifact, pixels: str = "nhwc", temperature: float | None = None):
        super().__init__()
        if pixels not in PIXELS:
            raise ImgclfError(f"--pixels must be one of {', '.join(PIXELS)} (got {pixels!r})")
        self.model, self.pixels = model.eval(), pixels
        if temperature is None:
            temperature = art.temperature  # one value, or one per class (multi-label)
        self.normalize = art.preprocessing.normalize()  # the eval transform's own arithmetic
        self.register_buffer("inv_t", 1.0 / torch.tensor(temperature, dtype=torch.float32))
        self.task = task_from_json(art.task)
        bias = art.calibration.get("bias")  # per-class Platt offsets (multi-label) or prior shift (single-label)
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32) if bias is not None else None)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.pixels != "none":
            if self.pixels == "nhwc":
                x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
            x = self.normalize(x)
        logits, feats = forward_both(self.model, x, logits=True, features=True)  # (N, K), (N, D)
        z = logits * self.inv_t
        if self.bias is not None:
            z = z + self.bias
        return logits, self.task.probs(z), feats  # the task's activation (softmax / sigmoid), calibrated


def example_input(art: Artifact, pixels: str, batch: int = 2) -> torch.Tensor:
    c, h, w = art.preprocessing.input_size
    if pixels == "none":
        return torch.randn(batch, c, h, w)
    shape = (batch, h, w, c) if pixels == "nhwc" else (batch, c, h, w)
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def to_input(pixels_nchw: torch.Tensor, pixels: str, art: Artifact) -> np.ndarray:
    """The exported graph's input for uint8 NCHW pixels."""
    if pixels == "nhwc":
        return pixels_nchw.permute(0, 2, 3, 1).contiguous().numpy()
    if pixels == "nchw":
        return pixels_nchw.numpy()
    return art.preprocessing.normalize()(pixels_nchw).numpy()


def metadata(art: Artifact, pixels: str, run_dir: Path) -> dict[str, str]:
    """String metadata every format carries (ONNX metadata_props, OpenVINO rt_info, Triton config)."""
    ood = art.ood or {}
    return {
        "imgclf.arch": art.arch,
        "imgclf.labels": json.dumps(art.class_names),
        "imgclf.preprocessing": json.dumps(art.preprocessing.to_json()),
        "imgclf.pixels": pixels,
        "imgclf.temperature": json.dumps(art.temperature),
        "imgclf.task": json.dumps(art.task or {"kind": "single_label"}),
        "imgclf.ood": json.dumps(
            {"ood_score": ood.get("ood_score"), "tpr": ood.get("tpr"), "thresholds": ood.get("thresholds", {})}
        ),  # fmt: skip
        "imgclf.calibration_bias": json.dumps(art.calibration.get("bias")),
        "imgclf.priors": json.dumps(art.calibration.get("priors")),
        **({"imgclf.decision": json.dumps(art.decision)} if art.multi_label else {}),
        "imgclf.run": run_dir.name,
        "imgclf.version": package_versions().get("imgclf", ""),
    }


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[int]:
    """Inside: every timm module with fused attention (``fused_attn``: ``F.scaled_dot_product_attention``) uses
    its explicit ``softmax(q k^T * scale) v`` path instead (timm's ``set_fused_attn(False)`` only reaches models
    built after it). Yields how many modules were switched; restores them on exit."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.fused_attn = True


def export_program(module: nn.Module, x: torch.Tensor, max_batch: int) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` on the example ``x`` with the batch dimension dynamic (1 .. ``max_batch``):
    the graph pt2, ExecuTorch and Core ML start from. ``module`` as it is (callers pass it in eval mode: a PT2E
    quantized graph refuses ``.eval()``)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)


def load_written(load, what: str):
    """``load()`` of a file an export has just written; any failure becomes one ImgclfError line naming ``what``
    (the runtimes' loaders raise their own error types for bad files)."""
    try:
        return load()
    except ImgclfError:
        raise
    except Exception as e:  # noqa: BLE001 - RuntimeError / ValueError from the runtimes
        raise ImgclfError(f"{what} ({' '.join(str(e).split())[:200]})") from None


def export_failure(arch: str, fmt: str, e: BaseException) -> str:
    """One line for an exporter's failure: the architecture, the format and the operation it could not
    translate (an ``aten`` op when the message names one, else the message's last meaningful line)."""
    text = str(e)
    ops = re.findall(r"(?:torch\.ops\.)?aten[.:]{1,2}[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?", text)
    if ops:
        what = f"unsupported operation {ops[0]}"
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "http" not in ln and "tlparse" not in ln]
        what = (lines[-1] if lines else type(e).__name__)[:160]
    return f"{arch} cannot be exported to {fmt}: {what}"
