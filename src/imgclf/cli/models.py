"""``imgclf models``: timm architectures and the weight sources each has offline and online; with ``--benchmark``,
their parameters, GMACs, latency, throughput and (given data) linear-probe accuracy on this machine."""

from __future__ import annotations

import argparse
import time

from ..errors import ImgclfError
from . import output
from .flags import positive_int, runtime_flag


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list timm architectures (weights offline/online); --benchmark: choose one for a latency budget",
        description="List architectures matching PATTERNs (names, substrings or globs). With --benchmark, measure "
        "each on this machine: parameters, GMACs at the input size, latency at batch 1 and img/s at batch 32 on the "
        "fastest runtime, and with --data a linear-probe accuracy (architectures with weights available offline; "
        "the others are timed with random weights and marked); writes benchmark.json, pareto.png and one run per "
        "architecture under --output.",
    )  # fmt: skip
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="names, substrings or globs, e.g. resnet18 'efficientnet_b*' (listing: all)")  # fmt: skip
    p.add_argument(
        "--pretrained", action="store_true", help="only architectures with hub weights (needs internet to use)"
    )
    p.add_argument("--limit", type=int, default=50, help="show (or, with --benchmark, measure) at most this many")
    g = p.add_argument_group("--benchmark")
    g.add_argument("--benchmark", action="store_true", help="measure the matching architectures (see above)")
    g.add_argument("--data", help="data for the linear-probe accuracy (folder, CSV, .npz, builtin:NAME)")
    g.add_argument("--input-size", type=positive_int, help="square input size (default: as `imgclf train` picks)")
    runtime_flag(g, "auto: the fastest installed, as `imgclf serve` picks")
    g.add_argument("--latency-ms", type=float, help="pick the most accurate architecture within this latency (batch 1)")
    g.add_argument("--batch-sizes", type=positive_int, nargs=2, default=[1, 32], metavar=("LATENCY", "THROUGHPUT"),
                   help="batch sizes for latency and throughput [1 32]")  # fmt: skip
    g.add_argument("--repeats", type=positive_int, default=20, help="timed calls per batch size [20]")
    g.add_argument("--output", help="directory for benchmark.json, pareto.png and the runs [runs/backbones-<time>]")
    g.add_argument("--hub", action="store_true", help="download hub weights for the probe (needs internet)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _matching(patterns: list[str], pretrained: bool) -> list[str]:
    import timm

    from ..models.factory import list_models

    names: list[str] = []
    for pat in patterns or [""]:
        found = [pat] if timm.is_model(pat) else list_models(pat, pretrained=False)
        names += [n for n in found if n not in names]
    if pretrained:
        hub = {n.split(".")[0] for n in timm.list_models(pretrained=True)}
        names = [n for n in names if n in hub]
    return names


def cmd_models(args: argparse.Namespace) -> int:
    import timm

    from ..models.weights import PACKAGED_PIP, packaged_available

    names = _matching(args.patterns, args.pretrained)
    if args.benchmark:
        return _benchmark(args, names)
    hub = {n.split(".")[0] for n in timm.list_models(pretrained=True)}
    output.print_models(names, args.limit, hub, packaged_available(), PACKAGED_PIP)
    return 0


def _benchmark(args: argparse.Namespace, names: list[str]) -> int:
    from ..backbones import benchmark_backbones

    if not args.patterns:
        raise ImgclfError("imgclf models --benchmark: name the architectures to measure (names or patterns)")
    if args.limit and len(names) > args.limit:
        raise ImgclfError(f"{len(names)} architectures match; narrow the patterns or raise --limit (each one is "
                          "exported and timed)")  # fmt: skip
    out = args.output or f"runs/backbones-{time.strftime('%Y%m%d-%H%M%S')}"
    res = benchmark_backbones(names, data=args.data, input_size=args.input_size, runtime=args.runtime,
                              batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, latency_ms=args.latency_ms,
                              output=out, hub=args.hub, progress=not args.no_progress)  # fmt: skip
    output.print_backbones(res)
    return 0


VERBS = {"models": (add_models, cmd_models)}
