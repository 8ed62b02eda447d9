"""``imgclf zeroshot``: a classifier from class names through open_clip (CLIP, SigLIP, ...), no training.

Build: ``imgclf zeroshot --model ViT-B-32 --pretrained laion2b_s34b_b79k --classes cat,dog --out runs/pets``.
Change a run: ``imgclf zeroshot RUN --add-class NAME --rename OLD=NEW --remove-class NAME`` (offline, from the
stored text tower) and ``--support DATA`` (a training-free Tip-Adapter cache). Loader, device and image-limit flags
are generated from ``config.InferConfig``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import InferConfig
from ..errors import ImgclfError
from . import output
from .flags import config_flags, config_from_args, positive_int

_BUILD_ONLY = ("model", "pretrained", "classes", "classes_file", "data", "templates", "out")
_EDITS = ("add_class", "rename", "remove_class")


def _rename(text: str) -> tuple[str, str]:
    old, eq, new = text.partition("=")
    if not eq or not old.strip() or not new.strip():
        raise argparse.ArgumentTypeError(f"expected OLD=NEW, got {text!r}")
    return old, new


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_zeroshot(sub: argparse._SubParsersAction) -> None:
    what = "a classifier from class names through open_clip (CLIP, SigLIP, ...), no training"
    p = sub.add_parser("zeroshot", help=what, description=what[0].upper() + what[1:] + ".")
    p.add_argument("run", nargs="?", help="an existing zero-shot run to change (omit to build a new one)")
    b = p.add_argument_group("build")
    b.add_argument("--model", help="open_clip model name (ViT-B-32, ViT-B-16-SigLIP, hf-hub:ORG/REPO, ...)")
    b.add_argument("--pretrained", help="open_clip tag (laion2b_s34b_b79k, webli, ...) or a local checkpoint file")
    b.add_argument("--classes", help="comma-separated class names")
    b.add_argument("--classes-file", help="text file with one class name per line")
    b.add_argument("--data", help="labelled data whose class names to use (and to score zero-shot top-1 on)")
    b.add_argument("--templates", help="prompt templates: imagenet (80, default), simple (7) or a file, each with {}")
    b.add_argument("--out", help="run directory to write (default runs/zeroshot-MODEL)")
    b.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    e = p.add_argument_group("change an existing run (offline)")
    e.add_argument("--add-class", action="append", default=[], metavar="NAME", help="add a class (repeatable)")
    e.add_argument("--rename", action="append", default=[], type=_rename, metavar="OLD=NEW", help="rename a class")
    e.add_argument("--remove-class", action="append", default=[], metavar="NAME", help="remove a class (repeatable)")
    t = p.add_argument_group("Tip-Adapter cache (Zhang et al. 2022, training-free)")
    t.add_argument("--support", help="labelled support images for the cache (folder, CSV, .npz, builtin:NAME)")
    t.add_argument("--shots", type=positive_int, help="at most this many support images per class (default all)")
    t.add_argument("--tip-alpha", type=_float, help="weight of the cache logits (default 1.0)")
    t.add_argument("--tip-beta", type=_float, help="sharpness of the cache affinities (default 5.5)")
    p.add_argument("--eval", dest="eval_data", help="labelled data to report zero-shot top-1 on")
    config_flags(p, InferConfig, exclude=("tta", "tta_merge"))


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from .. import zeroshot as zs
    from ..artifact import update_artifact

    infer = config_from_args(InferConfig, args)
    if args.run:
        given = [f"--{k.replace('_', '-')}" for k in _BUILD_ONLY if getattr(args, k) not in (None, False)]
        if given:
            raise ImgclfError(f"imgclf zeroshot RUN changes an existing run; {', '.join(given)} only build a new one")
        run = Path(args.run)
        art = _change(args, run, infer, zs)
    else:
        if any(getattr(args, k) for k in _EDITS):
            raise ImgclfError("--add-class, --rename and --remove-class change an existing run: imgclf zeroshot RUN")
        schema = (args.model or "").startswith(("hf-hub:", "local-dir:"))  # weights come with the model
        if not args.model or not (args.pretrained or schema):
            raise ImgclfError("imgclf zeroshot needs --model and --pretrained (or an existing RUN to change)")
        names = zs.class_names_from(_split(args.classes), args.classes_file, args.data)
        run = Path(args.out or f"runs/zeroshot-{args.model.replace('/', '-').replace(':', '-')}")
        _, art = zs.build_zeroshot(args.model, args.pretrained or "", names, run,
                                   templates=args.templates or "imagenet", device=_device(infer),
                                   overwrite=args.overwrite)  # fmt: skip
        if args.support:
            _, art = zs.add_support(run, args.support, **_tip(args), infer=infer)
    scored = args.eval_data or (args.data if not args.run else None)
    if scored:
        from .. import api

        m = api.evaluate(run, scored, **infer.kwargs())
        art.metrics = {**art.metrics, "zeroshot_top1": m.get("top1"), "zeroshot_data": m.get("data"),
                       "zeroshot_n": m.get("n")}  # fmt: skip
        update_artifact(art)
    output.print_zeroshot(run, art)
    return 0


def _change(args: argparse.Namespace, run: Path, infer: InferConfig, zs):
    """Class edits, then a new cache or new alpha/beta; returns the artifact as saved."""
    art = None
    if args.add_class or args.rename or args.remove_class:
        _, art = zs.edit_classes(run, add=args.add_class, rename=dict(args.rename), remove=args.remove_class,
                                 device=_device(infer))  # fmt: skip
        print(f"{run}: classes changed; its calibration, OOD and drift statistics no longer apply and were dropped "
              "(refit them with imgclf calibrate)")  # fmt: skip
    if args.support:
        _, art = zs.add_support(run, args.support, **_tip(args), infer=infer)
    elif args.tip_alpha is not None or args.tip_beta is not None:
        _, art = zs.set_tip_params(run, *_tip_values(args, run, zs))
    elif args.shots is not None:
        raise ImgclfError("--shots needs --support DATA")
    if art is None and not args.eval_data:
        raise ImgclfError("nothing to change: give --add-class, --rename, --remove-class, --support or --eval")
    return art or zs.load_zeroshot_run(run)[1]


def _tip(args: argparse.Namespace) -> dict:
    from ..models.zeroshot import DEFAULT_TIP_ALPHA, DEFAULT_TIP_BETA

    alpha = DEFAULT_TIP_ALPHA if args.tip_alpha is None else args.tip_alpha
    beta = DEFAULT_TIP_BETA if args.tip_beta is None else args.tip_beta
    return {"alpha": alpha, "beta": beta, "shots": args.shots}


def _tip_values(args: argparse.Namespace, run: Path, zs) -> tuple[float, float]:
    """New alpha and beta of an existing cache (a flag not given keeps the run's value)."""
    tip = zs.load_zeroshot_run(run)[1].extra[zs.KIND].get("tip") or {}
    alpha = tip.get("alpha") if args.tip_alpha is None else args.tip_alpha
    beta = tip.get("beta") if args.tip_beta is None else args.tip_beta
    if alpha is None or beta is None:
        raise ImgclfError(f"{run}: has no Tip-Adapter cache; give --support DATA")
    return alpha, beta


def _split(classes: str | None) -> list[str] | None:
    return None if classes is None else classes.split(",")


def _device(infer: InferConfig) -> str:
    from ..dist import resolve_device

    return str(resolve_device(infer.device))


def add_wise_ft(sub: argparse._SubParsersAction) -> None:
    what = "WiSE-FT: interpolate a run fine-tuned from a zero-shot run with the zero-shot model, in weight space"
    p = sub.add_parser("wise-ft", help=what, description=what + " (Wortsman et al. 2022). The new run predicts, "
                       "evaluates, calibrates, exports and serves like the others.")  # fmt: skip
    p.add_argument("run", help="a run trained with `imgclf train DATA --weights ZEROSHOT_RUN`")
    p.add_argument("--alpha", type=_float, default=0.5, help="0: the zero-shot weights, 1: the fine-tuned (0.5)")
    p.add_argument("--zeroshot", help="the zero-shot run (default: the one the fine-tuning started from)")
    p.add_argument("--out", help="run directory to write (default RUN-wiseALPHA)")
    p.add_argument("--eval", dest="eval_data", help="labelled data to report top-1 on")
    config_flags(p, InferConfig, exclude=("tta", "tta_merge"))


def cmd_wise_ft(args: argparse.Namespace) -> int:
    from .. import api

    infer = config_from_args(InferConfig, args)
    _, art = api.wise_ft(args.run, args.alpha, zeroshot=args.zeroshot, out=args.out, device=_device(infer))
    print(f"WiSE-FT alpha {args.alpha:g}: {art.run_dir} ({len(art.class_names)} classes; calibration and OOD "
          "thresholds dropped: refit with `imgclf calibrate`)")  # fmt: skip
    if args.eval_data:
        m = api.evaluate(art.run_dir, args.eval_data, **infer.kwargs())
        output.print_eval(m, str(art.run_dir), art.class_names, None)
    return 0


VERBS = {"zeroshot": (add_zeroshot, cmd_zeroshot), "wise-ft": (add_wise_ft, cmd_wise_ft)}
