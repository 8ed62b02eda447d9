"""``imgclf convert DATA --to wds --output DIR``: any data imgclf reads, written as WebDataset shards
(``imgclf.data.convert``). Flags generated from ``config.ConvertConfig``."""

from __future__ import annotations

import argparse

from ..config import ConvertConfig
from . import output
from .flags import config_flags, config_from_args


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="write data as WebDataset tar shards (+ classes.txt, dataset.json)",
        description="Write any data imgclf reads (folder, CSV, .npz, builtin, shards, Hugging Face dataset) as "
        "WebDataset shards in a new folder, each image as its original bytes with its label (cls, or json labels "
        "for label sets). Written to a temporary folder, then renamed.",
    )  # fmt: skip
    p.add_argument("data", help="the data: folder, CSV, .npz, builtin:NAME, shards, hf:PATH")
    p.add_argument("--output", "-o", required=True, help="the new folder for the shards")
    config_flags(p, ConvertConfig)


def cmd_convert(args: argparse.Namespace) -> int:
    from .. import api

    output.print_convert(api.convert(args.data, args.output, config_from_args(ConvertConfig, args)))
    return 0


VERBS = {"convert": (add_convert, cmd_convert)}
