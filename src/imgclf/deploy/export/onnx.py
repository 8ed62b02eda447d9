"""ONNX: the fp32 graph every format but TorchScript starts from, ONNX Runtime sessions, and static int8
quantization (QDQ) with onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...artifact import Artifact
from ...errors import ImgclfError
from ...io import atomic_path
from .graph import OUTPUTS, ServingModel, example_input, export_failure, unfused_attention
from .verification import _Job

log = logging.getLogger("imgclf")


def _export_program(serving: ServingModel, x: torch.Tensor, opset: int | None):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.onnx.export(serving, (x,), None, dynamo=True, input_names=["input"], output_names=list(OUTPUTS),
                             dynamic_shapes={"x": {0: batch}}, opset_version=opset, optimize=True,
                             verbose=False)  # fmt: skip


def _export_onnx(serving: ServingModel, art: Artifact, pixels: str, out: Path, meta: dict[str, str], opset: int | None):
    """The fp32 ONNX graph of ``serving`` (dynamo exporter, dynamic batch). Attention that the exporter cannot
    translate (timm's fused ``scaled_dot_product_attention`` on 5-D tensors, views it cannot decompose: Hiera,
    MaxViT, NesT, Twins) is exported again with timm's explicit attention, which computes the same; a model
    that still fails is one ``ImgclfError`` naming the architecture and the operation."""
    import onnx

    x = example_input(art, pixels)
    with atomic_path(out) as tmp:
        try:
            prog = _export_program(serving, x, opset)
        except Exception as first:  # noqa: BLE001 - the exporter raises many types; the retry decides
            with unfused_attention(serving) as n:
                if not n:
                    raise ImgclfError(export_failure(art.arch, "onnx", first)) from None
                log.info("%s: ONNX export with fused attention failed; exporting with explicit attention (%d "
                         "modules)", art.arch, n)  # fmt: skip
                try:
                    prog = _export_program(serving, x, opset)
                except Exception as e:  # noqa: BLE001
                    raise ImgclfError(export_failure(art.arch, "onnx", e)) from None
        model = prog.model_proto
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model.doc_string = f"imgclf export of {meta['imgclf.run']} ({art.arch})"
        onnx.checker.check_model(model)
        onnx.save_model(model, str(tmp))
    return out


def ort_session(path: Path, threads: int | None = None):
    """A quiet CPU ONNX Runtime session (``threads``: intra-op threads, default the library's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_logits(path: Path):
    sess = ort_session(path)
    return lambda x: sess.run(["logits"], {"input": x})[0]


def _onnx(job: _Job) -> dict[str, Any]:
    return {"path": str(job.onnx_path), "verify": job.verify(_ort_logits(job.onnx_path))}


# ---------------------------------------------------------------- int8 (QDQ)


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over training images."""

    def __init__(self, batches):
        self.batches, self.it = list(batches), None

    def get_next(self):
        if self.it is None:
            self.it = iter(self.batches)
        return next(self.it, None)

    def rewind(self):
        self.it = None


def _quantize_onnx(fp32: Path, out: Path, calib: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(calib)
    with atomic_path(out) as tmp:
        pre = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=_fp32_nodes(pre),
                            extra_options={"ActivationSymmetric": False})  # fmt: skip
        finally:
            pre.unlink(missing_ok=True)
    return out


def _fp32_nodes(path: Path) -> list[str]:
    """Layers static int8 hurts most, kept in fp32: the classifier, the stem convolution and depthwise
    convolutions (one filter per channel: per-channel weights cannot absorb their activation ranges).
    On the embedded Lite0 this takes top-1 agreement with fp32 from 92.0 % to 98.3 % (ORT QDQ, MinMax)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return _head_nodes(path) + [c.name for c in convs[:1]] + depthwise


def _head_nodes(path: Path) -> list[str]:
    """The classifier layer (the Gemm/MatMul feeding the ``logits`` output), kept in fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    by_output = {o: n for n in graph.node for o in n.output}
    node, out = by_output.get("logits"), []
    for _ in range(4):  # logits <- [Add <-] MatMul/Gemm, possibly behind a Reshape/Identity
        if node is None:
            break
        out.append(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            return out
        node = by_output.get(node.input[0])
    return out
