"""The command line: thin verbs over the public API. Flags for every config field are generated
from the dataclasses in ``imgclf.config`` (``--section.field VALUE``); a few common ones have short names.

Errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import typing
from pathlib import Path
from typing import Any

from . import cli_deploy
from .cli_deploy import positive_int as _positive_int
from .config import (
    Config,
    ConfigFieldError,
    InferConfig,
    coerce,
    config_to_dict,
    field_types,
    section_fields,
)  # fmt: skip
from .errors import ImgclfError

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
    "--input-size": ("data.input_size", "square input size (default: the model's)"),
    "--seed": ("train.seed", "random seed"),
    "--device": ("train.device", "auto | cpu | cuda | cuda:N | mps"),
    "--name": ("run.name", "run directory name under --output"),
    "--output": ("run.output", "directory for run directories (default runs)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ImgclfError(f"{self.prog}: {message} (see {self.prog} --help)")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("imgclf")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _type_hint(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (tuple, list):
        return "[A,B]"
    if args:
        return "/".join(_type_hint(a) for a in args if a is not type(None))
    return getattr(tp, "__name__", "V").upper()


def _config_parser(sub: argparse._SubParsersAction, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    """A sub-command that takes the training config: --config, --recipe, shortcuts and every --section.field."""
    p = sub.add_parser(name, help=help_, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument(
        "--config", help="YAML file with sections data, aug, model, transfer, probe, optim, sched, train, run"
    )
    p.add_argument("--recipe", help=f"a recipe shipped with imgclf: {', '.join(_recipes())}")
    p.add_argument(
        "--strict-images", action="store_true", help="stop at the first unreadable image instead of skipping it"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only the final summary")
    types_ = field_types()
    for flag, (key, h) in SHORTCUTS.items():
        p.add_argument(flag, dest=key, metavar=_type_hint(types_[key]), help=f"{h} (= --{key})")
    defaults = config_to_dict(Config())
    for sec, fields in section_fields().items():
        g = p.add_argument_group(f"{sec} (config section)")
        for fname, f in fields.items():
            key = f"{sec}.{fname}"
            g.add_argument(f"--{key}", dest=key, metavar=_type_hint(types_[key]),
                           help=f"{f.metadata.get('help', '')} [{defaults[sec][fname]}]")  # fmt: skip
    return p


def _recipes() -> list[str]:
    from pathlib import Path

    return sorted(q.stem for q in (Path(__file__).parent / "recipes").glob("*.yaml"))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _config_parser(
        sub, "train", "fine-tune a model (no arguments: the embedded Fashion-MNIST job)",
        "Train a classifier. Precedence: defaults < --recipe < --config < flags.",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the run named by --name (or the newest) from its last checkpoint")  # fmt: skip


def _add_lr_find(sub: argparse._SubParsersAction) -> None:
    p = _config_parser(
        sub, "lr-find", "LR range test: plot loss against learning rate and suggest a value",
        "Runs --steps updates with the learning rate rising exponentially, on the same data, model and strategy"
        " as `imgclf train` with the same flags; writes lr_find.png and lr_find.json.",
    )  # fmt: skip
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--out", help="output directory (default runs/lr-find-<model>-<time>)")


def _add_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="few-shot classification without training: build, extend and test k-NN indexes")
    verbs = p.add_subparsers(dest="knn_command", parser_class=_Parser, required=True)

    def embed_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--per-class", type=_positive_int, help="use at most this many images per class (seeded)")
        q.add_argument("--split", default="train", help="split of a multi-split .npz / builtin data (default train)")
        q.add_argument("--seed", type=int, default=0)
        config_flags(q, InferConfig, exclude=("max_pixels", "max_aspect", "tta", "tta_merge"))

    def model_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default="tf_efficientnet_lite0", help="any timm backbone")
        q.add_argument("--weights", default="auto", help="auto | packaged | hub | none | FILE")
        q.add_argument("--input-size", type=_positive_int, help="square input size (default: the model's)")
        q.add_argument("--crop-pct", type=float, help="eval centre-crop fraction (default: the model's)")
        q.add_argument("--k", type=_positive_int, default=10, help="neighbours that vote")
        q.add_argument("--temperature", type=float, default=0.07, help="vote / prototype softmax temperature")

    b = verbs.add_parser("build", help="embed a labelled support set into an index run directory")
    b.add_argument("support", help="support set: folder (one sub-folder per class), CSV, .npz or builtin:NAME")
    b.add_argument("--name", required=True, help="run directory name under --output")
    b.add_argument("--output", default="runs")
    b.add_argument("--mode", choices=["knn", "prototype"], default="knn")
    model_opts(b)
    embed_opts(b)
    a = verbs.add_parser("add", help="add images (and new classes) to an index, no training")
    a.add_argument("run", help="index run directory")
    a.add_argument("support", help="more labelled images: folder, CSV, .npz or builtin:NAME")
    embed_opts(a)
    e = verbs.add_parser("episodes", help="N-way K-shot episode accuracy (mean and 95 %% CI)")
    e.add_argument("data", help="labelled pool: folder, CSV, .npz or builtin:NAME")
    e.add_argument("--shots", type=_positive_int, nargs="+", default=[1, 5, 10])
    e.add_argument("--ways", type=_positive_int, help="classes per episode (default: all)")
    e.add_argument("--queries", type=_positive_int, default=15, help="query images per class and episode")
    e.add_argument("--episodes", type=_positive_int, default=200)
    e.add_argument("--modes", nargs="+", choices=["knn", "prototype"], default=["prototype", "knn"])
    e.add_argument("--json", dest="json_out", help="also write the report JSON here")
    model_opts(e)
    embed_opts(e)


def config_flags(p: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None,
                 exclude: tuple[str, ...] = ()) -> None:  # fmt: skip
    """One flag per field of the typed config ``cls`` (``--field-name``; a boolean is ``--field-name`` when it
    defaults to False, ``--no-field-name`` when it defaults to True), typed and checked by ``config.coerce``,
    help from the field; ``config_from_args`` builds ``cls`` back (its own checks name the flag)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        default, h = (defaults or {}).get(f.name, f.default), f.metadata.get("help", "")
        if tp is bool:
            off = "--no-" + f.name.replace("_", "-")
            p.add_argument(off if default else flag, dest=f.name, action="store_false" if default else "store_true",
                           help=f"no {h}" if default else h)  # fmt: skip
            p.set_defaults(**{f.name: default})
            continue
        p.add_argument(flag, dest=f.name, type=functools.partial(_coerce_flag, tp=tp, flag=flag), default=default,
                       metavar=_type_hint(tp), help=f"{h} (default {default})")  # fmt: skip


def _coerce_flag(text: str, tp: Any, flag: str) -> Any:
    try:
        return coerce(text, tp, flag, "command line")
    except ImgclfError as e:
        raise argparse.ArgumentTypeError(str(e).replace(f"command line: field '{flag}' ", "")) from None


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` from the flags ``config_flags`` made (fields without a flag keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**given)
    except ConfigFieldError as e:
        raise ImgclfError(str(e).replace(f"config field '{e.key}'", "--" + e.key.replace("_", "-"))) from None


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="metrics of saved runs on labelled data (several runs: an ensemble)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (runs/<name>); several = ensemble")
    p.add_argument("--data", required=True, help="labelled data: folder, CSV, .npz or builtin:fashion-mnist:test")
    p.add_argument("--split", default="test", help="split of a multi-split .npz (default test)")
    p.add_argument("--ood-data", help="out-of-distribution images (any folder, CSV, .npz, builtin:digits)")
    p.add_argument("--ood-split", default="test", help="split of a multi-split OOD .npz")
    p.add_argument("--format", choices=["table", "json"], default="table", help="stdout format")
    p.add_argument("--json", dest="json_out", help="also write the metrics JSON to this file")
    config_flags(p, InferConfig, {"batch_size": 128})


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="re-fit a run's temperature, OOD thresholds and drift reference")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="held-out labelled data, not your test set (default: the run's val split)")
    p.add_argument("--split", default="val", help="split of a multi-split .npz (default val)")
    config_flags(p, InferConfig, {"batch_size": 128}, exclude=("tta", "tta_merge"))


def _add_explain(sub: argparse._SubParsersAction) -> None:
    from .eval.explain import METHODS

    p = sub.add_parser("explain", help="class activation map of an image (Grad-CAM and others) as a PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("image", help="image file")
    p.add_argument("--method", choices=METHODS, default="gradcam")
    p.add_argument("--target", help="class to explain (default: the predicted one)")
    p.add_argument("--output", "-o", help="PNG to write (default <image>_<method>.png next to the image)")
    p.add_argument("--device", default="cpu")
    config_flags(p, InferConfig, exclude=("batch_size", "workers", "device", "strict_images", "progress", "tta",
                                          "tta_merge"))  # fmt: skip


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="(re)write runs/<name>/report.html, optionally with OOD detection")
    p.add_argument("run", help="run directory")
    p.add_argument("--ood-data", help="out-of-distribution images to measure detection against the validation split")
    p.add_argument("--ood-split", default="test")
    p.add_argument("--no-cams", action="store_true", help="top-loss gallery without CAM overlays (faster)")
    p.add_argument("--device", default="auto")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k labels for images, folders or a CSV of paths")
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or CSV files with a 'path' column")
    p.add_argument("--top-k", type=_positive_int, default=5)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--ensemble", nargs="+", metavar="RUN", default=[], help="more runs to average with (same classes)")
    p.add_argument("--ood-score", choices=["msp", "max_logit", "energy", "mahalanobis", "knn"],
                   help="score for 'unknown' (default: the run's trust.ood_score)")  # fmt: skip
    p.add_argument("--no-reject", action="store_true", help="report OOD scores but never answer 'unknown'")
    cli_deploy.runtime_opt(p, "auto: the fastest installed (PyTorch for --tta, k-NN indexes and GPUs)")
    config_flags(p, InferConfig)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list timm architectures and the weight sources available offline")
    p.add_argument("pattern", nargs="?", default="", help="substring or glob, e.g. resnet or 'efficientnet_b*'")
    p.add_argument(
        "--pretrained", action="store_true", help="only architectures with hub weights (needs internet to use)"
    )
    p.add_argument("--limit", type=int, default=50, help="show at most this many names (0 = all)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imgclf", description="From a folder of images to a trained, evaluated classifier.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    adders = (_add_train, _add_lr_find, _add_eval, _add_predict, _add_calibrate, _add_explain, _add_report,
              *cli_deploy.ADDERS, _add_knn, _add_models)  # fmt: skip
    for add in adders:
        add(sub)
    return p


def _flat_overrides(args: argparse.Namespace) -> dict[str, Any]:
    ns = vars(args)
    flat = {k: v for k, v in ns.items() if "." in k}
    if ns.get("strict_images"):
        flat["data.strict_images"] = "true"
    if ns.get("no_progress"):
        flat["run.progress"] = "false"
    return flat


def cmd_lr_find(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from . import api
    from .train.lr_find import lr_find, save_lr_find

    ns = vars(args)
    cfg = api.make_config(config_file=ns.get("config"), recipe=ns.get("recipe"), overrides=_flat_overrides(args))
    res = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    stem = f"lr-find-{cfg.model.name.replace('/', '_').replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out) if getattr(args, "out", None) else Path(cfg.run.output) / stem
    js, png = save_lr_find(res, out)
    print(
        f"suggested lr {res['suggested_lr']:.3g} (steepest fall of the loss); minimum loss at {res['min_loss_lr']:.3g}"
    )
    print(f"{res['steps_run']} steps in {res['seconds']}s; plot {png}, data {js}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import api
    from .eval.metrics import metrics_table

    ns = vars(args)
    flat = _flat_overrides(args)
    if ns.get("resume"):
        if ns.get("config") or ns.get("recipe"):
            raise ImgclfError("--resume uses the run's saved config.yaml; drop --config/--recipe")
        out = flat.pop("run.output", "runs")
        cfg = api.resume_config(out, flat.pop("run.name", None), flat)
    else:
        cfg = api.make_config(config_file=ns.get("config"), recipe=ns.get("recipe"), overrides=flat)
    result = api.train(cfg, resume=bool(ns.get("resume")))
    print(metrics_table(result.val_metrics, f"validation (best epoch {result.best_epoch})"))
    if result.test_metrics is not None:
        print()
        print(metrics_table(result.test_metrics, "test"))
    _print_skipped(result.skipped)
    print(f"\nrun: {result.run_dir}  ({result.seconds / 60:.1f} min)")
    return 0


def _print_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        print(f"\nskipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, why in sorted(skipped.items()):
            print(f"  {path}: {why}", file=sys.stderr)


def _run_opts(args: argparse.Namespace) -> dict[str, Any]:
    """The options eval, predict and calibrate share (``InferConfig``), as keyword arguments of ``infer_run``."""
    return config_from_args(InferConfig, args).kwargs()


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from . import api
    from .artifact import read_artifact
    from .eval.metrics import confusion_table, format_table, metrics_table
    from .io import write_json

    if len(args.runs) > 1:
        if args.ood_data:
            raise ImgclfError("--ood-data works with one run at a time")
        rep = api.evaluate_ensemble(args.runs, args.data, split=args.split, **_run_opts(args))
        if args.json_out:
            write_json(args.json_out, rep)
        if args.format == "json":
            print(json.dumps(rep, indent=2))
            return 0
        rows = [[Path(r).name, _p(m["top1"]), f"{m['calibration']['nll']:.4f}", _p(m["calibration"]["ece"])]
                for r, m in rep["members"].items()]  # fmt: skip
        e = rep["ensemble"]
        rows.append([f"ensemble of {len(args.runs)}", _p(e["top1"]), f"{e['calibration']['nll']:.4f}",
                     _p(e["calibration"]["ece"])])  # fmt: skip
        print(format_table(rows, ["model (calibrated)", "top-1", "NLL", "ECE"]))
        g = rep["gain"]
        print(f"\ngain over the best member: top-1 {g['top1_points']:+.2f} points, NLL {-g['nll']:+.4f}")
        return 0
    m = api.evaluate(args.runs[0], args.data, split=args.split, ood_data=args.ood_data, ood_split=args.ood_split,
                     **_run_opts(args))  # fmt: skip
    if "ood" in m:
        m["ood"].pop("_scores", None)
    if args.json_out:
        write_json(args.json_out, m)
    if args.format == "json":
        print(json.dumps(m, indent=2))
        return 0
    names = read_artifact(args.runs[0]).class_names
    print(metrics_table(m, f"{args.runs[0]} on {m['data']}" + (f" (TTA {args.tta})" if args.tta else "")))
    if "calibration" in m:
        c = m["calibration"]
        print(f"\ncalibration (T = {c['temperature']:.3f}): ECE {_p(c['before']['ece'])} -> {_p(c['after']['ece'])}, "
              f"NLL {c['before']['nll']:.4f} -> {c['after']['nll']:.4f}")  # fmt: skip
    if "ood" in m:
        o = m["ood"]
        rows = [[k, f"{v['auroc']:.4f}", f"{v['aupr']:.4f}", _p(v["fpr_at_95_tpr"]),
                 _p(o["rejected"].get(k, {}).get("in")), _p(o["rejected"].get(k, {}).get("ood"))]
                for k, v in o["metrics"].items()]  # fmt: skip
        print(f"\nout-of-distribution: {o['data']} ({o['n']} images)")
        print(format_table(rows, ["score", "AUROC", "AUPR", "FPR@95%TPR", "in rejected", "OOD rejected"]))
    print("\nconfusion matrix (rows: true, columns: predicted class index)")
    print(confusion_table(m, names))
    _print_skipped(m.get("skipped_files", {}))
    return 0


def _p(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def cmd_predict(args: argparse.Namespace) -> int:
    from . import api
    from .io import write_text
    from .predict import render

    preds = api.predict(args.run, args.inputs, top_k=args.top_k, ensemble=args.ensemble, ood_score=args.ood_score,
                        reject=not args.no_reject, runtime=args.runtime, **_run_opts(args))  # fmt: skip
    if not preds.rows:
        _print_skipped(preds.skipped)
        raise ImgclfError(f"no readable image among the {len(preds.skipped)} input(s); see the skipped files above")
    text = render(preds, args.format)
    if args.output:
        write_text(args.output, text if text.endswith("\n") else text + "\n")
        print(f"wrote {len(preds.rows)} prediction(s) to {args.output}", file=sys.stderr)
    else:
        print(text)
    _print_skipped(preds.skipped)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import api

    r = api.calibrate(args.run, args.data, split=args.split, **_run_opts(args))
    print(f"{args.run}: temperature {r['previous_temperature']:.3f} -> {r['temperature']:.3f} on {r['data']} "
          f"({r['n']} images); ECE {_p(r['before']['ece'])} -> {_p(r['after']['ece'])}, "
          f"NLL {r['before']['nll']:.4f} -> {r['after']['nll']:.4f}")  # fmt: skip
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from . import api

    r = api.explain(args.run, args.image, args.output, method=args.method, target=args.target, device=args.device,
                    max_pixels=args.max_pixels, max_aspect=args.max_aspect)  # fmt: skip
    print(f"{r['label']} {100 * r['prob']:.1f}% ({r['method']}): {r['output']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import api

    path = api.report(args.run, ood_data=args.ood_data, ood_split=args.ood_split, cams=not args.no_cams,
                      device=args.device)  # fmt: skip
    print(f"report: {path}")
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import fewshot
    from .eval.metrics import format_table
    from .io import write_json

    run = config_from_args(InferConfig, args)
    common = {"split": args.split, "seed": args.seed, "device": run.device, "batch_size": run.batch_size,
              "num_workers": run.workers, "strict_images": run.strict_images, "progress": run.progress,
              "per_class": args.per_class}  # fmt: skip
    if args.knn_command == "add":
        clf, art = fewshot.add_to_index(args.run, args.support, **common)
        print(f"{args.run}: {clf.embeddings.shape[0]} support images, {len(art.class_names)} classes")
        return 0
    model = {"input_size": args.input_size, "crop_pct": args.crop_pct, "k": args.k, "temperature": args.temperature}
    if args.knn_command == "build":
        clf, art = fewshot.build_index(args.support, args.model, args.weights, mode=args.mode, **model, **common)
        run = fewshot.save_index(Path(args.output) / args.name, clf, art)
        loo = art.metrics.get("support_loo_top1")
        extra = f"; leave-one-out accuracy on the support set {100 * loo:.1f} %" if loo is not None else ""
        print(f"index {run}: {clf.embeddings.shape[0]} images, {len(art.class_names)} classes{extra}")
        print(f"use it like a trained run: imgclf predict {run} IMAGES")
        return 0
    episodes = {"shots": args.shots, "ways": args.ways, "queries": args.queries, "episodes": args.episodes}
    rep = fewshot.few_shot_report(args.data, args.model, args.weights, modes=args.modes, **episodes, **model, **common)
    if args.json_out:
        write_json(args.json_out, rep)
    rows = [[mode, *[f"{100 * r[str(s)]['mean']:.2f} ± {100 * r[str(s)]['ci95']:.2f}" for s in args.shots]]
            for mode, r in rep["results"].items()]  # fmt: skip
    ways = rep["results"][args.modes[0]][str(args.shots[0])]["ways"]
    print(f"{ways}-way episode accuracy % (mean ± 95 % CI over {args.episodes} episodes, {args.queries} queries/class)")
    print(format_table(rows, ["mode", *[f"{s}-shot" for s in args.shots]]))
    print(f"{rep['model']} ({rep['weights']}) on {rep['n_images']} images of {rep['data']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import timm

    from .eval.metrics import format_table
    from .models.factory import list_models
    from .models.weights import PACKAGED_PIP, packaged_available

    names = list_models(args.pattern, pretrained=False)
    hub = {n.split(".")[0] for n in timm.list_models(pretrained=True)}
    if args.pretrained:
        names = [n for n in names if n in hub]
    avail = packaged_available()
    shown = names if args.limit == 0 else names[: args.limit]
    rows = [
        [
            n,
            "installed" if avail.get(n) else ("pip install " + PACKAGED_PIP[n] if n in avail else "-"),
            "yes" if n in hub else "-",
        ]
        for n in shown
    ]
    print(format_table(rows, ["architecture", "packaged weights (offline)", "hub weights (online)"]))
    if len(shown) < len(names):
        print(f"... {len(names) - len(shown)} more (use --limit 0 to list all)")
    print(f"\n{len(names)} architecture(s) match. Weight sources for --weights:")
    print(
        "  packaged  ImageNet weights shipped in PyPI packages: "
        + ", ".join(f"{a} ({'installed' if ok else 'not installed'})" for a, ok in avail.items())
    )
    print("  FILE      a local .safetensors or .pth state dict (loaded with weights_only=True)")
    print("  hub       timm / Hugging Face pretrained download (needs internet)")
    print("  none      random initialisation")
    return 0


COMMANDS = {
    "train": cmd_train,
    "lr-find": cmd_lr_find,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "calibrate": cmd_calibrate,
    "explain": cmd_explain,
    "report": cmd_report,
    **cli_deploy.COMMANDS,
    "knn": cmd_knn,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``imgclf``; returns the exit code (0 ok, 2 usage/input error)."""
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
        _setup_logging(getattr(args, "quiet", False))
        return COMMANDS[args.command](args)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
