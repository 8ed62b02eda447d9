"""Export a run for serving: ONNX, TorchScript, OpenVINO IR, int8 ONNX (QDQ) and a Triton repository.

Every exported graph is the run's model wrapped in ``ServingModel``: optionally preprocessing in the
graph (uint8 pixels at the model's input size, NHWC or NCHW, scaled and normalised inside), then the
logits, and calibrated probabilities (``softmax(logits / T)`` with the run's temperature). Labels,
preprocessing, temperature and OOD thresholds go into the model's metadata and into
``export.json`` next to it. Each export is verified against PyTorch on validation images (max abs
logit difference, top-1 agreement) and the figures are stored.

Example:
    >>> export_run("runs/x", "onnx", pixels="nhwc")  # doctest: +SKIP
    {'format': 'onnx', 'path': 'runs/x/export/model.onnx', 'verify': {'top1_agreement': 1.0, ...}}
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..artifact import Artifact, as_artifact, content_key, load_artifact, package_versions, require, run_path
from ..data.splits import run_split
from ..errors import ImgclfError
from ..io import atomic_path, write_json, write_text
from ..models.inference import forward_both
from ..rundir import EXPORT_FILE, RunDir
from ..train.tasks import task_from_json

log = logging.getLogger("imgclf")

FORMATS = ("onnx", "torchscript", "openvino", "openvino-int8", "onnx-int8", "triton")
#: the file each format leaves in the export directory
FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.ts",
    "openvino": "model.xml",
    "openvino-int8": "model.int8.xml",
    "onnx-int8": "model.int8.onnx",
    "triton": "triton",
}
PIXELS = ("none", "nhwc", "nchw")
#: every exported graph's outputs, in order
OUTPUTS = ("logits", "probs", "features")
#: openvino-int8: training images (not the calibration ones) on which NNCF keeps top-1 agreement with fp32
HELD_N = 1000
#: ... within this many points (stricter than the user's tolerance, which is judged on other images)
HELD_MAX_DISAGREEMENT = 0.5


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
            temperature = art.temperature
        self.normalize = art.preprocessing.normalize()  # the eval transform's own arithmetic
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))
        self.task = task_from_json(art.task)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.pixels != "none":
            if self.pixels == "nhwc":
                x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
            x = self.normalize(x)
        logits, feats = forward_both(self.model, x, logits=True, features=True)  # (N, K), (N, D)
        return logits, self.task.probs(logits * self.inv_t), feats  # the task's activation, calibrated


def example_input(art: Artifact, pixels: str, batch: int = 2) -> torch.Tensor:
    c, h, w = art.preprocessing.input_size
    if pixels == "none":
        return torch.randn(batch, c, h, w)
    shape = (batch, h, w, c) if pixels == "nhwc" else (batch, c, h, w)
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def metadata(art: Artifact, pixels: str, run_dir: Path) -> dict[str, str]:
    """String metadata every format carries (ONNX metadata_props, OpenVINO rt_info, Triton config)."""
    ood = art.ood or {}
    return {
        "imgclf.arch": art.arch,
        "imgclf.labels": json.dumps(art.class_names),
        "imgclf.preprocessing": json.dumps(art.preprocessing.to_json()),
        "imgclf.pixels": pixels,
        "imgclf.temperature": json.dumps(art.temperature),
        "imgclf.ood": json.dumps(
            {"ood_score": ood.get("ood_score"), "tpr": ood.get("tpr"), "thresholds": ood.get("thresholds", {})}
        ),  # fmt: skip
        "imgclf.run": run_dir.name,
        "imgclf.version": package_versions().get("imgclf", ""),
    }


# ---------------------------------------------------------------- verification data


def verification_batches(art: Artifact, data: str | None, n: int, batch: int = 32, split: str = "val"):
    """Up to ``n`` images as (uint8 NCHW pixels at the input size, labels) batches.

    From ``data`` (any source; the pixels are the resized and centre-cropped images, the artifact's eval
    transform without normalisation, so PyTorch and the exported graph see exactly the same numbers), or,
    without data, ``generated_batches``: the run's training data is never needed.
    """
    from ..data.sources import open_source

    if not data:
        return generated_batches(art, n, batch)
    samples = open_source(data, split, art.preprocessing.decoder()).remap_to(art.class_names)
    return pixel_batches(samples, art, n, batch, seed=0)


def generated_batches(art: Artifact, n: int, batch: int = 32, seed: int = 0):
    """``n`` generated pictures (unlabelled: label -1) as (uint8 NCHW pixels, labels) batches: smooth random
    colour fields (a 4 x 4 grid upsampled, plus noise), which give the model varied, confident answers,
    unlike white noise, so a top-1 agreement on them means something."""
    c, h, w = art.preprocessing.input_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        grid = torch.rand(b, c, 4, 4, generator=g) * 255
        x = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        x = (x + torch.randn(b, c, h, w, generator=g) * 12).clamp(0, 255).round().to(torch.uint8)
        out.append((x, torch.full((b,), -1, dtype=torch.long)))
    return out


def to_input(pixels_nchw: torch.Tensor, pixels: str, art: Artifact) -> np.ndarray:
    """The exported graph's input for uint8 NCHW pixels."""
    if pixels == "nhwc":
        return pixels_nchw.permute(0, 2, 3, 1).contiguous().numpy()
    if pixels == "nchw":
        return pixels_nchw.numpy()
    return art.preprocessing.normalize()(pixels_nchw).numpy()


def verify(run_fn, serving: ServingModel, batches, art: Artifact, pixels: str) -> dict[str, Any]:
    """Compare ``run_fn(input) -> logits`` with PyTorch on the verification batches."""
    diffs, agree, n, known_n, correct_ref, correct = [], 0, 0, 0, 0, 0
    for px, y in batches:
        x = to_input(px, pixels, art)
        with torch.no_grad():
            ref = serving(torch.from_numpy(x))[0].float()
        got = torch.from_numpy(np.asarray(run_fn(x), dtype=np.float32))
        diffs.append(float((got - ref).abs().max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        known = y >= 0
        correct_ref += int((ref.argmax(1) == y)[known].sum())
        correct += int((got.argmax(1) == y)[known].sum())
        n, known_n = n + len(y), known_n + int(known.sum())
    k = max(known_n, 1)
    return {
        "images": n,
        "max_abs_logit_diff": max(diffs),
        "top1_agreement": agree / n,
        "labelled": known_n,
        "top1_torch": correct_ref / k,
        "top1_exported": correct / k,
        "top1_drop_points": round(100 * (correct_ref - correct) / k, 3),
    }


# ---------------------------------------------------------------- formats


def _export_onnx(serving: ServingModel, art: Artifact, pixels: str, out: Path, meta: dict[str, str], opset: int | None):
    import onnx

    x = example_input(art, pixels)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(out) as tmp:
        prog = torch.onnx.export(serving, (x,), None, dynamo=True, input_names=["input"],
                                 output_names=list(OUTPUTS), dynamic_shapes={"x": {0: batch}},
                                 opset_version=opset, optimize=True, verbose=False)  # fmt: skip
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


def _export_torchscript(serving: ServingModel, art: Artifact, pixels: str, out: Path, meta: dict[str, str]):
    x = example_input(art, pixels)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export; it is still what many C++ and
        # mobile deployments load, so it stays as an option (ONNX / OpenVINO are the default paths)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(serving, (x,), check_trace=False)
        with atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={k: v.encode() for k, v in meta.items()})
    return out


def _export_openvino(onnx_path: Path, out_xml: Path, meta: dict[str, str]) -> Path:
    try:
        import openvino as ov
    except ImportError:
        raise ImgclfError("OpenVINO export needs the openvino package: pip install 'imgclf[deploy]'") from None
    return _save_openvino(ov.convert_model(str(onnx_path)), out_xml, meta)


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
    compiled = ov.Core().compile_model(str(xml) if isinstance(xml, Path) else xml, "CPU", cfg)
    out = compiled.output("logits")
    return lambda x: compiled(x)[out]


def _quantize_openvino(
    fp32_onnx: Path, out_xml: Path, meta: dict[str, str], calib: list[np.ndarray], held: list[np.ndarray],
    tolerance: float,
) -> Path:  # fmt: skip
    """int8 OpenVINO IR by NNCF post-training quantization with accuracy control.

    Calibrated on ``calib``; NNCF then keeps reverting the layers that hurt most to floating point until
    top-1 agreement with the fp32 model on ``held`` (other training images, no labels needed) is within
    ``tolerance`` points. The verification images are not used, so their figures stay honest.
    """
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise ImgclfError("openvino-int8 needs nncf and openvino: pip install 'imgclf[deploy]'") from None
    model = ov.convert_model(str(fp32_onnx))
    ref_fn = _ov_runner(model)
    held_ref = [(x, ref_fn(x).argmax(1)) for x in held]

    def agreement(compiled, data) -> float:
        out = compiled.output("logits")
        hits = sum(int((compiled(x)[out].argmax(1) == r).sum()) for x, r in data)
        return hits / max(sum(len(r) for _, r in data), 1)

    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)  # NNCF reports every reverted layer at INFO
    try:
        q = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calib), nncf.Dataset(held_ref), validation_fn=agreement,
            max_drop=max(0.0, min(tolerance, HELD_MAX_DISAGREEMENT)) / 100,
            drop_type=nncf.DropType.ABSOLUTE, preset=nncf.QuantizationPreset.MIXED,
            subset_size=sum(len(x) for x in calib),
        )  # fmt: skip
    finally:
        nncf_log.setLevel(level)
    return _save_openvino(q, out_xml, meta)


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
        path.unlink()
        if path.suffix == ".xml":
            path.with_suffix(".bin").unlink(missing_ok=True)
        raise ImgclfError(msg + "; pass --force to keep the int8 model anyway or raise --int8-tolerance")
    log.warning(msg + " (--force: int8 model kept; --runtime auto will not pick it)")
    return False


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


# ---------------------------------------------------------------- entry point


def export_run(
    run: str | Path | Artifact,
    fmt: str = "onnx",
    *,
    output: str | Path | None = None,
    pixels: str = "nhwc",
    opset: int | None = None,
    data: str | None = None,
    calib_data: str | None = None,
    verify_n: int = 500,
    calib_n: int = 256,
    int8_tolerance: float = 1.0,
    force: bool = False,
    triton_max_batch: int = 64,
    triton_delay_us: int = 2000,
    generated_ok: bool = False,
) -> dict[str, Any]:
    """Export ``run`` (a run directory or an ``Artifact`` read from one) as ``fmt`` into ``output`` (default
    ``<run>/export``), verify it against PyTorch, write ``export.json``.

    Verification uses ``data`` (agreement, logit difference and the top-1 drop), or without it generated
    pictures (agreement and logit difference only; a warning says so unless ``generated_ok``). The int8
    formats are calibrated on ``calib_n`` training images (``calib_data`` or the run's training data) and
    refused when they lose more than ``int8_tolerance`` top-1 points on the verification images, unless
    ``force``.
    """
    if fmt not in FORMATS:
        raise ImgclfError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    art, run_dir = as_artifact(run), run_path(run)
    require(art, "export")
    model, art = load_artifact(art, "cpu")
    if not data and not generated_ok:
        log.warning("%s: no --data given: the %s export is verified on %d generated pictures (agreement with "
                    "PyTorch only); pass --data for real images and the top-1 drop",
                    run_dir, fmt, verify_n)  # fmt: skip
    out_dir = Path(output) if output else RunDir(run_dir).export
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # only the onnx format writes model.onnx; the others stage the fp32 graph under a hidden name
    onnx_path = out_dir / ("model.onnx" if fmt == "onnx" else f".model.fp32-for-{fmt}.onnx")
    job = _Job(run_dir, art, ServingModel(model.float(), art, pixels), metadata(art, pixels, run_dir),
               list(verification_batches(art, data, verify_n)), pixels, out_dir, onnx_path)  # fmt: skip
    result: dict[str, Any] = {"format": fmt, "pixels": pixels, "outputs": list(OUTPUTS), "run": str(run_dir),
                              "run_key": content_key(run_dir), "metadata": job.meta}  # fmt: skip
    if fmt != "torchscript":
        _export_onnx(job.serving, art, pixels, onnx_path, job.meta, opset)
    try:
        if fmt in ("onnx-int8", "openvino-int8"):
            result.update(_int8(job, fmt, calib_data, calib_n, int8_tolerance, force))
        elif fmt == "triton":
            result.update(_triton(job, triton_max_batch, triton_delay_us))
        else:
            result.update({"onnx": _onnx, "torchscript": _torchscript, "openvino": _openvino}[fmt](job))
    finally:
        if fmt != "onnx":
            onnx_path.unlink(missing_ok=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    v = result["verify"]
    if not fmt.endswith("int8") and (v["top1_agreement"] < 0.999 or v["max_abs_logit_diff"] > 1e-2):
        log.warning("%s export differs from PyTorch: top-1 agreement %.4f, max |logit diff| %.2e",
                    fmt, v["top1_agreement"], v["max_abs_logit_diff"])  # fmt: skip
    record = out_dir / EXPORT_FILE
    doc = json.loads(record.read_text()) if record.is_file() else {}
    doc[fmt] = result
    write_json(record, doc)
    return result


@dataclass
class _Job:
    """What every format's export needs."""

    run_dir: Path
    art: Artifact
    serving: ServingModel
    meta: dict[str, str]
    batches: list  # verification (uint8 NCHW pixels, labels)
    pixels: str
    out_dir: Path
    onnx_path: Path  # the fp32 ONNX graph (model.onnx, or a staged hidden file for the other formats)

    def verify(self, run_fn) -> dict[str, Any]:
        return verify(run_fn, self.serving, self.batches, self.art, self.pixels)


def _ort_logits(path: Path):
    sess = ort_session(path)
    return lambda x: sess.run(["logits"], {"input": x})[0]


def _onnx(job: _Job) -> dict[str, Any]:
    return {"path": str(job.onnx_path), "verify": job.verify(_ort_logits(job.onnx_path))}


def _torchscript(job: _Job) -> dict[str, Any]:
    path = _export_torchscript(job.serving, job.art, job.pixels, job.out_dir / FILES["torchscript"], job.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))

    def run_ts(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x))[0].numpy()

    return {"path": str(path), "verify": job.verify(run_ts)}


def _openvino(job: _Job) -> dict[str, Any]:
    xml = _export_openvino(job.onnx_path, job.out_dir / FILES["openvino"], job.meta)
    return {"path": str(xml), "verify": job.verify(_ov_runner(xml))}


def _int8(job: _Job, fmt: str, calib_data: str | None, calib_n: int, tolerance: float, force: bool) -> dict[str, Any]:
    run_dir, art, pixels = job.run_dir, job.art, job.pixels
    calib = [to_input(px, pixels, art) for px, _ in _calibration_batches(run_dir, art, calib_data, calib_n)]
    if fmt == "onnx-int8":
        q = _quantize_onnx(job.onnx_path, job.out_dir / FILES[fmt], [{"input": x} for x in calib])
        check = job.verify(_ort_logits(q))
    else:
        held = [to_input(px, pixels, art) for px, _ in _calibration_batches(run_dir, art, calib_data, HELD_N, seed=2)]
        q = _quantize_openvino(job.onnx_path, job.out_dir / FILES[fmt], job.meta, calib, held, tolerance)
        check = job.verify(_ov_runner(q, None))
    accepted = _int8_gate(fmt, q, check, tolerance, force)
    return {"path": str(q), "verify": check, "calibration_images": sum(len(x) for x in calib), "accepted": accepted}


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


def _calibration_batches(run_dir: Path, art: Artifact, data: str | None, n: int, seed: int = 1):
    """Training images (not the verification ones) for int8 calibration."""
    from ..data.sources import open_source

    if data:
        samples = open_source(data, "train", art.preprocessing.decoder())
    else:
        samples = run_split(art, "train", "--calib-data")
    return pixel_batches(samples, art, n, seed=seed)


def pixel_batches(samples, art: Artifact, n: int, batch: int = 32, seed: int = 0):
    """Up to ``n`` random images of ``samples`` as (uint8 NCHW pixels at the input size, labels) batches."""
    to_pixels = art.preprocessing.chw_pixels()
    idx = np.random.default_rng(seed).permutation(len(samples))[:n]
    xs, ys = [], []
    for i in idx:
        try:
            img = samples.load(int(i))
        except Exception:  # noqa: BLE001 - an unreadable file is just not used
            continue
        xs.append(to_pixels(img))
        ys.append(int(samples.labels[i]))
    if not xs:
        raise ImgclfError(f"{samples.name}: no readable images for the export")
    for s in range(0, len(xs), batch):
        yield torch.stack(xs[s : s + batch]), torch.tensor(ys[s : s + batch])
