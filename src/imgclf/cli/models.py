"""``imgclf models``: timm architectures and the weight sources each has offline and online."""

from __future__ import annotations

import argparse

from . import output


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list timm architectures and the weight sources available offline")
    p.add_argument("pattern", nargs="?", default="", help="substring or glob, e.g. resnet or 'efficientnet_b*'")
    p.add_argument(
        "--pretrained", action="store_true", help="only architectures with hub weights (needs internet to use)"
    )
    p.add_argument("--limit", type=int, default=50, help="show at most this many names (0 = all)")


def cmd_models(args: argparse.Namespace) -> int:
    import timm

    from ..models.factory import list_models
    from ..models.weights import PACKAGED_PIP, packaged_available

    names = list_models(args.pattern, pretrained=False)
    hub = {n.split(".")[0] for n in timm.list_models(pretrained=True)}
    if args.pretrained:
        names = [n for n in names if n in hub]
    output.print_models(names, args.limit, hub, packaged_available(), PACKAGED_PIP)
    return 0


VERBS = {"models": (add_models, cmd_models)}
