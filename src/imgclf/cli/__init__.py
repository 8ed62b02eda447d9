"""The command line: thin verbs over the public API.

- ``flags``: parser pieces; each verb's flags are generated from the typed configs in ``imgclf.config``
  (``--section.field VALUE`` for training, ``--field-name`` for the others), a few common ones have short names.
- ``output``: everything printed (tables, summaries, prediction listings); the library returns dicts.
- one module per group of verbs: ``train`` (train, lr-find), ``evaluate`` (eval, predict, calibrate, explain,
  report), ``deploy`` (export, bench, serve), ``knn``, ``audit``, ``convert``, ``models``; each has a ``VERBS`` table
  ``{name: (add_parser, command)}``.

Errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import typing

from ..config import section_fields
from ..errors import ImgclfError
from . import audit, convert, deploy, evaluate, knn, models, output, train
from .flags import Parser, config_flags, config_from_args, positive_int

#: every verb, in the order ``imgclf --help`` lists them
VERBS = {**train.VERBS, **evaluate.VERBS, **deploy.VERBS, **knn.VERBS, **audit.VERBS, **convert.VERBS,
         **models.VERBS}  # fmt: skip

__all__ = ["VERBS", "build_parser", "config_flags", "config_from_args", "main", "positive_int"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="imgclf", description="From a folder of images to a trained, evaluated classifier.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for add, _ in VERBS.values():
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``imgclf``; returns the exit code (0 ok, 2 usage/input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.version:
            from importlib.metadata import version

            print(f"imgclf {version('imgclf')}")
            return 0
        if extra:
            _unknown(args.command, extra)
        if not args.command:
            parser.print_help()
            return 2
        output.setup_logging(getattr(args, "quiet", False))
        return VERBS[args.command][1](args)
    except ImgclfError as e:
        print(f"imgclf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        return 130


def _unknown(command: str | None, extra: list[str]) -> typing.NoReturn:
    flag = next((x for x in extra if x.startswith("--")), extra[0])
    key = flag[2:].split("=", 1)[0]
    if command in ("train", "lr-find") and "." in key:
        sec = key.split(".", 1)[0]
        fields = section_fields()
        if sec in fields:
            raise ImgclfError(f"unknown config key '{key}' (fields of {sec}: {', '.join(fields[sec])})")
        raise ImgclfError(f"unknown config key '{key}' (sections: {', '.join(fields)})")
    raise ImgclfError(f"imgclf {command or ''}: unrecognized argument '{flag}' (see --help)".replace("  ", " "))
