"""A Triton Inference Server model repository: the fp32 ONNX graph, ``config.pbtxt`` and ``labels.txt``."""

from __future__ import annotations

import json
from typing import Any

import torch

from ...artifact import Artifact
from ...io import write_text
from .graph import example_input
from .onnx import _ort_logits
from .verification import _Job


def _triton_config(name: str, art: Artifact, pixels: str, max_batch: int, delay_us: int, feat_dim: int) -> str:
    c, h, w = art.preprocessing.input_size
    dims = {"nhwc": [h, w, c], "nchw": [c, h, w], "none": [c, h, w]}[pixels]
    dtype = "TYPE_FP32" if pixels == "none" else "TYPE_UINT8"
    k = art.num_classes
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [ {{ name: "input" data_type: {dtype} dims: {dims} }} ]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ {k} ] }},
  {{ name: "probs" data_type: TYPE_FP32 dims: [ {k} ] }},
  {{ name: "features" data_type: TYPE_FP32 dims: [ {feat_dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "imgclf.labels" value: {{ string_value: {json.dumps(json.dumps(art.class_names))} }} }}
"""


def _triton(job: _Job, max_batch: int, delay_us: int) -> dict[str, Any]:
    name = job.run_dir.name.replace(" ", "_")
    repo = job.out_dir / "triton" / name
    (repo / "1").mkdir(parents=True, exist_ok=True)
    job.onnx_path.replace(repo / "1" / "model.onnx")
    with torch.no_grad():
        feat_dim = job.serving(example_input(job.art, job.pixels))[2].shape[1]
    write_text(repo / "config.pbtxt", _triton_config(name, job.art, job.pixels, max_batch, delay_us, feat_dim))
    write_text(repo / "labels.txt", "\n".join(job.art.class_names) + "\n")
    return {"path": str(job.out_dir / "triton"), "model_name": name,
            "verify": job.verify(_ort_logits(repo / "1" / "model.onnx"))}  # fmt: skip
