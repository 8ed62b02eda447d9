"""The deployment verbs: ``export``, ``bench`` and ``serve``; flags generated from ``config.ExportConfig``,
``config.BenchConfig`` and ``deploy.serving.ServeOptions``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys

from ..config import BenchConfig, ExportConfig
from ..errors import ImgclfError, first_line
from . import output
from .flags import config_flags, config_from_args, runtime_flag


def add_export(sub: argparse._SubParsersAction) -> None:
    from ..deploy.export import FORMATS

    p = sub.add_parser("export", help="ONNX / TorchScript / OpenVINO / int8 / Triton export, verified against PyTorch")
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
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories ([NAME[:VERSION]=]RUN)")
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
    serve(args.runs, config_from_args(ServeOptions, args), ready_file=args.ready_file)
    return 0


VERBS = {"export": (add_export, cmd_export), "bench": (add_bench, cmd_bench), "serve": (add_serve, cmd_serve)}
