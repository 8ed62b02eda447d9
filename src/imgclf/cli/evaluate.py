"""The verbs that read a saved run: ``eval``, ``predict``, ``calibrate``, ``explain`` and ``report``.
Their inference flags are generated from ``config.InferConfig``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import InferConfig
from ..errors import ImgclfError
from . import output
from .flags import config_flags, config_from_args, positive_int, runtime_flag

#: InferConfig fields that only matter for batched passes over data
_BATCH_FIELDS = ("batch_size", "workers", "device", "strict_images", "progress")
_TTA_FIELDS = ("tta", "tta_merge")
_PRIORS_HELP = (
    "deployment class priors (single-label runs): uniform, train, one number per class (0.5,0.3,...), "
    "name=value pairs, or a .json/.csv file; none: no shift"
)


def _infer(args: argparse.Namespace) -> dict[str, Any]:
    """The ``InferConfig`` flags as keyword arguments of ``eval.inference.infer_run``."""
    return config_from_args(InferConfig, args).kwargs()


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="metrics of saved runs on labelled data (several runs: an ensemble)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (runs/<name>); several = ensemble")
    p.add_argument("--data", required=True, help="labelled data: folder, CSV, .npz or builtin:fashion-mnist:test")
    p.add_argument("--split", default="test", help="split of a multi-split .npz (default test)")
    p.add_argument("--ood-data", help="out-of-distribution images (any folder, CSV, .npz, builtin:digits)")
    p.add_argument("--ood-split", default="test", help="split of a multi-split OOD .npz")
    p.add_argument("--format", choices=["table", "json"], default="table", help="stdout format")
    p.add_argument("--json", dest="json_out", help="also write the metrics JSON to this file")
    p.add_argument("--priors", help=_PRIORS_HELP + " (default: the run's own, see imgclf calibrate --priors)")
    s = p.add_argument_group("robustness to shift (common corruptions, Hendrycks & Dietterich 2019)")
    s.add_argument("--shift", metavar="CORRUPTIONS",
                   help="corruptions: all of them, or names joined with commas (gaussian_noise, shot_noise, "
                        "impulse_noise, defocus_blur, motion_blur, gaussian_blur, brightness, contrast, "
                        "jpeg_compression, pixelate); writes RUN/robustness.json")  # fmt: skip
    s.add_argument("--severities", type=positive_int, nargs="+", default=[1, 2, 3, 4, 5], help="of 1-5 (all)")
    s.add_argument("--max-images", type=positive_int, help="at most this many images (stratified; default all)")
    s.add_argument("--seed", type=int, default=0, help="seed of the image choice and of the corruptions")
    config_flags(p, InferConfig, {"batch_size": 128})


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import api
    from ..artifact import read_artifact
    from ..io import write_json

    if args.shift:
        if len(args.runs) > 1 or args.ood_data or args.priors or args.tta:
            raise ImgclfError("--shift measures one run, without --ood-data, --priors or --tta")
        doc = api.evaluate_shift(args.runs[0], args.data, split=args.split, corruptions=args.shift,
                                 severities=args.severities, max_images=args.max_images, seed=args.seed,
                                 **_infer(args))  # fmt: skip
        if args.json_out:
            write_json(args.json_out, doc)
        output.print_json(doc) if args.format == "json" else output.print_shift(doc, args.runs[0])
        return 0

    if len(args.runs) > 1:
        if args.ood_data or args.priors:
            raise ImgclfError("--ood-data and --priors work with one run at a time")
        rep = api.evaluate_ensemble(args.runs, args.data, split=args.split, **_infer(args))
        if args.json_out:
            write_json(args.json_out, rep)
        output.print_json(rep) if args.format == "json" else output.print_ensemble(rep)
        return 0
    m = api.evaluate(args.runs[0], args.data, split=args.split, ood_data=args.ood_data, ood_split=args.ood_split,
                     priors=args.priors, **_infer(args))  # fmt: skip
    if "ood" in m:
        m["ood"].pop("_scores", None)
    if args.json_out:
        write_json(args.json_out, m)
    if args.format == "json":
        output.print_json(m)
    else:
        output.print_eval(m, args.runs[0], read_artifact(args.runs[0]).class_names, args.tta)
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    from ..eval.ood import SCORES

    p = sub.add_parser("predict", help="top-k labels (multi-label runs: label sets) of images, folders, CSVs of paths")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or CSV files with a 'path' column")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--ensemble", nargs="+", metavar="RUN", default=[], help="more runs to average with (same classes)")
    p.add_argument("--ood-score", choices=SCORES, help="score for 'unknown' (default: the run's trust.ood_score)")
    p.add_argument("--no-reject", action="store_true", help="report OOD scores but never answer 'unknown'")
    p.add_argument("--priors", help=_PRIORS_HELP + " (default: the run's own, see imgclf calibrate --priors)")
    runtime_flag(p, "auto: the fastest installed (PyTorch for --tta, k-NN indexes and GPUs)")
    config_flags(p, InferConfig)


def cmd_predict(args: argparse.Namespace) -> int:
    from .. import api
    from ..io import write_text

    preds = api.predict(args.run, args.inputs, top_k=args.top_k, ensemble=args.ensemble, ood_score=args.ood_score,
                        reject=not args.no_reject, runtime=args.runtime, priors=args.priors,
                        **_infer(args))  # fmt: skip
    if not preds.rows:
        output.print_skipped(preds.skipped)
        raise ImgclfError(f"no readable image among the {len(preds.skipped)} input(s); see the skipped files above")
    text = output.render_predictions(preds, args.format)
    if args.output:
        write_text(args.output, text if text.endswith("\n") else text + "\n")
        print(f"wrote {len(preds.rows)} prediction(s) to {args.output}", file=sys.stderr)
    else:
        print(text)
    output.print_skipped(preds.skipped)
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="re-fit a run's calibration (multi-label: and decision thresholds), OOD "
                       "thresholds and drift reference")  # fmt: skip
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="held-out labelled data, not your test set (default: the run's val split)")
    p.add_argument("--split", default="val", help="split of a multi-split .npz (default val)")
    p.add_argument("--priors", help=_PRIORS_HELP + "; stored in the run, applied by eval, predict, export and "
                   "serve (default: keep the run's)")  # fmt: skip
    config_flags(p, InferConfig, {"batch_size": 128}, exclude=_TTA_FIELDS)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .. import api

    rep = api.calibrate(args.run, args.data, split=args.split, priors=args.priors, **_infer(args))
    output.print_calibrate(args.run, rep)
    return 0


def add_explain(sub: argparse._SubParsersAction) -> None:
    from ..eval.explain import METHODS

    p = sub.add_parser("explain", help="class activation map of an image (Grad-CAM and others) as a PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("image", help="image file")
    p.add_argument("--method", choices=METHODS, default="gradcam")
    p.add_argument("--target", help="class to explain (default: the predicted one)")
    p.add_argument("--output", "-o", help="PNG to write (default <image>_<method>.png next to the image)")
    p.add_argument("--device", default="cpu")
    config_flags(p, InferConfig, exclude=(*_BATCH_FIELDS, *_TTA_FIELDS))


def cmd_explain(args: argparse.Namespace) -> int:
    from .. import api

    r = api.explain(args.run, args.image, args.output, method=args.method, target=args.target, device=args.device,
                    max_pixels=args.max_pixels, max_aspect=args.max_aspect)  # fmt: skip
    print(f"{r['label']} {100 * r['prob']:.1f}% ({r['method']}): {r['output']}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="(re)write runs/<name>/report.html, optionally with OOD detection")
    p.add_argument("run", help="run directory")
    p.add_argument("--ood-data", help="out-of-distribution images to measure detection against the validation split")
    p.add_argument("--ood-split", default="test")
    p.add_argument("--no-cams", action="store_true", help="top-loss gallery without CAM overlays (faster)")
    p.add_argument("--device", default="auto")


def cmd_report(args: argparse.Namespace) -> int:
    from .. import api

    path = api.report(args.run, ood_data=args.ood_data, ood_split=args.ood_split, cams=not args.no_cams,
                      device=args.device)  # fmt: skip
    print(f"report: {path}")
    return 0


VERBS = {
    "eval": (add_eval, cmd_eval),
    "predict": (add_predict, cmd_predict),
    "calibrate": (add_calibrate, cmd_calibrate),
    "explain": (add_explain, cmd_explain),
    "report": (add_report, cmd_report),
}
