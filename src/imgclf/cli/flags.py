"""The pieces the verbs' parsers are built from: flags generated from the typed configs in ``imgclf.config``
(one flag per field, typed, checked and documented by the field), the training config's ``--section.field``
flags and their short names, and argparse types."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any

from ..config import Config, ConfigFieldError, coerce, config_to_dict, field_types, section_fields
from ..errors import ImgclfError

#: short flag -> dotted config key
SHORTCUTS = {
    "--data": ("data.path", "training data: folder, CSV, .npz or builtin:fashion-mnist (default: embedded)"),
    "--val-data": ("data.val_path", "validation data (default: stratified split of --data)"),
    "--test-data": ("data.test_path", "test data evaluated with the best weights at the end"),
    "--model": ("model.name", "any timm architecture (default tf_efficientnet_lite0)"),
    "--strategy": ("transfer.strategy", "finetune | probe | staged | scratch"),
    "--freeze-stages": ("transfer.freeze_stages", "freeze the stem and the first K stages"),
    "--weights": ("model.weights", "auto | packaged | hub | none | FILE.safetensors/.pth"),
    "--epochs": ("train.epochs", "number of epochs"),
    "--batch-size": ("data.batch_size", "batch size"),
    "--lr": ("optim.lr", "peak learning rate"),
    "--input-size": ("data.input_size", "square input size, auto or none (default auto: see data.input_size)"),
    "--seed": ("train.seed", "random seed"),
    "--device": ("train.device", "auto | cpu | cuda | cuda:N | mps"),
    "--name": ("run.name", "run directory name under --output"),
    "--output": ("run.output", "directory for run directories (default runs)"),
    "--teacher": ("distill.teachers", "trained runs to distil from (one or more)"),
}


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ``ImgclfError``s (exit 2 through ``main``)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ImgclfError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def type_hint(tp: Any) -> str:
    """The metavar of a config field's type (``INT``, ``{a,b}``, ``INT/STR``, ``[A,B]``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (tuple, list):
        return "[A,B]"
    if args:
        return "/".join(type_hint(a) for a in args if a is not type(None))
    return getattr(tp, "__name__", "V").upper()


def _list_item(tp: Any) -> Any:
    """``T`` of a ``list[T]`` or ``list[T] | None`` field (a flag taking one or more values), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def config_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                 defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = (),
                 choices: dict[str, tuple[str, ...]] | None = None) -> None:  # fmt: skip
    """One flag per documented field of the typed config ``cls`` (``--field-name``), typed and checked by
    ``config.coerce``, with the field's help and default; ``config_from_args`` builds ``cls`` back.

    A boolean is ``--field-name`` when it defaults to False and ``--no-field-name`` when it defaults to True;
    a ``list[T]`` field takes one or more values (``--shots 1 5 10``); a ``Literal`` lists its choices, and
    ``choices`` gives them for string fields whose values a higher layer knows (runtimes). A field's
    ``short`` metadata adds a short alias (``-o``). Fields without help text (set by the API, not the command
    line) get no flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:
            continue
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        h = f.metadata["help"]
        if tp is bool:
            off = "--no-" + f.name.replace("_", "-")
            p.add_argument(off if default else flag, dest=f.name, action="store_false" if default else "store_true",
                           help=f"no {h}" if default else h)  # fmt: skip
            p.set_defaults(**{f.name: default})
            continue
        item = _list_item(tp)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kw: dict[str, Any] = {"dest": f.name, "default": default,
                              "help": h if "default" in h else f"{h} (default {shown})"}  # fmt: skip
        if item is not None:
            kw["nargs"] = "+"
            tp = item
        if typing.get_origin(tp) is typing.Literal:
            kw["choices"] = typing.get_args(tp)
        elif f.name in (choices or {}):
            kw["choices"] = choices[f.name]
        else:
            kw.update(type=functools.partial(_coerce_flag, tp=tp, flag=flag), metavar=type_hint(tp))
        p.add_argument(flag, *([f.metadata["short"]] if "short" in f.metadata else []), **kw)


def _coerce_flag(text: str, tp: Any, flag: str) -> Any:
    try:
        return coerce(text, tp, flag, "command line")
    except ImgclfError as e:
        raise argparse.ArgumentTypeError(str(e).replace(f"command line: field '{flag}' ", "")) from None


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` from the flags ``config_flags`` made (fields without a flag keep their defaults); a field that
    fails the config's own checks is a one-line error naming the flag."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**given)
    except ConfigFieldError as e:
        raise ImgclfError(str(e).replace(f"config field '{e.key}'", "--" + e.key.replace("_", "-"))) from None


def runtime_flag(p: argparse.ArgumentParser, auto_help: str) -> None:
    """``--runtime`` with the runtimes ``deploy.runtime`` knows."""
    from ..deploy.runtime import RUNTIMES

    p.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES], help=f"inference runtime ({auto_help})")


def recipes() -> list[str]:
    """The recipes shipped in ``imgclf/recipes``."""
    return sorted(q.stem for q in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def config_parser(sub: argparse._SubParsersAction, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    """A verb that takes the training config: --config, --recipe, the shortcuts and every --section.field."""
    p = sub.add_parser(name, help=help_, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument(
        "--config",
        help="YAML file with sections data, aug, model, transfer, probe, optim, sched, train, distill, ssl, trust, run",
    )
    p.add_argument("--recipe", help=f"a recipe shipped with imgclf: {', '.join(recipes())}")
    p.add_argument(
        "--strict-images", action="store_true", help="stop at the first unreadable image instead of skipping it"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only the final summary")
    types_ = field_types()
    for flag, (key, h) in SHORTCUTS.items():
        many = {"nargs": "+", "metavar": "RUN"} if _list_item(types_[key]) is not None else {}
        p.add_argument(flag, dest=key, **({"metavar": type_hint(types_[key])} | many), help=f"{h} (= --{key})")
    defaults = config_to_dict(Config())
    for sec, fields in section_fields().items():
        g = p.add_argument_group(f"{sec} (config section)")
        for fname, f in fields.items():
            key = f"{sec}.{fname}"
            g.add_argument(f"--{key}", dest=key, metavar=type_hint(types_[key]),
                           help=f"{f.metadata.get('help', '')} [{defaults[sec][fname]}]")  # fmt: skip
    return p


def flat_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--section.field`` values given (and the two shortcuts that are plain switches) as dotted keys."""
    ns = vars(args)
    flat = {k: v for k, v in ns.items() if "." in k}
    if ns.get("strict_images"):
        flat["data.strict_images"] = "true"
    if ns.get("no_progress"):
        flat["run.progress"] = "false"
    return flat
