"""The whole training job: fit, then measure the best weights on validation and test data and write
the artifact. The trainer knows nothing of artifacts; this module composes the stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact import Artifact, save_artifact
from .config import Config, config_to_dict
from .data.sources import Samples, stratified_split
from .dist import rank_zero_only
from .eval.drift import reference_stats
from .eval.predictions import save_predictions
from .eval.priors import logit_prior
from .eval.trust import alternative_k, calibration_report, fit_trust, task_metrics
from .io import copy_into
from .models.factory import architecture_of, size_kwargs
from .models.heads import FEATURE_STATS_MAX_DIM, head_spec
from .models.inference import Features, Outputs, embedding_dim, infer
from .rundir import VAL_PREDICTIONS
from .train.probe import fit_probe
from .train.trainer import Fitted, eval_loader, fit

log = logging.getLogger("imgclf")


@dataclass
class TrainResult:
    """Where the run is and its numbers."""

    run_dir: Path
    best_epoch: int
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # metrics sections of a derived run (``rebalance``)


def run_training(cfg: Config, resume: bool = False) -> TrainResult:
    """Train, evaluate the best weights, fit calibration and OOD statistics, save the artifact and report."""
    cached_probe = cfg.transfer.strategy == "probe" and cfg.probe.cache
    f = fit_probe(cfg, resume=resume) if cached_probe else fit(cfg, resume=resume)
    return finish(f)


def finish(f: Fitted, train_feats: Features | None = None, data: dict[str, Any] | None = None,
           extra_metrics: dict[str, Any] | None = None) -> TrainResult:  # fmt: skip
    """Everything after the weights are final: validation and test outputs, calibration, OOD statistics (from
    ``train_feats`` when the caller has the training features, else computed), the artifact (``data`` and
    ``extra_metrics`` merged into its sections), predictions and report."""
    cfg = f.cfg
    narrow = embedding_dim(f.model) <= FEATURE_STATS_MAX_DIM  # wider (bilinear) features: logit OOD scores only
    if cfg.trust.ood and not narrow:
        log.info("features of %d values: OOD feature statistics and the drift embedding reference skipped (fitted "
                 "up to %d values); logit OOD scores only", embedding_dim(f.model), FEATURE_STATS_MAX_DIM)  # fmt: skip
    need_feats = cfg.trust.ood and narrow
    val_o = _outputs(f, f.splits.val, "val", True)  # features: OOD thresholds and the drift reference
    test_o = _outputs(f, f.splits.test, "test", need_feats) if f.splits.test is not None else None
    train_o = None
    if need_feats:
        train_o = (_feature_outputs(train_feats, cfg) if train_feats is not None
                   else _outputs(f, _stats_subset(f.splits.train, cfg), "train features", True))  # fmt: skip
    names, task = f.splits.class_names, f.task
    trust, cal = fit_trust(val_o.logits, val_o.labels, val_o.features, train_o and train_o.features,
                           train_o and train_o.labels, len(names), cfg.trust, task, names)  # fmt: skip
    k = alternative_k(val_o.labels) if task.multi_label else None
    val_m = task_metrics(trust, val_o, names, k)
    test_m = task_metrics(trust, test_o, names, k) if test_o is not None else None
    if test_o is not None:
        cal["test"] = calibration_report(trust, test_o.logits, test_o.labels)
    metrics: dict[str, Any] = {
        "val": val_m,
        "best_epoch": f.state.best_epoch,
        "best_weights": f.state.best_which,
        "epochs_run": f.state.epoch,
        "train_seconds": round(f.seconds, 1),
    }
    if test_m is not None:
        metrics["test"] = test_m
    if f.skips.items:
        metrics["skipped_files"] = f.skips.items
    if f.teachers:  # student vs teacher on the same images
        metrics["teachers"] = _teacher_metrics(f, test_o is not None)
    metrics.update(extra_metrics or {})
    counts = f.splits.train.class_counts(usable=True)
    run_data: dict[str, Any] = {"train": f.splits.train.name, "n_train": len(f.splits.train),
                                "n_val": len(f.splits.val), "class_counts": counts.tolist()}  # fmt: skip
    if not task.multi_label:  # the class prior its logits learned: what post-hoc --priors shift from
        run_data["logit_prior"] = logit_prior(task, counts, cfg.data.sampler, f.state.best_epoch, cfg.train.epochs)
    run_data.update(data or {})
    art = Artifact(
        arch=architecture_of(f.model, cfg.model.name),
        class_names=names,
        preprocessing=f.preprocessing,
        config=config_to_dict(cfg),
        metrics=metrics,
        weights_source=f.weights_source,
        task=task.to_json(),
        data=run_data,
        calibration={k: v for k, v in cal.items() if k not in ("reliability", "thresholds")},
        decision=trust.decision.to_json() if trust.decision is not None else None,
        ood=trust.to_json() if cfg.trust.ood else None,
        drift=_drift_reference(trust, val_o, f.splits.val.name, features=narrow),
        model_kwargs=size_kwargs(cfg.model.name, cfg.data.input_size),  # what create_model built it with
        head=head_spec(cfg.model),
    )
    if f.teachers:
        art.extra["distill"] = {**config_to_dict(cfg)["distill"], "teachers": f.teachers}  # identities, not paths
    if getattr(f.model, "artifact_kind", None):  # a model of another kind (fine-tuned from a zero-shot run)
        art.kind, art.extra[f.model.artifact_kind] = f.model.artifact_kind, f.model.artifact_section
    if f.dist.is_main:
        with rank_zero_only():
            _write_run(f, art, trust, val_o, cal)
    extra = dict(extra_metrics or {}) | ({"teachers": metrics["teachers"]} if f.teachers else {})
    return TrainResult(f.run_dir, f.state.best_epoch, val_m, test_m, f.state.history, dict(f.skips.items), f.seconds,
                       extra)  # fmt: skip


def _write_run(f: Fitted, art: Artifact, trust, val_o: Outputs, cal: dict[str, Any]) -> None:
    """Rank 0: the artifact, OOD statistics, validation predictions and report of a finished run."""
    for src in getattr(f.model, "artifact_files", []):  # files of the kind the weights came with (a text tower)
        copy_into(src, f.run_dir)
    save_artifact(f.run_dir, f.model, art)
    trust.save_stats(f.run_dir)
    save_predictions(f.run_dir / VAL_PREDICTIONS, val_o, f.splits.val)
    if f.cfg.trust.report:
        from .eval.report import write_report

        write_report(f.run_dir, model=f.model, art=art, val=(val_o, f.splits.val), reliability=cal["reliability"])


def _teacher_metrics(f: Fitted, test: bool) -> list[dict[str, Any]]:
    """Each teacher's metrics on this run's validation (and test) images with its own preprocessing and calibration,
    its classes in the run's order, beside its identity and parameter count: the student-vs-teacher comparison."""
    from .eval.inference import infer_run
    from .train.distill import class_order

    rows, names = [], f.splits.class_names
    splits = [("val", f.splits.val)] + ([("test", f.splits.test)] if test else [])
    for t in f.teachers:
        row = dict(t)
        for split, samples in splits:
            out, art, _, _ = infer_run(t["run"], lambda _a, _d, s=samples: s, batch_size=f.cfg.data.eval_batch_size
                                       or 2 * f.cfg.data.batch_size, device=str(f.dist.device), progress=False,
                                       desc=f"teacher {split}")  # fmt: skip
            z = out.logits[:, class_order(art.class_names, names, t["run"])]
            m = f.task.metrics(z, out.labels, names)
            row[split] = {k: m[k] for k in ("top1", "macro_f1", "balanced_accuracy", "map", "micro_f1") if k in m}
        rows.append(row)
    return rows


def _drift_reference(trust, val_o: Outputs, name: str, features: bool = True) -> dict[str, Any] | None:
    """Reference statistics of the validation outputs (and their features) for drift monitoring (None with under
    2 images)."""
    if len(val_o.logits) < 2:
        return None
    feats = val_o.features.numpy() if features else None
    return {"data": f"{name} (validation split)", **reference_stats(trust.probs(val_o.logits).numpy(), feats, trust)}


def _stats_keep(labels, cfg: Config):
    """Positions of a stratified subset of at most ``trust.ood_max_train`` of the training ``labels`` for the OOD
    statistics (None: all of them)."""
    n = len(labels)
    return None if n <= cfg.trust.ood_max_train else stratified_split(labels, cfg.trust.ood_max_train / n,
                                                                     cfg.train.seed)[1]  # fmt: skip


def _stats_subset(train: Samples, cfg: Config) -> Samples:
    """The training images of the OOD statistics (``_stats_keep``)."""
    keep = _stats_keep(train.labels, cfg)
    return train if keep is None else train.subset(keep)


def _feature_outputs(feats: Features, cfg: Config) -> Outputs:
    """``Outputs`` (features and labels only) of at most ``trust.ood_max_train`` of the already computed training
    ``feats`` (stratified, as ``_stats_subset``)."""
    keep = _stats_keep(feats.labels.numpy(), cfg)
    keep = torch.arange(len(feats.labels)) if keep is None else torch.as_tensor(keep)
    return Outputs(torch.empty(len(keep), 0), feats.labels[keep], feats.indices[keep], feats.features[keep])


def _outputs(f: Fitted, samples: Samples, desc: str, features: bool) -> Outputs:
    loader = eval_loader(samples, f.preprocessing, f.cfg, f.dist.device.type == "cuda")
    return infer(
        f.model, loader, f.dist.device, skips=f.skips, amp_dtype=None, channels_last=f.cfg.model.channels_last,
        features=features, progress=f.cfg.run.progress and f.dist.is_main, desc=desc,
    )  # fmt: skip


def rebalance_run(run: str | Path, method: str, *, name: str | None = None, output: str | None = None,
                  device: str = "auto", progress: bool = True) -> TrainResult:  # fmt: skip
    """Decoupled rebalancing of a trained single-label run's classifier (``train.rebalance``: ``crt`` or
    ``tau_norm``, Kang et al. 2020) on its frozen features, saved as a new run ``output/name`` (default: next to
    ``run``, named ``<run>-crt`` / ``<run>-tau-norm``) with its calibration, OOD statistics, metrics and report
    fitted again as after training; the source run is not changed.

    Raises:
        ImgclfError: an unknown method, a multi-label run or a k-NN index, a classifier that is not ``nn.Linear``,
            an existing destination, unavailable training data.
    """
    import shutil
    import time

    from .artifact import load_artifact, read_artifact, require
    from .config import build_config
    from .data.loader import SkipLog
    from .data.splits import prepare_data
    from .dist import Dist, resolve_device
    from .errors import ImgclfError
    from .rundir import CONFIG_FILE, METRICS_CSV, METRICS_JSONL
    from .train.loop import State
    from .train.rebalance import METHODS
    from .train.tasks import task_from_json

    if method not in METHODS:
        raise ImgclfError(f"rebalance: --method must be one of {', '.join(METHODS)} (got {method!r})")
    t0, src = time.perf_counter(), Path(run)
    art = read_artifact(src)
    require(art, "rebalance")
    if art.multi_label:
        raise ImgclfError(f"{src}: cRT and tau-normalisation rebalance single-label classifiers; a multi-label run "
                          "is rebalanced by --train.pos_weight and its tuned thresholds")  # fmt: skip
    cfg = build_config([art.config], ["the run's config"])
    cfg.run.output, cfg.run.progress = output or str(src.parent), progress
    cfg.run.name = name or f"{src.name}-{method.replace('_', '-')}"
    dest = Path(cfg.run.output) / cfg.run.name
    if dest.exists():
        raise ImgclfError(f"rebalance: {dest} exists; pass another --name (nothing is overwritten)")
    dist = Dist(resolve_device(device))
    model, art = load_artifact(src, dist.device)
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ImgclfError(f"{src}: rebalancing needs a Linear classifier; {art.arch} has {type(head).__name__}")
    try:
        splits = prepare_data(cfg)
    except ImgclfError as e:
        raise ImgclfError(f"{src}: its training images are unavailable ({e})") from None
    if len(splits.train) != art.data.get("n_train", len(splits.train)):
        raise ImgclfError(f"{src}: its training data changed ({len(splits.train)} images where training had "
                          f"{art.data['n_train']}); rebalancing on other data would mix two data sets")  # fmt: skip
    skips, pre, k = SkipLog(strict=cfg.data.strict_images), art.preprocessing, art.num_classes
    tr, info = _rebalance_head(model, art, src, cfg, splits, dist, skips, method)
    dest.mkdir(parents=True)
    for fname in (CONFIG_FILE, METRICS_JSONL, METRICS_CSV):  # the representation's training history
        if (src / fname).is_file():
            shutil.copy2(src / fname, dest / fname)
    m = art.metrics
    state = State(epoch=m.get("epochs_run", 0), best_epoch=m.get("best_epoch", -1),
                  best_which=m.get("best_weights", "model"))  # fmt: skip
    task = task_from_json(art.task)
    f = Fitted(cfg, dest, model, state, splits, task, pre, art.weights_source, dist, skips, time.perf_counter() - t0)
    before = {key: art.metrics["val"].get(key) for key in ("top1", "balanced_accuracy", "macro_f1")}
    record = {"method": method, "from": str(src), "val_before": before, **{key: v for key, v in info.items()}}
    uniform = [round(1.0 / k, 8)] * k
    data = {"rebalance": method, "logit_prior": uniform if method == "crt" else None}
    return finish(f, tr, data=data, extra_metrics={"rebalance": record})


def _rebalance_head(model: Any, art: Artifact, src: Path, cfg: Config, splits: Any, dist: Any, skips: Any,
                    method: str) -> tuple[Features, dict[str, Any]]:  # fmt: skip
    """Refit (``crt``) or rescale (``tau_norm``) ``model``'s classifier in place from its frozen features of the
    training and validation splits (cached under the run's weights' content hash); returns the training
    features (reused for the OOD statistics) and the method's record."""
    from .artifact import package_versions
    from .rundir import WEIGHTS_FILE
    from .train.probe import _file_sha, cached_features
    from .train.rebalance import crt_head, tau_norm_head

    head, pre = model.get_classifier(), art.preprocessing
    versions = {k: v for k, v in package_versions().items() if k in ("torch", "timm", "imgclf")}
    base = {"arch": art.arch, "weights": "sha256:" + _file_sha(src / WEIGHTS_FILE), "preprocessing": pre.to_json(),
            "versions": versions}  # fmt: skip
    tr = cached_features(model, splits.train, pre.eval(), {"name": "train"}, base, cfg, dist, skips)
    va = cached_features(model, splits.val, pre.eval(), {"name": "val"}, base, cfg, dist, skips)
    if method == "crt":
        w, b, info = crt_head(tr.features, tr.labels, va.features, va.labels, art.num_classes, cfg.probe.wd_grid,
                              cfg.probe.max_iter)  # fmt: skip
    else:
        w, b, info = tau_norm_head(head.weight.detach().float().cpu(), va.features, va.labels)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight))
        head.bias.copy_(b.to(head.bias))
    return tr, info
