"""Distil -> calibrate -> quantize -> benchmark, with an accuracy budget: ``imgclf compress TEACHER --student ARCH``.

One command chains what the production guide's path to the edge asks for (our value: no peer chains these with a
gate): the student ``ARCH`` trains on the teacher's data with the teacher distilling into it (``train.distill``;
the student's validation split fits its temperature and OOD statistics as in any run), is exported to int8
with accuracy-controlled quantization (``deploy.export``, calibrated on training images), and the teacher, the
fp32 student and the int8 student are measured side by side on the same images: size of the deployable file
(MB), parameters, images/s at batch 1 and 32 (``deploy.bench``) and the primary metric (top-1; mAP for
multi-label runs). The result is refused (non-zero exit, the int8 model deleted, ``compress.json`` saying
why) when the int8 student loses more than ``max_drop`` points against the teacher, unless ``force``.

The images compared are the student run's test split when its data has one, else its validation split (the
teacher's too: the student copies the teacher's data section and seed, so the validation images are the ones
the teacher held out as well). Teacher and fp32 student are scored with PyTorch; the int8 student on its int8
runtime; speed is measured on ``runtime`` (auto: the fastest floating-point runtime installed) for the teacher
and the fp32 student and on the int8 runtime for the int8 student.

Example:
    >>> cfg = imgclf.compress_config("runs/demo", "simplecnn_t")  # doctest: +SKIP
    >>> res = imgclf.compress(cfg, "runs/demo", max_drop=2.0)      # doctest: +SKIP
    >>> res["int8_vs_teacher"]["size_ratio"]                   # doctest: +SKIP
    42.1
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from .artifact import read_artifact, require
from .config import Config
from .errors import ImgclfError
from .io import write_json

log = logging.getLogger("imgclf")

#: the file ``compress`` leaves in the student run
COMPRESS_FILE = "compress.json"
#: the recipe a student trains with when neither --recipe nor --config is given: a small network from scratch
DEFAULT_STUDENT_RECIPE = "scratch-small"
#: overrides compress refuses: they would change the images compared (the teacher's held-out ones) or the student
FIXED_KEYS = {"data.path": "--data", "data.val_path": "--val-data", "data.test_path": "--test-data",
              "data.val_split": "--data.val_split", "train.seed": "--seed", "model.name": "--model",
              "distill.teachers": "--teacher"}  # fmt: skip
#: data fields the student takes from the teacher's config: the same images, labels and decoding
TEACHER_DATA_FIELDS = ("path", "val_path", "test_path", "val_split", "task", "classes", "label_sep", "image_column",
                       "label_column", "pixel_range", "background", "max_pixels", "max_aspect")  # fmt: skip
INT8_FORMATS = ("openvino-int8", "onnx-int8", "executorch-int8")  # fastest first (imgclf bench on CPUs)


def student_overrides(
    teacher: str | Path,
    student: str,
    *,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[str | None, dict[str, Any]]:
    """(recipe, dotted overrides) of the student's training config (``api.compress_config`` builds it): ``recipe``
    (default ``scratch-small`` with random init unless ``config_file`` is given) < the teacher's data section and
    seed < ``model.name = student``, ``distill.teachers = [teacher]`` < ``overrides`` (as ``imgclf train`` takes).

    Raises:
        ImgclfError: ``teacher`` is not a run directory, or a k-NN index (it cannot teach).
    """
    fixed = [flag for key, flag in FIXED_KEYS.items() if key in (overrides or {})]
    if fixed:
        raise ImgclfError(f"imgclf compress takes the teacher's data, split and seed and --student (so both are "
                          f"compared on images the teacher held out): drop {', '.join(fixed)}; to distil on other "
                          "data, use `imgclf train --teacher RUN`")  # fmt: skip
    art = read_artifact(teacher)  # ImgclfError naming the path when it is not a run
    require(art, "teach")
    tdata = art.config.get("data", {})
    flat: dict[str, Any] = {f"data.{k}": tdata[k] for k in TEACHER_DATA_FIELDS if tdata.get(k) is not None}
    if "seed" in art.config.get("train", {}):
        flat["train.seed"] = art.config["train"]["seed"]  # the split depends on it: the teacher's held-out images
    flat |= {"model.name": student, "distill.teachers": [str(teacher)]}
    if recipe is None and config_file is None:
        recipe = DEFAULT_STUDENT_RECIPE
    return recipe, flat | dict(overrides or {})


def int8_format(choice: str = "auto") -> str:
    """``auto`` -> openvino-int8 (accuracy-controlled NNCF quantization) when its runtime is installed, else
    onnx-int8 (ONNX Runtime static QDQ), else executorch-int8. Raises ImgclfError when the choice cannot run here."""
    from .deploy.runtime import available_runtimes

    have = available_runtimes()
    if choice == "auto":
        choice = next((f for f in INT8_FORMATS if _int8_runtime(f) in have), "")
        if not choice:
            raise ImgclfError("imgclf compress needs ONNX Runtime (or OpenVINO + NNCF, or ExecuTorch) for the int8 "
                              "student: pip install 'imgclf[deploy]'")  # fmt: skip
    if choice not in INT8_FORMATS:
        raise ImgclfError(f"--int8 must be auto or one of {', '.join(INT8_FORMATS)} (got {choice!r})")
    if _int8_runtime(choice) not in have:
        raise ImgclfError(f"--int8 {choice} is not available here: pip install 'imgclf[deploy]'")
    return choice


def fp_runtime(choice: str = "auto") -> str:
    """``auto`` -> the fastest floating-point runtime installed (``deploy.runtime.default_runtime`` without a run,
    which never picks int8)."""
    from .deploy.runtime import RUNTIMES, available_runtimes, default_runtime

    if choice == "auto":
        return default_runtime()
    if choice not in RUNTIMES or choice.endswith("int8"):
        fp = ", ".join(r for r in RUNTIMES if not r.endswith("int8"))
        raise ImgclfError(f"--runtime must be auto or a floating-point runtime ({fp})")
    if choice not in available_runtimes():
        raise ImgclfError(f"runtime {choice} is not available here")
    return choice


def compress(
    cfg: Config,
    teacher: str | Path,
    *,
    max_drop: float = 2.0,
    force: bool = False,
    int8: str = "auto",
    runtime: str = "auto",
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 20,
) -> dict[str, Any]:
    """Train the student of ``cfg`` (made by ``api.compress_config``) from ``teacher``, export it as int8, and measure
    teacher, student and int8 student. Returns the ``compress.json`` document: ``rows`` (one per model: role, run,
    arch, runtime, params, size_mb, img_per_s {batch: images/s}, metric value in [0, 1]), ``images`` compared,
    ``int8_vs_teacher`` (size_ratio, speedup per batch size, drop_points), ``max_drop``, ``accepted``.

    Raises:
        ImgclfError: before training for a bad teacher, budget, runtime or int8 format; after it when the int8
            student loses more than ``max_drop`` points against the teacher (without ``force``; the student run
            and ``compress.json`` are kept, the int8 model deleted).
    """
    from .pipeline import run_training

    if not max_drop >= 0:
        raise ImgclfError(f"--max-drop must be >= 0 points (got {max_drop})")
    fmt, rt = int8_format(int8), fp_runtime(runtime)
    t0 = time.perf_counter()
    samples, split = _compared_images(cfg)
    # the teacher first: a teacher the runtime cannot run fails here, not after the student's training
    rows = [_measure("teacher", teacher, "torch", rt, samples, batch_sizes, repeats)]
    student = run_training(cfg).run_dir
    exp = _int8_export(student, fmt, samples, max_drop)
    q_rt = _int8_runtime(fmt)
    rows += [
        _measure("student", student, "torch", rt, samples, batch_sizes, repeats),
        _measure("int8 student", student, q_rt, q_rt, samples, batch_sizes, repeats, size_file=Path(exp["path"])),
    ]
    doc = _verdict(rows, max_drop, force)
    doc |= {"teacher": str(teacher), "student": str(student), "int8_format": fmt, "fp_runtime": rt,
            "images": {"split": split, "n": len(samples), "name": samples.name}, "int8_export": {
                k: exp.get(k) for k in ("path", "accepted", "calibration_images", "held_out_images")},
            "seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    write_json(student / COMPRESS_FILE, doc)
    if not doc["accepted"]:
        if not force:
            _refuse(student, fmt, exp, doc)
        log.warning("the int8 student is beyond the budget (--force: kept; --runtime auto will not pick it)")
    from .deploy.export import set_int8_accepted

    set_int8_accepted(student, fmt, doc["accepted"])  # the budget against the teacher decides what serve may pick
    return doc


def _compared_images(cfg: Config):
    """The student's test split (or validation split without one) and its name, rebuilt from its config."""
    from .data.splits import prepare_data

    splits = prepare_data(cfg)
    return (splits.test, "test") if splits.test is not None else (splits.val, "val")


def _int8_export(student: Path, fmt: str, samples, max_drop: float) -> dict[str, Any]:
    """The int8 export of the student, verified on the compared images (top-1 drop against its fp32 self), the
    accuracy-controlled quantizer's tolerance set to the budget; not gated against the fp32 student
    (``int8_gate=False``): ``compress`` judges it against the teacher."""
    from .deploy.export import export_run

    return export_run(student, fmt, data=samples, verify_n=len(samples), int8_tolerance=max_drop, int8_gate=False)


def _int8_runtime(fmt: str) -> str:
    return {"onnx-int8": "onnxruntime-int8"}.get(fmt, fmt)


def _measure(role: str, run: str | Path, score_rt: str, speed_rt: str, samples, batch_sizes, repeats: int,
             size_file: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One row: the model's metric on ``samples`` (scored on ``score_rt``), its speed on ``speed_rt``, its size."""
    from .artifact import load_artifact
    from .deploy.bench import bench_run

    model, art = load_artifact(run)
    params = sum(p.numel() for p in model.parameters())
    del model
    files = [size_file, size_file.with_suffix(".bin")] if size_file else [Path(run) / "model.safetensors"]
    size = sum(f.stat().st_size for f in files if f.is_file())
    bench = bench_run(run, [speed_rt], tuple(batch_sizes), warmup=3, repeats=repeats, progress=False)
    if bench["skipped"]:
        raise ImgclfError(f"{run}: {speed_rt} could not run it ({bench['skipped'][speed_rt]})")
    metric, value = _score(run, score_rt, samples)
    return {"role": role, "run": str(run), "arch": art.arch, "runtime": speed_rt, "scored_on": score_rt,
            "params": params, "size_mb": round(size / 1e6, 3), "metric": metric, "value": value,
            "img_per_s": {r["batch"]: r["img_per_s"] for r in bench["results"]},
            "latency_ms": {r["batch"]: r["latency_ms_median"] for r in bench["results"]}}  # fmt: skip


def _score(run: str | Path, runtime: str, samples) -> tuple[str, float]:
    """(metric name, value in [0, 1]) of ``run`` on ``samples`` through ``runtime`` (``deploy.runtime.runtime_outputs``:
    the same loader and skip log as predict): top-1, or mAP for multi-label runs; the run's classes matched to the
    samples' by name."""
    from .deploy.runtime import runtime_outputs
    from .train.distill import class_order
    from .train.tasks import task_from_json

    out, art, skips = runtime_outputs(run, samples, runtime, progress=False, desc=f"score {Path(run).name}")
    if skips.items:
        log.warning("%s: %d unreadable image(s) left out of the comparison (the same for every model)", samples.name,
                    len(skips.items))  # fmt: skip
    names = list(samples.class_names)
    order = class_order(art.class_names, names, f"{run} (scored on the student's images)")
    task = task_from_json(art.task)
    metric = "map" if task.multi_label else "top1"
    return metric, float(task.metrics(out.logits[:, order], out.labels, names)[metric])


def _verdict(rows: list[dict[str, Any]], max_drop: float, force: bool) -> dict[str, Any]:
    """The int8 student against the teacher: size ratio, speed-up per batch size, drop in points, accepted (never
    when the metric is undefined, e.g. mAP without positives)."""
    t, _, q = rows
    drop = round(100 * (t["value"] - q["value"]), 2)
    within = bool(drop <= max_drop)  # False for NaN
    return {
        "rows": rows,
        "metric": t["metric"],
        "int8_vs_teacher": {
            "size_ratio": round(t["size_mb"] / q["size_mb"], 1) if q["size_mb"] else None,
            "speedup": {b: round(q["img_per_s"][b] / t["img_per_s"][b], 1) for b in t["img_per_s"]},
            "drop_points": drop,
        },
        "max_drop": max_drop,
        "within_budget": within,
        "accepted": within,
        "forced": force and not within,
    }


class CompressRefused(ImgclfError):
    """The int8 student is beyond the accuracy budget; ``doc`` holds the figures (``compress.json``)."""

    def __init__(self, message: str, doc: dict[str, Any]):
        super().__init__(message)
        self.doc = doc


def _refuse(student: Path, fmt: str, exp: dict[str, Any], doc: dict[str, Any]) -> None:
    """Delete the refused int8 model (``--runtime auto`` must never pick it) and raise ``CompressRefused``."""
    from .deploy.export import set_int8_accepted
    from .deploy.export.int8 import remove_model

    set_int8_accepted(student, fmt, False)
    remove_model(Path(exp["path"]))
    v = doc["int8_vs_teacher"]
    metric = {"top1": "top-1", "map": "mAP"}.get(doc["metric"], doc["metric"])
    if math.isnan(v["drop_points"]):
        raise CompressRefused(f"the {metric} of the teacher or the int8 student is undefined on the compared images "
                              f"(figures in {student / COMPRESS_FILE}); int8 model deleted", doc)  # fmt: skip
    raise CompressRefused(f"the int8 student loses {v['drop_points']:.2f} {metric} points against the "
                          f"teacher (budget --max-drop {doc['max_drop']}); int8 model deleted, student run kept at "
                          f"{student} (figures in {student / COMPRESS_FILE}); pass --force to keep it, raise "
                          "--max-drop, or train the student longer", doc)  # fmt: skip
