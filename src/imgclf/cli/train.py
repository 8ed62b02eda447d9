"""``imgclf train``, ``lr-find``, ``rebalance``, ``pretrain`` and ``retrain``: the verbs that (re)train a model."""

from __future__ import annotations

import argparse

from ..errors import ImgclfError
from . import output
from .flags import config_parser, flat_overrides, positive_int


def add_train(sub: argparse._SubParsersAction) -> None:
    p = config_parser(
        sub, "train", "fine-tune a model (no arguments: the embedded Fashion-MNIST job)",
        "Train a classifier. Precedence: defaults < --recipe < --config < flags.",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the run named by --name (or the newest) from its last checkpoint")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from .. import api

    ns = vars(args)
    flat = flat_overrides(args)
    if ns.get("resume"):
        if ns.get("config") or ns.get("recipe"):
            raise ImgclfError("--resume uses the run's saved config.yaml; drop --config/--recipe")
        out = flat.pop("run.output", "runs")
        cfg = api.resume_config(out, flat.pop("run.name", None), flat)
    else:
        cfg = api.make_config(config_file=ns.get("config"), recipe=ns.get("recipe"), overrides=flat)
    output.print_train(api.train(cfg, resume=bool(ns.get("resume"))))
    return 0


def add_lr_find(sub: argparse._SubParsersAction) -> None:
    p = config_parser(
        sub, "lr-find", "LR range test: plot loss against learning rate and suggest a value",
        "Runs --steps updates with the learning rate rising exponentially, on the same data, model and strategy"
        " as `imgclf train` with the same flags; writes lr_find.png and lr_find.json.",
    )  # fmt: skip
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--out", help="output directory (default runs/lr-find-<model>-<time>)")


def cmd_lr_find(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .. import api
    from ..train.lr_find import lr_find, save_lr_find

    ns = vars(args)
    cfg = api.make_config(config_file=ns.get("config"), recipe=ns.get("recipe"), overrides=flat_overrides(args))
    res = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    stem = f"lr-find-{cfg.model.name.replace('/', '_').replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out) if getattr(args, "out", None) else Path(cfg.run.output) / stem
    js, png = save_lr_find(res, out)
    output.print_lr_find(res, js, png)
    return 0


def add_rebalance(sub: argparse._SubParsersAction) -> None:
    from ..train.rebalance import METHODS

    p = sub.add_parser(
        "rebalance", help="long-tailed data: retrain (cRT) or tau-normalise a run's classifier on frozen features",
        description="Decoupled rebalancing (Kang et al. 2020) of a trained single-label run, saved as a new run: "
        "crt refits the head with the class-balanced objective on the frozen features, tau_norm rescales each "
        "class's weights by its norm. Calibration, OOD statistics, metrics and report are fitted again.",
    )  # fmt: skip
    p.add_argument("run", help="run directory (runs/<name>) trained on the long-tailed data")
    p.add_argument("--method", choices=METHODS, default="crt")
    p.add_argument("--name", help="name of the new run (default <run>-crt / <run>-tau-norm)")
    p.add_argument("--output", help="directory of the new run (default: next to RUN)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_rebalance(args: argparse.Namespace) -> int:
    from .. import api

    res = api.rebalance(args.run, args.method, name=args.name, output=args.output, device=args.device,
                        progress=not args.no_progress)  # fmt: skip
    output.print_rebalance(res)
    return 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    from ..config import SSL_METHODS

    p = config_parser(
        sub, "pretrain", "self-supervised pretraining of a backbone on unlabelled images (SimCLR, BYOL, DINO, MAE)",
        "Pretrain any timm backbone without labels (labels in DATA are ignored); the run is a backbone that "
        "`imgclf train DATA --weights RUN` (probe, finetune) and `imgclf knn build --weights RUN` start from. "
        "Precedence: defaults < --recipe (default: pretrain) < --config < flags.",
    )  # fmt: skip
    p.add_argument("images", nargs="?", help="images: a folder (recursive), CSV, .npz or builtin:NAME")
    p.add_argument("--method", dest="ssl.method", choices=SSL_METHODS, help="the method (= --ssl.method)")
    p.add_argument("--knn-data", dest="ssl.knn_data", metavar="DATA",
                   help="labelled images for the per-epoch k-NN monitor (= --ssl.knn_data)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run named by --name from its last checkpoint")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .. import api

    ns = vars(args)
    flat = flat_overrides(args)
    images = ns.get("images") or flat.pop("data.path", None)
    if ns.get("resume"):
        if ns.get("config") or ns.get("recipe"):
            raise ImgclfError("--resume uses the run's saved config.yaml; drop --config/--recipe")
        cfg = api.resume_config(flat.pop("run.output", "runs"), flat.pop("run.name", None), flat)
    else:
        if not images:
            raise ImgclfError("imgclf pretrain: give the images (a folder, CSV, .npz or builtin:NAME)")
        cfg = api.pretrain_config(images, recipe=ns.get("recipe"), config_file=ns.get("config"), overrides=flat)
    output.print_pretrain(api.pretrain(cfg, resume=bool(ns.get("resume"))))
    return 0


def add_retrain(sub: argparse._SubParsersAction) -> None:
    p = config_parser(
        sub, "retrain", "fine-tune a run on new labelled data (+ replay of its old data); promote it only if better",
        "Fine-tune RUN (the champion) from its weights on the labelled images of --new-data (a folder with class "
        "sub-folders or with labels.csv, e.g. a labelled `imgclf serve --capture-dir` folder; a .csv; an .npz) mixed "
        "with --replay old training images per new one, with the run's config, the `retrain` recipe (unless "
        "--recipe/--config) and any training flag (--epochs, --lr, --train.*). Champion and challenger are scored "
        "on a fixed held-out set of each distribution: --holdout of the new data (or --new-test) and the run's test "
        "set (else its validation split, or --old-test). The challenger is promoted when it beats the champion on "
        "the new set by more than --min-gain points and loses at most --margin points on the old: into a model "
        "repository REPO/NAME/<version> (--promote-to; default when RUN is such a version) as the next version, "
        "renamed in one step; else it stays in --out. Exit codes: 0 promoted, 3 ran but not promoted (figures "
        "printed and kept; a rejected challenger is kept hidden as .rejected-<time>), 2 bad input.",
    )  # fmt: skip
    p.add_argument("run_champion", metavar="RUN", help="the trained run to improve (the champion)")
    p.add_argument("--new-data", required=True, metavar="DIR", help="new labelled images (in RUN's classes)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="stratified fraction of --new-data held out to score both models [0.2]")  # fmt: skip
    p.add_argument("--new-test", metavar="PATH", help="labelled new-distribution test data instead of --holdout")
    p.add_argument("--old-test", metavar="PATH", help="old-distribution test data instead of RUN's test/val split")
    p.add_argument("--replay", type=float, default=1.0,
                   help="old training images replayed per new training image (0: none) [1.0]")  # fmt: skip
    p.add_argument("--margin", type=float, default=1.0,
                   help="most points the challenger may lose on the old held-out set [1.0]")  # fmt: skip
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="points the challenger must gain on the new held-out set, more than this [0.0]")  # fmt: skip
    p.add_argument("--promote-to", metavar="DIR", help="model repository REPO/NAME holding versions 1/, 2/, ...")
    p.add_argument("--out", metavar="DIR", help="without a repository: the challenger's run folder [RUN-retrain]")
    p.add_argument("--force", action="store_true", default=False, help="promote even when not better (recorded)")
    p.add_argument("--json", dest="json_out", help="also write the figures (JSON) to this file")


def cmd_retrain(args: argparse.Namespace) -> int:
    from .. import api
    from ..retrain import RetrainRefused

    ns = vars(args)
    cfg = api.retrain_config(args.run_champion, recipe=ns.get("recipe"), config_file=ns.get("config"),
                             overrides=flat_overrides(args))  # fmt: skip
    opts = {k: ns.get(k) for k in ("new_test", "old_test", "promote_to", "out")}
    output.gated(lambda: api.retrain(cfg, args.run_champion, args.new_data, holdout=args.holdout, replay=args.replay,
                                     margin=args.margin, min_gain=args.min_gain, force=args.force, **opts),
                 output.print_retrain, RetrainRefused, ns.get("json_out"))  # fmt: skip
    return 0


VERBS = {"train": (add_train, cmd_train), "lr-find": (add_lr_find, cmd_lr_find),
         "rebalance": (add_rebalance, cmd_rebalance), "pretrain": (add_pretrain, cmd_pretrain),
         "retrain": (add_retrain, cmd_retrain)}  # fmt: skip
