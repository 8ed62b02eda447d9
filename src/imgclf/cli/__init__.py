"""The command line: thin verbs over the public API.

- ``flags``: parser pieces; each verb's flags are generated from the typed configs in ``imgclf.config``
  (``--section.field VALUE`` for training, ``--field-name`` for the others), a few common ones have short names.
- ``output``: everything printed (tables, summaries, prediction listings); the library returns dicts.
- one module per group of verbs: ``train`` (train, lr-find), ``evaluate`` (eval, predict, calibrate, explain,
  report), ``deploy`` (export, bench, serve), ``knn``, ``audit``, ``convert``, ``models``, ``zeroshot``; each has a
  ``VERBS`` table ``{name: (add_parser, command)}``.

Errors a user can fix print one line and exit with code 2 (``retrain``'s refusal to promote: 3).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import typing

from ..config import section_fields
from ..dist import world_size_env
from ..errors import ImgclfError
from . import audit, convert, deploy, evaluate, knn, models, output, train, zeroshot
from .flags import Parser, config_flags, config_from_args, positive_int

#: every verb, in the order ``imgclf --help`` lists them
VERBS = {**train.VERBS, **evaluate.VERBS, **deploy.VERBS, **knn.VERBS, **audit.VERBS, **convert.VERBS,
         **models.VERBS, **zeroshot.VERBS}  # fmt: skip

__all__ = ["VERBS", "build_parser", "config_flags", "config_from_args", "main", "positive_int"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="imgclf", description="From a folder of images to a trained, evaluated classifier.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for add, _ in VERBS.values():
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``imgclf``; returns the exit code (0 ok, 2 usage/input error, 3 a retrained model not
    promoted, 130 interrupted)."""
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
        if world_size_env() > 1:
            _join_torchrun(args)
        return VERBS[args.command][1](args)
    except ImgclfError as e:
        print(f"imgclf: error: {_rank_prefix()}{_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except torch_dist_errors() as e:
        first = " ".join(str(e).split())[:300]
        if not isinstance(e, _dist_error()) and not any(w in first for w in ("gloo", "nccl", "c10d", "onnection")):
            raise
        print(f"imgclf: error: {_rank_prefix()}lost contact with another rank ({type(e).__name__}: {first}); the job "
              "stops on every rank (torchrun's summary names the rank that failed); continue a training run with "
              "--resume", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        return 130


def _one_line(msg: str) -> str:
    """The message of an ``ImgclfError``; one raised in a DataLoader worker arrives re-raised by torch with the
    worker's traceback in front ("Caught ImgclfError in DataLoader worker process 0. Original Traceback ..."):
    its last line holds the message."""
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]
        return last.split("ImgclfError: ", 1)[-1]
    return msg


def torch_dist_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a failed collective (a rank died or timed out); none outside torchrun."""
    if world_size_env() <= 1:
        return ()
    return (_dist_error(), RuntimeError)  # RuntimeError: gloo's transport errors, when they name the backend


def _dist_error() -> type[BaseException]:
    import torch.distributed

    return torch.distributed.DistError


def _rank_prefix() -> str:
    return f"rank {os.environ.get('RANK', '?')}: " if world_size_env() > 1 else ""


def _join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun: refuse the commands that do not run on several ranks, join the process group (train joins
    it with its config's device and timeout), and keep ranks other than 0 silent and writing nothing."""
    from .. import dist
    from ..io import discard_writes

    if args.command not in dist.DISTRIBUTED_COMMANDS:
        raise ImgclfError(f"imgclf {args.command} does not run under torchrun (commands that do: "
                          f"{', '.join(dist.DISTRIBUTED_COMMANDS)}); start it as one process")  # fmt: skip
    if args.command != "train":
        dist.setup(getattr(args, "device", None) or "auto")
        import torch

        torch.manual_seed(0)  # one seed on every rank: a randomly initialised model (--weights none) is the same
    signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    if int(os.environ.get("RANK", "0")) != 0:
        discard_writes()
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        logging.getLogger("imgclf").setLevel(logging.WARNING)


def _stopped_by_torchrun(signum, frame) -> typing.NoReturn:
    print(f"imgclf: {_rank_prefix()}stopped by torchrun (another rank failed or the job was cancelled); continue a "
          "training run with --resume", file=sys.stderr, flush=True)  # fmt: skip
    os._exit(128 + signum)


def _unknown(command: str | None, extra: list[str]) -> typing.NoReturn:
    flag = next((x for x in extra if x.startswith("--")), extra[0])
    key = flag[2:].split("=", 1)[0]
    if command in ("train", "lr-find", "retrain") and "." in key:
        sec = key.split(".", 1)[0]
        fields = section_fields()
        if sec in fields:
            raise ImgclfError(f"unknown config key '{key}' (fields of {sec}: {', '.join(fields[sec])})")
        raise ImgclfError(f"unknown config key '{key}' (sections: {', '.join(fields)})")
    raise ImgclfError(f"imgclf {command or ''}: unrecognized argument '{flag}' (see --help)".replace("  ", " "))
