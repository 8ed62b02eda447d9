"""The public Python API: the same verbs as the CLI, taking configs and keyword arguments.

Example:
    >>> import imgclf
    >>> cfg = imgclf.make_config(data="my_images/", overrides={"train.epochs": 3})  # doctest: +SKIP
    >>> result = imgclf.train(cfg)                                                  # doctest: +SKIP
    >>> imgclf.predict(result.run_dir, ["photo.jpg"]).rows[0]["top"][0]            # doctest: +SKIP
    {'label': 'cat', 'prob': 0.97}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from .artifact import Artifact, load_artifact
from .config import (
    AuditConfig,
    Config,
    ConvertConfig,
    EmbedConfig,
    InferConfig,
    build_config,
    config_to_dict,
    load_yaml,
    recipe_path,
)
from .errors import ImgclfError
from .eval.evaluate import evaluate_run
from .io import write_json
from .pipeline import TrainResult, run_training
from .predict import Predictions, predict_run
from .rundir import LAST_CKPT, RunDir

#: The recipe applied when no training data is given: the embedded Fashion-MNIST job.
DEFAULT_RECIPE = "default"

#: Settings that may differ when resuming; anything else would break the exact continuation. ``data.batch_size`` is
#: the per-process batch: resuming on another number of processes keeps the global batch by changing it (the
#: schedule is re-positioned when the updates per epoch differ).
RESUME_MAY_CHANGE = frozenset(
    {"run.output", "run.name", "run.progress", "train.device", "data.num_workers", "data.eval_batch_size",
     "data.strict_images", "data.batch_size", "train.dist_timeout", "train.sync_bn"}
)  # fmt: skip


def nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}``; keys must be ``section.field``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        sec, dot, name = key.partition(".")
        if not dot or not name:
            raise ImgclfError(f"override '{key}' must be written section.field (e.g. optim.lr)")
        out.setdefault(sec, {})[name] = value
    return out


def make_config(
    data: str | None = None,
    *,
    config_file: str | Path | None = None,
    recipe: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build a training ``Config``: defaults < recipe < config file < overrides (dotted keys).

    With no data anywhere, the embedded Fashion-MNIST subset and the ``default`` recipe are used.
    """
    flat = dict(overrides or {})
    if data is not None:
        flat["data.path"] = str(data)
    layers: list[dict] = []
    sources: list[str] = []
    user = load_yaml(config_file) if config_file else {}
    user_data = (user.get("data") or {}).get("path") if isinstance(user.get("data"), dict) else None
    if recipe is None and not flat.get("data.path") and not user_data:
        recipe = DEFAULT_RECIPE
    if recipe:
        layers.append(load_yaml(recipe_path(recipe)))
        sources.append(f"recipe '{recipe}'")
    if config_file:
        layers.append(user)
        sources.append(str(config_file))
    layers.append(nest(flat))
    sources.append("command line")
    return build_config(layers, sources)


def resume_config(output: str | Path, name: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """The saved config of a run to resume (by name, else the newest with a checkpoint), plus overrides."""
    out = Path(output)
    if name:
        run = out / name
    else:
        cands = sorted(out.glob(f"*/{LAST_CKPT}"), key=lambda p: p.stat().st_mtime)
        if not cands:
            raise ImgclfError(f"--resume: no run with a checkpoint under {out}/ (pass --name of the run)")
        run = cands[-1].parents[1]
    saved = RunDir(run).config
    if not saved.is_file():
        raise ImgclfError(f"--resume: {run} has no config.yaml; is it an imgclf run?")
    flat = dict(overrides or {})
    flat.update({"run.output": str(out), "run.name": run.name})
    saved_cfg = load_yaml(saved)
    cfg = build_config([saved_cfg, nest(flat)], [str(saved), "command line"])
    before, after = _flat(build_config([saved_cfg], [str(saved)])), _flat(cfg)
    changed = [k for k in flat if k not in RESUME_MAY_CHANGE and before.get(k) != after.get(k)]
    if changed:
        k = changed[0]
        raise ImgclfError(
            f"--resume continues {run} exactly, so '{k}' cannot change ({before[k]!r} -> {after[k]!r}); "
            f"start a new run instead, e.g. with --weights {run}/model.safetensors"
        )
    return cfg


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{sec}.{k}": v for sec, body in config_to_dict(cfg).items() for k, v in body.items()}


def train(cfg: Config | None = None, *, resume: bool = False) -> TrainResult:
    """Train per ``cfg`` (default: the embedded job) and return the run directory and metrics."""
    return run_training(cfg or make_config(), resume=resume)


def pretrain_config(
    data: str | Path,
    *,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The config of ``imgclf pretrain``: defaults < recipe (``pretrain`` unless a config file is given) < config
    file < overrides, with ``data`` the images (labels ignored)."""
    if recipe is None and config_file is None:
        recipe = "pretrain"
    return make_config(data, config_file=config_file, recipe=recipe, overrides=overrides)


def pretrain(cfg: Config, *, resume: bool = False):
    """Self-supervised pretraining (``imgclf pretrain``; ``imgclf.train.pretrain``): SimCLR, BYOL, DINO or MAE on
    ``cfg.data.path``; returns a ``PretrainResult`` whose run directory ``--weights RUN`` accepts."""
    from .train.pretrain import pretrain as run_pretrain

    return run_pretrain(cfg, resume=resume)


def compress_config(
    teacher: str | Path,
    student: str,
    *,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The training config of a student ``student`` (a timm or imgclf architecture) distilled from the run
    ``teacher`` on the teacher's data; see ``imgclf.compress.student_overrides`` for the precedence."""
    from .compress import student_overrides

    recipe, flat = student_overrides(teacher, student, recipe=recipe, config_file=config_file, overrides=overrides)
    return make_config(config_file=config_file, recipe=recipe, overrides=flat)


def compress(cfg: Config, teacher: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Distil, calibrate, quantize to int8 and benchmark against the teacher with an accuracy budget
    (``max_drop`` points, ``force``, ``int8``, ``runtime``, ``batch_sizes``); see ``imgclf.compress.compress``."""
    from .compress import compress as compress_run

    return compress_run(cfg, teacher, **kwargs)


def retrain_config(
    run: str | Path,
    *,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The training config of the challenger that ``retrain`` fine-tunes from the run ``run``: its own config < recipe
    (default ``retrain``: a short, gentle fine-tune) < config file < overrides, starting from its weights; see
    ``imgclf.retrain.challenger_layers``."""
    from .retrain import challenger_layers

    layers, sources, flat = challenger_layers(run, recipe=recipe, config_file=config_file, overrides=overrides)
    return build_config([*layers, nest(flat)], [*sources, "command line"])


def retrain(cfg: Config, run: str | Path, new_data: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Fine-tune ``run`` on ``new_data`` mixed with replayed old images, score champion and challenger on a fixed
    held-out set of each distribution, and promote the challenger only when it is better (``holdout``, ``new_test``,
    ``old_test``, ``replay``, ``margin``, ``min_gain``, ``promote_to``, ``out``, ``force``); returns the
    ``retrain.json`` document. Raises ``imgclf.retrain.RetrainRefused`` when it is not promoted; see
    ``imgclf.retrain.retrain``.

    Example:
        >>> cfg = retrain_config("models/fmnist/1", overrides={"train.epochs": 2})  # doctest: +SKIP
        >>> retrain(cfg, "models/fmnist/1", "capture/")["version"]                  # doctest: +SKIP
        2
    """
    from .retrain import retrain as run_retrain

    return run_retrain(cfg, run, new_data, **kwargs)


def rebalance(run_dir: str | Path, method: str = "crt", **kwargs: Any) -> TrainResult:
    """cRT or tau-normalisation of a trained run's classifier, saved as a new run; see
    ``imgclf.pipeline.rebalance_run``."""
    from .pipeline import rebalance_run

    return rebalance_run(run_dir, method, **kwargs)


def evaluate(run_dir: str | Path, data: str, **kwargs: Any) -> dict[str, Any]:
    """Metrics of a saved run on labelled ``data``; see ``imgclf.eval.evaluate.evaluate_run``."""
    return evaluate_run(run_dir, data, **kwargs)


def evaluate_shift(run_dir: str | Path, data: str, **kwargs: Any) -> dict[str, Any]:
    """Accuracy, ECE and OOD rejection of a saved run under common corruptions at severities 1-5, written to the
    run's ``robustness.json``; see ``imgclf.eval.shift.evaluate_shift``."""
    from .eval.shift import evaluate_shift as _shift
    from .eval.shift import save_shift

    doc = _shift(run_dir, data, **kwargs)
    save_shift(run_dir, doc)
    return doc


def predict(run_dir: str | Path, inputs: list[str], **kwargs: Any) -> Predictions:
    """Top-k predictions for image files, folders and CSVs; see ``imgclf.predict.predict_run``."""
    return predict_run(run_dir, inputs, **kwargs)


def evaluate_ensemble(run_dirs: list[str | Path], data: str, **kwargs: Any) -> dict[str, Any]:
    """Averaged calibrated probabilities of several runs vs each member; see ``evaluate_ensemble``."""
    from .eval.evaluate import evaluate_ensemble as _ens

    return _ens(run_dirs, data, **kwargs)


def calibrate(run_dir: str | Path, data: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Re-fit a run's temperature, OOD thresholds and drift reference on held-out labelled data (default: its
    own validation split); see ``calibrate_run``."""
    from .eval.evaluate import calibrate_run

    return calibrate_run(run_dir, data, **kwargs)


def explain(run_dir: str | Path, image: str | Path, output: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Write a class-activation-map PNG for one image; see ``imgclf.eval.explain.explain_image``."""
    from .eval.explain import explain_image

    return explain_image(run_dir, image, output, **kwargs)


def report(run_dir: str | Path, **kwargs: Any) -> Path:
    """(Re)write ``report.html`` of a run; see ``imgclf.eval.report.report_run``."""
    from .eval.report import report_run

    return report_run(run_dir, **kwargs)


def audit(
    data: str | Path,
    *,
    val_data: str | None = None,
    test_data: str | None = None,
    json_path: str | Path | None = None,
    html_path: str | Path | None = None,
    fix: str | Path | None = None,
    cfg: AuditConfig | None = None,
    embed: EmbedConfig | None = None,
    infer: InferConfig | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Audit labelled data (files, duplicates, label conflicts, leaks, label errors, outliers, balance); see
    ``imgclf.eval.audit``. Optionally write the report JSON, an HTML page and a cleaned training list (``fix``:
    ``imgclf.eval.audit_fix``). ``fields``: any field of the three configs by name (``audit(d, cosine=0.99,
    workers=0)``). Returns the report (with ``fix``: what was written, under ``"fix"``).

    Raises:
        ImgclfError: unreadable data, a missing optional dependency (``pip install 'imgclf[audit]'``), or a
        ``fix`` path that is an audited file.

    Example:
        >>> doc = audit("my_images/", test_data="my_test/", html_path="audit.html")  # doctest: +SKIP
        >>> doc["summary"]["leaks_exact"]  # doctest: +SKIP
        0
    """
    from .config import split_fields
    from .eval.audit import run_audit

    cfg, embed, infer = split_fields(fields, cfg or AuditConfig(), embed or EmbedConfig(), infer or InferConfig())
    result = run_audit(str(data), val_data, test_data, cfg, embed, infer)
    if fix is not None:
        from .eval.audit_fix import write_fix

        result.doc["fix"] = write_fix(result, fix)
    if html_path is not None:
        from .eval.audit_report import write_audit_html

        write_audit_html(result, html_path)
    if json_path is not None:
        write_json(json_path, result.doc)
    return result.doc


def convert(data: str | Path, output: str | Path, cfg: ConvertConfig | None = None, **fields: Any) -> dict[str, Any]:
    """Write ``data`` (any source imgclf reads) as WebDataset shards with ``classes.txt`` and ``dataset.json`` in the
    new folder ``output`` (``imgclf.data.convert``). ``fields``: fields of ``ConvertConfig`` by name. Returns the
    summary (``output``, ``shards``, ``samples``, ``classes``, ``bytes``, ``skipped``, ``seconds``).

    Raises:
        ImgclfError: ``output`` exists (pass ``overwrite=True``), or the data cannot be read.

    Example:
        >>> convert("photos/", "photos-wds/", shard_size=5000)["shards"]  # doctest: +SKIP
        3
    """
    import dataclasses

    from .data.convert import convert_to_wds

    return convert_to_wds(str(data), output, dataclasses.replace(cfg or ConvertConfig(), **fields))


def load(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Artifact]:
    """The trained model (eval mode) and its artifact metadata."""
    return load_artifact(run_dir, device)


def zeroshot(
    model: str, pretrained: str, classes: list[str], out: str | Path, **kwargs: Any
) -> tuple[nn.Module, Artifact]:
    """Build and save a zero-shot open_clip classifier from class names (no images, no training); see
    ``imgclf.zeroshot.build_zeroshot`` (``templates``, ``device``, ``overwrite``).

    Example:
        >>> model, art = zeroshot("ViT-B-32", "laion2b_s34b_b79k", ["cat", "dog"], "runs/zs")  # doctest: +SKIP
    """
    from .zeroshot import build_zeroshot

    return build_zeroshot(model, pretrained, classes, out, **kwargs)


def zeroshot_edit(run_dir: str | Path, **kwargs: Any) -> tuple[nn.Module, Artifact]:
    """Add, rename or remove classes of a zero-shot run offline (``add``, ``rename``, ``remove``); see
    ``imgclf.zeroshot.edit_classes``."""
    from .zeroshot import edit_classes

    return edit_classes(run_dir, **kwargs)


def zeroshot_support(run_dir: str | Path, support: str | Path, **kwargs: Any) -> tuple[nn.Module, Artifact]:
    """Add a training-free Tip-Adapter cache of labelled support images to a zero-shot run (``alpha``, ``beta``,
    ``shots``); see ``imgclf.zeroshot.add_support``."""
    from .zeroshot import add_support

    return add_support(run_dir, support, **kwargs)


def wise_ft(fine_tuned: str | Path, alpha: float = 0.5, **kwargs: Any) -> tuple[nn.Module, Artifact]:
    """WiSE-FT: interpolate a run fine-tuned from a zero-shot run with that zero-shot run, in weight space, saved
    as a new run (``zeroshot``, ``out``, ``device``); see ``imgclf.zeroshot.wise_ft``."""
    from .zeroshot import wise_ft as run_wise_ft

    return run_wise_ft(fine_tuned, alpha, **kwargs)
