"""``imgclf audit DATA``: a data-quality audit before training (files, duplicates, label conflicts, leaks across
splits, suspected label errors, outliers, class balance), a table on stdout, optionally JSON, an HTML page and a
cleaned training list (``--fix``). Flags generated from ``config.AuditConfig`` (checks and fixes),
``config.EmbedConfig`` (backbone, preprocessing) and ``config.InferConfig`` (loader, device, image limits)."""

from __future__ import annotations

import argparse

from ..config import AuditConfig, EmbedConfig, InferConfig
from . import output
from .flags import config_flags, config_from_args


def add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit labelled data: broken files, duplicates, leaks, label errors, balance",
                       description="Audit labelled data before training. Never changes the data's files.")  # fmt: skip
    p.add_argument("data", help="training data: folder, CSV, .npz or builtin:NAME")
    p.add_argument("--val-data", help="validation data (checked for leaks and duplicates)")
    p.add_argument("--test-data", help="test data (checked for leaks and duplicates)")
    p.add_argument("--json", dest="json_out", help="write the full report as JSON here")
    p.add_argument("--html", dest="html_out", help="write an HTML page with thumbnails per finding here")
    p.add_argument("--fix", help="write a cleaned training list here (.csv; .npz for in-memory arrays)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary")
    config_flags(p, AuditConfig)
    config_flags(p, EmbedConfig, exclude=("per_class", "seed"))
    config_flags(p, InferConfig, {"batch_size": 128}, exclude=("tta", "tta_merge", "strict_images"))


def cmd_audit(args: argparse.Namespace) -> int:
    from .. import api

    cfg = config_from_args(AuditConfig, args)
    emb, infer = config_from_args(EmbedConfig, args), config_from_args(InferConfig, args)
    doc = api.audit(args.data, val_data=args.val_data, test_data=args.test_data, json_path=args.json_out,
                    html_path=args.html_out, fix=args.fix, cfg=cfg, embed=emb, infer=infer)  # fmt: skip
    output.print_audit(doc, brief=args.quiet)
    return 0


VERBS = {"audit": (add_audit, cmd_audit)}
