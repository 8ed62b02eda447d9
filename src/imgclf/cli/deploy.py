"""The deployment verbs: ``export``, ``bench``, ``serve`` and ``compress``; flags generated from
``config.ExportConfig``, ``config.BenchConfig``, ``deploy.serving.ServeOptions`` and (compress) the training
config."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys

from ..config import BenchConfig, ExportConfig
from ..errors import ImgclfError, first_line
from . import output
from .flags import config_flags, config_from_args, config_parser, flat_overrides, positive_int, runtime_flag


def add_export(sub: argparse._SubParsersAction) -> None:
    from ..deploy.export import FORMATS

    p = sub.add_parser("export", help="ONNX / torch.export / OpenVINO / int8 / Triton / TorchScript export, verified")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["onnx"], dest="formats",
                   help="one or more formats (default onnx)")  # fmt: skip
    config_flags(p, ExportConfig)


def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.export import export_run

    cfg = config_from_args(ExportConfig, args)
    done, failed = [], []
    for fmt in args.formats:  # one format failing does not stop the others
        try:
            done.append((fmt, export_run(args.run, fmt, **dataclasses.asdict(cfg))))
        except Exception as e:  # noqa: BLE001 - a runtime or quantizer failing on one format: report, go on
            if len(args.formats) == 1:
                raise
            first = first_line(e, 300)
            print(f"imgclf: error: {first if isinstance(e, ImgclfError) else f'{fmt} export failed: {first}'}",
                  file=sys.stderr)  # fmt: skip
            failed.append(fmt)
    if done:
        output.print_exports(done)
    if failed:
        raise ImgclfError(f"{len(failed)} of {len(args.formats)} formats failed: {', '.join(failed)} (see above)")
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    from ..deploy.runtime import RUNTIMES

    p = sub.add_parser("bench", help="throughput and latency per runtime and batch size")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", dest="json_out", help="also write the results (JSON) to this file")
    config_flags(p, BenchConfig, choices={"runtimes": RUNTIMES})


def cmd_bench(args: argparse.Namespace) -> int:
    from ..deploy.bench import bench_run
    from ..io import write_json

    cfg = config_from_args(BenchConfig, args)
    res = bench_run(args.run, cfg.runtimes, tuple(cfg.batch_sizes), cfg.warmup, cfg.repeats, progress=cfg.progress)
    output.print_bench(res)
    if args.json_out:  # a measurement never writes into the run directory unasked
        write_json(args.json_out, res)
        print(f"results: {args.json_out}")
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    from ..deploy.serving import ServeOptions

    p = sub.add_parser("serve", help="HTTP server: batching, OOD rejection, drift, KServe v2, Prometheus /metrics",
                       description="Serve runs over HTTP. Each RUN may be NAME=RUN or NAME:VERSION=RUN.")  # fmt: skip
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories ([NAME[:VERSION]=]RUN); or --repository")
    runtime_flag(p, "auto: the fastest installed; PyTorch on a GPU")
    config_flags(p, ServeOptions, exclude=("runtime",))
    p.add_argument("--no-batching", action="store_true", help="one image per runtime call (--max-batch 1, no delay)")
    p.add_argument("--drift-threshold", nargs="+", default=[], metavar="STAT=VALUE",
                   help="drift thresholds: psi_class, psi_confidence, ks_confidence, embedding_shift")  # fmt: skip
    p.add_argument(
        "--ready-file", help="write {host, port} as JSON here once listening (for scripts; --port 0 picks one)"
    )


def _drift_thresholds(items: list[str]) -> dict[str, float]:
    from ..eval.drift import THRESHOLDS

    th = {}
    for item in items:
        key, _, val = item.partition("=")
        if key not in THRESHOLDS:
            raise ImgclfError(f"--drift-threshold: unknown statistic {key!r} (one of {', '.join(THRESHOLDS)})")
        try:
            th[key] = float(val)
        except ValueError:
            raise ImgclfError(f"--drift-threshold {item}: expected {key}=NUMBER") from None
    return th


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [m for m in ("aiohttp", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImgclfError(f"imgclf serve needs {', '.join(missing)}: pip install 'imgclf[deploy]'")
    from ..deploy.server import serve
    from ..deploy.serving import ServeOptions

    if args.no_batching:
        args.max_batch, args.max_delay_ms = 1, 0.0
    args.drift_thresholds = _drift_thresholds(args.drift_threshold)
    if not args.runs and not args.repository:
        raise ImgclfError("imgclf serve: give at least one RUN or a --repository REPO")
    serve(args.runs, config_from_args(ServeOptions, args), ready_file=args.ready_file)
    return 0


def add_compress(sub: argparse._SubParsersAction) -> None:
    p = config_parser(
        sub, "compress", "distil a small student from a run, quantize it to int8, compare size, speed and accuracy",
        "Train the student --student on the teacher's data with the teacher distilling into it (recipe "
        "scratch-small unless --recipe/--config; any training flag applies), calibrate it, export it to int8 "
        "(accuracy-controlled), and measure teacher, student and int8 student on the same test (or validation) "
        "images: size, img/s at batch 1 and 32, top-1. Refused (exit 2) when the int8 student loses more than "
        "--max-drop points against the teacher, unless --force.",
    )  # fmt: skip
    p.add_argument("run_teacher", metavar="TEACHER", help="the trained run to distil from")
    p.add_argument("--student", required=True, help="student architecture (timm or imgclf's simplecnn_t/s/m)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=2.0,
        help="accuracy budget: most top-1 (mAP) points the int8 student may lose vs the teacher [2.0]",
    )
    p.add_argument("--force", action="store_true", default=False, help="keep a result beyond the budget (reported)")
    p.add_argument(
        "--int8",
        default="auto",
        help="auto | openvino-int8 | onnx-int8 | executorch-int8 [auto: OpenVINO if installed]",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        help="runtime timing teacher and fp32 student [auto: the fastest floating-point one]",
    )
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 32], help="batch sizes timed [1 32]")
    p.add_argument("--json", dest="json_out", help="also write the figures (JSON) to this file")


def cmd_compress(args: argparse.Namespace) -> int:
    from .. import api

    ns = vars(args)
    flat = flat_overrides(args)
    if "distill.teachers" in flat:
        raise ImgclfError("imgclf compress: the teacher is the first argument (one run); drop --teacher")
    cfg = api.compress_config(args.run_teacher, args.student, recipe=ns.get("recipe"), config_file=ns.get("config"),
                              overrides=flat)  # fmt: skip
    from ..compress import CompressRefused

    output.gated(lambda: api.compress(cfg, args.run_teacher, max_drop=args.max_drop, force=args.force, int8=args.int8,
                                      runtime=args.runtime, batch_sizes=tuple(args.batch_sizes)),
                 output.print_compress, CompressRefused, ns.get("json_out"))  # fmt: skip
    return 0


VERBS = {"export": (add_export, cmd_export), "bench": (add_bench, cmd_bench), "serve": (add_serve, cmd_serve),
         "compress": (add_compress, cmd_compress)}  # fmt: skip
