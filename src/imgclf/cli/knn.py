"""``imgclf knn build | add | episodes``: few-shot classification without training. Flags generated from
``config.EmbedConfig`` (backbone, images, preprocessing), ``config.KNNConfig`` (the rule),
``config.EpisodeConfig`` and ``config.InferConfig`` (loader, device, image limits)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import EmbedConfig, EpisodeConfig, InferConfig, KNNConfig
from . import output
from .flags import Parser, config_flags, config_from_args

#: what ``add`` may set: the index keeps its own backbone and preprocessing
_ADD_FIELDS = ("split", "per_class", "seed")


def add_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="few-shot classification without training: build, extend and test k-NN indexes")
    verbs = p.add_subparsers(dest="knn_command", parser_class=Parser, required=True)
    run_flags = {"exclude": ("tta", "tta_merge")}

    b = verbs.add_parser("build", help="embed a labelled support set into an index run directory")
    b.add_argument("support", help="support set: folder (one sub-folder per class), CSV, .npz or builtin:NAME")
    b.add_argument("--name", required=True, help="run directory name under --output")
    b.add_argument("--output", default="runs", help="directory for run directories (default runs)")
    config_flags(b, EmbedConfig)
    config_flags(b, KNNConfig)
    config_flags(b, InferConfig, **run_flags)

    a = verbs.add_parser("add", help="add images (and new classes) to an index, no training")
    a.add_argument("run", help="index run directory")
    a.add_argument("support", help="more labelled images: folder, CSV, .npz or builtin:NAME")
    config_flags(a, EmbedConfig, exclude=tuple(f.name for f in dataclasses.fields(EmbedConfig)
                                               if f.name not in _ADD_FIELDS))  # fmt: skip
    config_flags(a, InferConfig, **run_flags)

    e = verbs.add_parser("episodes", help="N-way K-shot episode accuracy (mean and 95 %% CI)")
    e.add_argument("data", help="labelled pool: folder, CSV, .npz or builtin:NAME")
    e.add_argument("--json", dest="json_out", help="also write the report JSON here")
    config_flags(e, EpisodeConfig)
    config_flags(e, EmbedConfig)
    config_flags(e, KNNConfig, exclude=("mode",))
    config_flags(e, InferConfig, **run_flags)


def cmd_knn(args: argparse.Namespace) -> int:
    from .. import fewshot
    from ..io import write_json

    emb, run = config_from_args(EmbedConfig, args), config_from_args(InferConfig, args)
    if args.knn_command == "add":
        clf, art = fewshot.add_to_index(args.run, args.support, emb, run)
        output.print_index(Path(args.run), clf.embeddings.shape[0], art, built=False)
        return 0
    rule = config_from_args(KNNConfig, args)
    if args.knn_command == "build":
        clf, art = fewshot.build_index(args.support, emb, run, **dataclasses.asdict(rule))
        out = fewshot.save_index(Path(args.output) / args.name, clf, art)
        output.print_index(out, clf.embeddings.shape[0], art, built=True)
        return 0
    ep = config_from_args(EpisodeConfig, args)
    rep = fewshot.few_shot_report(args.data, emb, run, k=rule.k, temperature=rule.temperature,
                                  **dataclasses.asdict(ep))  # fmt: skip
    if args.json_out:
        write_json(args.json_out, rep)
    output.print_episodes(rep, ep.shots, ep.episodes, ep.queries)
    return 0


VERBS = {"knn": (add_knn, cmd_knn)}
