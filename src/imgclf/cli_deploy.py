"""The deployment verbs of the command line: export, bench and serve (see ``imgclf.cli`` for the rest)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .errors import ImgclfError


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (shared with ``imgclf.cli``, which imports this module)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def runtime_opt(p: argparse.ArgumentParser, auto_help: str) -> None:
    from .deploy.runtime import RUNTIMES

    p.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES], help=f"inference runtime ({auto_help})")


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .deploy.export import FORMATS, PIXELS

    p = sub.add_parser("export", help="ONNX / TorchScript / OpenVINO / int8 / Triton export, verified against PyTorch")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["onnx"], dest="formats")
    p.add_argument("--output", "-o", help="directory to write (default <run>/export)")
    p.add_argument("--pixels", choices=PIXELS, default="nhwc",
                   help="graph input: uint8 pixels at the input size (nhwc/nchw, preprocessing inside) or "
                   "normalised float NCHW (none)")  # fmt: skip
    p.add_argument("--opset", type=positive_int, help="ONNX opset (default: the exporter's current one)")
    p.add_argument("--data", help="labelled images to verify on (default: generated pictures, agreement only)")
    p.add_argument("--verify-n", type=positive_int, default=500, help="verification images")
    p.add_argument("--calib-data", help="int8 calibration images (default: the run's training split)")
    p.add_argument("--calib-n", type=positive_int, default=256, help="int8 calibration images")
    p.add_argument("--int8-tolerance", type=float, default=1.0, help="max top-1 points an int8 model may lose")
    p.add_argument("--force", action="store_true", help="keep an int8 model beyond the tolerance (with a warning)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .deploy.runtime import RUNTIMES

    p = sub.add_parser("bench", help="throughput and latency per runtime and batch size")
    p.add_argument("run", help="run directory")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, help="default: every runtime available, torch first")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8, 32])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--json", dest="json_out", help="also write the results (JSON) to this file")
    p.add_argument("--no-progress", action="store_true")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .deploy.serving import ServeOptions

    p = sub.add_parser("serve", help="HTTP server: batching, OOD rejection, drift, KServe v2, Prometheus /metrics",
                       description="Serve runs over HTTP. Each RUN may be NAME=RUN or NAME:VERSION=RUN.")  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories ([NAME[:VERSION]=]RUN)")
    hints = typing.get_type_hints(ServeOptions)
    for f in dataclasses.fields(ServeOptions):
        if f.name == "runtime":
            runtime_opt(p, "auto: the fastest installed; PyTorch on a GPU")
        elif hints[f.name] in (int, float, str):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=hints[f.name], default=f.default,
                           help=f"{f.metadata.get('help', '')} (default {f.default})")  # fmt: skip
    p.add_argument("--no-batching", action="store_true", help="one image per runtime call (--max-batch 1, no delay)")
    p.add_argument("--drift-threshold", nargs="+", default=[], metavar="STAT=VALUE",
                   help="drift thresholds: psi_class, psi_confidence, ks_confidence, embedding_shift")  # fmt: skip
    p.add_argument(
        "--ready-file", help="write {host, port} as JSON here once listening (for scripts; --port 0 picks one)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("aiohttp", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImgclfError(f"imgclf serve needs {', '.join(missing)}: pip install 'imgclf[deploy]'")
    from .deploy.server import serve
    from .deploy.serving import ServeOptions
    from .eval.drift import THRESHOLDS

    kw: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions) if hasattr(args, f.name)
    }
    if args.no_batching:
        kw.update(max_batch=1, max_delay_ms=0.0)
    th = {}
    for item in args.drift_threshold:
        key, _, val = item.partition("=")
        if key not in THRESHOLDS:
            raise ImgclfError(f"--drift-threshold: unknown statistic {key!r} (one of {', '.join(THRESHOLDS)})")
        try:
            th[key] = float(val)
        except ValueError:
            raise ImgclfError(f"--drift-threshold {item}: expected {key}=NUMBER") from None
    serve(args.runs, ServeOptions(**kw, drift_thresholds=th), ready_file=args.ready_file)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy.export import export_run
    from .eval.metrics import format_table

    rows = []
    for fmt in args.formats:
        r = export_run(args.run, fmt, output=args.output, pixels=args.pixels, opset=args.opset, data=args.data,
                       verify_n=args.verify_n, calib_data=args.calib_data, calib_n=args.calib_n,
                       int8_tolerance=args.int8_tolerance, force=args.force)  # fmt: skip
        v = r["verify"]
        labelled = v.get("labelled", v["images"]) > 0  # generated pictures have no labels: no top-1 to show
        rows.append([fmt, r["path"], f"{v['max_abs_logit_diff']:.2e}", f"{100 * v['top1_agreement']:.2f} %",
                     f"{100 * v['top1_exported']:.2f} %" if labelled else "-",
                     f"{v['top1_drop_points']:+.2f}" if labelled else "-", v["images"]])  # fmt: skip
    head = ["format", "path", "max |logit diff|", "top-1 agreement", "top-1", "drop (points)", "images"]
    print(format_table(rows, head))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy.bench import BENCH_HEADER, bench_run, bench_table
    from .eval.metrics import format_table
    from .io import write_json

    res = bench_run(args.run, args.runtimes, tuple(args.batch_sizes), args.warmup, args.repeats,
                    progress=not args.no_progress)  # fmt: skip
    print(format_table(bench_table(res), BENCH_HEADER))
    for rt, why in res["skipped"].items():
        print(f"skipped {rt}: {why}")
    if args.json_out:  # a measurement never writes into the run directory unasked
        write_json(Path(args.json_out), res)
        print(f"results: {args.json_out}")
    return 0


ADDERS = (_add_export, _add_bench, _add_serve)
COMMANDS = {"export": cmd_export, "bench": cmd_bench, "serve": cmd_serve}
