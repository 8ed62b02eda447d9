"""Act on drift: ``imgclf retrain RUN --new-data DIR`` fine-tunes the run (the champion) on new labelled data mixed
with a replay sample of its old training data, scores champion and challenger on a fixed held-out set of each
distribution, and promotes the challenger only when it is better on the new data and at most a margin worse on the
old.

The data (``plan_data``): the new data (any labelled source; its primary case is a capture folder of ``imgclf serve
--capture-dir`` whose ``labels.csv`` a person labelled: rows without a label yet are left out) is read in the
champion's class order; a label outside its classes is an error. Its held-out part is a stratified ``holdout``
fraction (seeded by ``train.seed``), or ``new_test``. The old held-out set is the champion's test set (as the run
was evaluated), else its validation split rebuilt exactly (same seed and ``val_split``), or ``old_test``. The
challenger trains on the rest of the new data plus ``replay`` old training images per new one (a stratified, seeded
sample of the champion's training split: never its validation or test images, nor ``old_test``'s files).

The mix is written as CSVs in the challenger's ``retrain/`` folder (``write_plan``): ``imgclf.data`` has no
concatenation of sources, and a run must name its data by a path (``config.yaml``; resume, calibrate, report and
the next retrain rebuild the splits from it), so the mix is a ``labels.csv``-style file: files by absolute path,
in-memory images (an .npz, a data set's rows) written losslessly as PNG beside it (relative paths, which survive the
rename into a version). ``test.csv`` (old + new held-out) becomes the challenger's test set, so the next retrain
from it holds out both distributions.

The challenger is the champion's config, the ``retrain`` recipe (a short, gentle fine-tune) and any overrides, with
``model.weights`` = the champion run: it goes through ``pipeline.run_training`` like any run (calibration, OOD
thresholds, drift reference). Both models are scored by ``eval.evaluate.evaluate_run`` on both held-out sets (top-1;
mAP for multi-label runs). ``decide``: promote iff the challenger beats the champion on the new set by more than
``min_gain`` points and loses at most ``margin`` points on the old one.

Where it goes (``placement``): with a model repository (``promote_to``, laid out ``REPO/NAME/<version>/``, the
default when RUN is such a version) the challenger trains in a hidden ``.retrain-<time>`` folder and is renamed in
one step to ``<highest version + 1>`` when promoted, else to ``.rejected-<time>`` (a watcher ignores hidden
folders, so it never sees a half-written version). Without one it trains in ``out`` (default ``RUN-retrain``).
``retrain.json`` and the artifact's ``retrain`` section hold the decision and the four scores; a refusal raises
``RetrainRefused`` (exit code 3 on the command line) after everything is written, unless ``force``.

Example:
    >>> cfg = imgclf.retrain_config("models/fmnist/1")                       # doctest: +SKIP
    >>> doc = imgclf.retrain(cfg, "models/fmnist/1", "capture/")              # doctest: +SKIP
    >>> doc["decision"]["promoted"], doc["run"]                                # doctest: +SKIP
    (True, 'models/fmnist/2')
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Artifact, read_artifact, require, update_artifact
from .config import Config, load_yaml, recipe_path
from .data.sources import LABELS_FILE, LabelFormat, Samples, nfc, open_source, stratified_split
from .errors import ImgclfError
from .io import write_json, write_text
from .rundir import CONFIG_FILE, META_FILE, REPORT_FILE, RETRAIN_DIR

log = logging.getLogger("imgclf")

#: the file ``retrain`` leaves in the challenger run
RETRAIN_FILE = "retrain.json"
#: the recipe layered over the champion's config unless --recipe names another
DEFAULT_RECIPE = "retrain"
#: the exit code of a challenger that ran but was not promoted (2: bad input)
REFUSED_EXIT = 3
#: overrides retrain refuses: the data, the start and the place are its own
FIXED_KEYS = {"data.path": "--data (use --new-data)", "data.val_path": "--val-data", "data.test_path": "--test-data "
              "(use --new-test / --old-test)", "model.weights": "--weights", "model.name": "--model",
              "data.classes": "--data.classes", "run.name": "--name", "run.output": "--output (use --out or "
              "--promote-to)", "distill.teachers": "--teacher"}  # fmt: skip


class RetrainRefused(ImgclfError):
    """The challenger ran but is not promoted; ``doc`` holds the figures (``retrain.json``). Exit code 3."""

    exit_code = REFUSED_EXIT

    def __init__(self, message: str, doc: dict[str, Any]):
        super().__init__(message)
        self.doc = doc


def champion(run: str | Path) -> Artifact:
    """The champion's artifact; ImgclfError when ``run`` is not a run or not a trained classifier."""
    art = read_artifact(run)  # ImgclfError naming the path when it is not a run
    require(art, "retrain")
    return art


def challenger_layers(
    run: str | Path,
    *,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[list[dict], list[str], dict[str, Any]]:
    """(config layers, their names, dotted overrides) of the challenger (``api.retrain_config`` builds them): the
    champion's resolved config < ``recipe`` (default ``retrain``) < ``config_file`` < ``overrides``, with
    ``model.weights`` = the champion run, its classes in its order and no distillation.

    Raises:
        ImgclfError: ``run`` is not a trained classifier, or an override names what retrain fixes (data, weights,
            model, classes, where the run goes).
    """
    fixed = [flag for key, flag in FIXED_KEYS.items() if key in (overrides or {})]
    if fixed:
        raise ImgclfError(f"imgclf retrain fixes the data, the start and the place of the challenger: drop "
                          f"{', '.join(fixed)}")  # fmt: skip
    art = champion(run)
    layers, sources = [art.config], [f"{run}/{CONFIG_FILE} (the champion's config)"]
    layers.append(load_yaml(recipe_path(recipe or DEFAULT_RECIPE)))
    sources.append(f"recipe '{recipe or DEFAULT_RECIPE}'")
    if config_file is not None:
        layers.append(load_yaml(config_file))
        sources.append(str(config_file))
    flat = {"model.weights": str(Path(run).resolve()), "data.classes": list(art.class_names), "distill.teachers": []}
    return layers, sources, flat | dict(overrides or {})


# --------------------------------------------------------------------------------------------------- where it goes


@dataclass
class Placement:
    """Where the challenger trains (``work``) and the model repository it may be promoted into (None: ``--out``)."""

    work: Path
    repo: Path | None
    stamp: str


def placement(run: str | Path, promote_to: str | Path | None = None, out: str | Path | None = None) -> Placement:
    """The challenger's folder: a hidden ``.retrain-<time>`` in the model repository ``promote_to`` (default: RUN's
    parent when RUN is a version folder ``REPO/NAME/<int>``), else ``out`` (default ``RUN-retrain``, made unique).
    Nothing is created here."""
    run, stamp = Path(run).resolve(), time.strftime("%Y%m%d-%H%M%S")
    if promote_to is not None and out is not None:
        raise ImgclfError("imgclf retrain: give --promote-to (a model repository) or --out (a plain run), not both")
    if promote_to is None and out is None and run.name.isdigit():
        promote_to = run.parent  # RUN is REPO/NAME/<version>
    if promote_to is not None:
        repo = Path(promote_to).resolve()
        if repo.exists() and not repo.is_dir():
            raise ImgclfError(f"--promote-to {repo}: not a folder")
        if (repo / META_FILE).exists():
            raise ImgclfError(f"--promote-to {repo}: is a run; give the model repository that holds the version "
                              "folders (REPO/NAME, with 1/, 2/, ...)")  # fmt: skip
        return Placement(_unique(repo / f".retrain-{stamp}"), repo, stamp)
    if out is not None:
        if Path(out).exists():
            raise ImgclfError(f"--out {out} exists; nothing is overwritten (pick another folder)")
        return Placement(Path(out).resolve(), None, stamp)
    return Placement(_unique(run.parent / f"{run.name}-retrain"), None, stamp)


def _unique(p: Path) -> Path:
    q, n = p, 2
    while q.exists():
        q, n = p.with_name(f"{p.name}-{n}"), n + 1
    return q


def versions(repo: str | Path) -> list[int]:
    """The integer versions (folders ``1``, ``2``, ...) of a model repository, sorted; hidden folders ignored."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    return sorted(int(p.name) for p in repo.iterdir() if p.is_dir() and p.name.isdigit())


# ------------------------------------------------------------------------------------------------------ the data


@dataclass
class DataPlan:
    """The challenger's data: the new training part, the replayed old images, the two fixed held-out sets."""

    new_train: Samples
    new_test: Samples
    old_test: Samples
    replay: Samples
    new_test_from: str  # how the new held-out set was made
    old_test_from: str  # test split | validation split | --old-test
    pool: int  # old training images the replay sample was drawn from
    notes: list[str] = field(default_factory=list)


def plan_data(art: Artifact, seed: int, new_data: str | Path, *, holdout: float = 0.2,
              new_test: str | Path | None = None, old_test: str | Path | None = None,
              replay: float = 1.0) -> DataPlan:  # fmt: skip
    """Read and split the new data and draw the replay sample and the old held-out set (see the module docstring).

    Raises:
        ImgclfError: unreadable data, a label outside the champion's classes, too few new images to hold out,
            the champion's training data gone when replay or its held-out split needs it.
    """
    new = open_labelled(new_data, art, "--new-data")
    notes: list[str] = []
    if new_test is not None:
        test_new, how = open_labelled(new_test, art, "--new-test", "test"), f"--new-test {new_test}"
        train_new = _without(new, test_new)  # an image in both is a test image
    else:
        tr, te = stratified_split(new.labels, holdout, seed)
        if len(te) == 0:
            raise ImgclfError(f"--new-data {new_data}: {len(new)} image(s), too few to hold out {holdout:g} of any "
                              "class (a class needs 2+ images); add images or pass --new-test")  # fmt: skip
        train_new, test_new = new.subset(tr), new.subset(te)
        how = f"{holdout:.0%} of the new data (stratified, seed {seed})"
        single = [c for c, n in zip(art.class_names, new.class_counts()) if n == 1] if not new.multi_label else []
        if single:
            notes.append(f"--new-data: class(es) {', '.join(single[:5])} have a single image: used for training, "
                         "none held out (their new-data score is not measured)")  # fmt: skip
    if len(train_new) == 0:
        raise ImgclfError(f"--new-data {new_data}: no image left to train on after holding out the test part")
    old_held, old_how, pool = _old_sets(art, old_test, need_train=replay > 0)
    pool = _without(pool, old_held)
    n = min(len(pool), round(replay * len(train_new)))
    for note in notes:
        log.warning(note)
    return DataPlan(train_new, test_new, old_held, replay_sample(pool, n, seed), how, old_how, len(pool), notes)


def open_labelled(spec: str | Path, art: Artifact, flag: str, split: str = "train") -> Samples:
    """Labelled images read as the champion reads them (its decoding, single- or multi-label), in its class order,
    readable ones only. A capture folder's rows with no label yet are left out (said in the log).

    Raises:
        ImgclfError: the data cannot be read, holds no labelled image, or a label is not one of the champion's
            classes (naming it).
    """
    data = art.config.get("data", {})
    fmt = LabelFormat("multi_label" if art.multi_label else "single_label", None, data.get("label_sep") or "|")
    decode = art.preprocessing.decoder()
    with tempfile.TemporaryDirectory(prefix="imgclf-retrain-") as tmp:
        s = open_source(_labelled_rows(Path(spec), Path(tmp)), split, decode, fmt)
    s.name = str(spec)
    known = {nfc(c) for c in art.class_names}
    extra = [c for c, n in zip(s.class_names, s.class_counts()) if n and nfc(c) not in known]
    if extra:
        shown = ", ".join(art.class_names[:10]) + (", ..." if len(art.class_names) > 10 else "")
        raise ImgclfError(f"{flag} {spec}: label '{extra[0]}' is not one of the champion's classes ({shown}); "
                          "retrain keeps the run's classes (train a new run for new ones)")  # fmt: skip
    s = s.remap_to(list(art.class_names))
    s.check_files()
    good = [i for i in range(len(s)) if i not in s.bad and (s.multi_label or s.labels[i] >= 0)]
    if len(good) < len(s):
        log.warning("%s: %d unreadable or unlabelled image(s) left out", spec, len(s) - len(good))
        s = s.subset(good)
    if len(s) == 0:
        raise ImgclfError(f"{flag} {spec}: no readable labelled image")
    return s


def _labelled_rows(spec: Path, tmp: Path) -> str:
    """``spec``, or (a CSV, or a folder with ``labels.csv``, whose ``label`` column has empty cells: a capture folder
    not labelled to the end) a copy in ``tmp`` of its labelled rows with absolute paths."""
    path = spec / LABELS_FILE if spec.is_dir() else spec
    if path.suffix.lower() != ".csv" or not path.is_file():
        return str(spec)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return str(spec)  # open_source says what is wrong with it
    if not rows or "label" not in rows[0] or "path" not in rows[0]:
        return str(spec)
    done = [r for r in rows if (r.get("label") or "").strip()]
    if len(done) == len(rows):
        return str(spec)
    log.info("%s: %d of %d row(s) have no label yet: left out", path, len(rows) - len(done), len(rows))
    out = tmp / "labelled.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in done:
            w.writerow([str(path.parent / r["path"].strip()), r["label"]])
    return str(out)


def _old_sets(art: Artifact, old_test: str | Path | None, need_train: bool) -> tuple[Samples, str, Samples]:
    """(old held-out set, how it was chosen, the champion's training split) from the champion's config: its test
    set, else its validation split (rebuilt exactly), or ``old_test``."""
    from .config import build_config
    from .data.splits import prepare_data

    given = open_labelled(old_test, art, "--old-test", "test") if old_test is not None else None
    if given is not None and not need_train:
        return given, f"--old-test {old_test}", given.subset([])
    try:
        splits = prepare_data(build_config([art.config], ["the champion's config"]))
    except ImgclfError as e:
        raise ImgclfError(f"{art.run_dir}: its training data are unavailable ({e}); pass --old-test and --replay 0 "
                          "to fine-tune on the new data alone") from None  # fmt: skip
    recorded = art.data.get("n_val")
    if given is None and splits.test is None and recorded is not None and recorded != len(splits.val):
        log.warning("%s: the rebuilt validation split has %d images where training had %d (the data changed)",
                    art.run_dir, len(splits.val), recorded)  # fmt: skip
    if given is not None:
        held, how = given, f"--old-test {old_test}"
    elif splits.test is not None:
        held, how = _readable(splits.test), f"test set {splits.test.name}"
    else:
        held, how = _readable(splits.val), f"validation split of {splits.val.name} (rebuilt: the run's seed)"
    return held, how, _readable(splits.train)


def _readable(s: Samples) -> Samples:
    return s.subset([i for i in range(len(s)) if i not in s.bad]) if s.bad else s


def _without(pool: Samples, held: Samples) -> Samples:
    """``pool`` without the files of ``held`` (by real path; images in memory are disjoint by construction)."""
    if pool.arrays is not None or pool.store is not None or held.arrays is not None or held.store is not None:
        return pool
    taken = {os.path.realpath(p) for p in held.items}
    keep = [i for i, p in enumerate(pool.items) if os.path.realpath(p) not in taken]
    return pool if len(keep) == len(pool) else pool.subset(keep)


def replay_sample(pool: Samples, n: int, seed: int) -> Samples:
    """About ``n`` images of ``pool``, stratified by class (each class in its share, one at least for classes of 2+),
    seeded; all of it when ``n`` >= its size, none when ``n`` <= 0."""
    if n <= 0 or len(pool) == 0:
        return pool.subset([])
    if n >= len(pool):
        return pool
    _, pick = stratified_split(pool.labels, n / len(pool), seed)
    return pool.subset(pick)


# ------------------------------------------------------------------------------------------ the mix, as CSV files


def write_plan(plan: DataPlan, folder: Path, sep: str = "|") -> dict[str, Path]:
    """The challenger's data as CSVs in ``folder``: ``train.csv`` (new training part + replay), ``new_test.csv``,
    ``old_test.csv`` and ``test.csv`` (both held-out sets). The old data's files are listed by absolute path; the
    new data's files are copied as they are (bytes unchanged) and images without a file (arrays, dataset rows)
    written as PNG, under ``folder/images/<part>/``, listed relative to the CSV."""
    # the new data's files are copied in: a capture folder rotates (deletes its oldest images), and the run must
    # keep its training and test images for resume, calibrate, report and the next retrain
    rows = {part: _rows(s, folder, part, sep, copy=part.startswith("new")) for part, s in (("new", plan.new_train),
            ("replay", plan.replay), ("new_test", plan.new_test), ("old_test", plan.old_test))}  # fmt: skip
    files = {"train": rows["new"] + rows["replay"], "new_test": rows["new_test"], "old_test": rows["old_test"],
             "test": rows["old_test"] + rows["new_test"]}  # fmt: skip
    column = "labels" if plan.new_train.multi_label else "label"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, body in files.items():
        out[name] = folder / f"{name}.csv"
        with open(out[name], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", column])
            w.writerows(body)
    return out


def _rows(s: Samples, folder: Path, part: str, sep: str, copy: bool = False) -> list[list[str]]:
    import shutil

    from PIL import Image

    rows, names = [], s.class_names
    files = s.arrays is None and s.store is None
    if not files or copy:
        (folder / "images" / part).mkdir(parents=True, exist_ok=True)
    for i in range(len(s)):
        y = s.labels[i]
        label = sep.join(names[k] for k in np.flatnonzero(y)) if s.multi_label else names[int(y)]
        if files and not copy:
            rows.append([os.path.abspath(s.items[i]), label])
            continue
        if files:
            rel = f"images/{part}/{i:06d}{Path(s.items[i]).suffix}"
            shutil.copyfile(s.items[i], folder / rel)
            rows.append([rel, label])
            continue
        rel = f"images/{part}/{i:06d}.png"
        if s.arrays is not None:  # the decoded array itself (grey stays grey): lossless, as the source reads it
            a = s.arrays[s.items[i]]
            Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a).save(folder / rel)
        else:
            s.load(i).save(folder / rel)
        rows.append([rel, label])
    return rows


# ------------------------------------------------------------------------------------------ scoring and deciding


def score(champ: str | Path, challenger: str | Path, files: dict[str, Path], metric: str,
          **run_opts: Any) -> dict[str, dict[str, float]]:  # fmt: skip
    """{champion|challenger: {new|old: metric value in [0, 1]}}, each by ``eval.evaluate.evaluate_run`` (the run's
    calibration and priors, as ``imgclf eval``) on the held-out CSVs."""
    from .eval.evaluate import evaluate_run

    out: dict[str, dict[str, float]] = {}
    for role, run in (("champion", champ), ("challenger", challenger)):
        out[role] = {s: float(evaluate_run(run, str(files[f"{s}_test"]), **run_opts)[metric]) for s in ("new", "old")}
    return out


def decide(scores: dict[str, dict[str, float]], *, margin: float, min_gain: float, force: bool) -> dict[str, Any]:
    """The challenger against the champion: gain on the new held-out set and drop on the old one, in points;
    accepted iff gain > ``min_gain`` and drop <= ``margin`` (never when a score is undefined)."""
    c, h = scores["champion"], scores["challenger"]
    gain, drop = round(100 * (h["new"] - c["new"]), 2), round(100 * (c["old"] - h["old"]), 2)
    better, within = bool(gain > min_gain), bool(drop <= margin)  # False for NaN
    if better and within:
        reason = f"better on the new data by {gain:+.2f} points (> --min-gain {min_gain:g}) and {_change(-drop)} on "
        reason += f"the old (within --margin {margin:g})"
    elif not better:
        reason = f"not better on the new data: {_change(gain)} (needs > {min_gain:g}, --min-gain)"
    else:
        reason = f"{drop:.2f} points worse on the old data (beyond --margin {margin:g})"
    accepted = better and within
    return {"gain_new_points": gain, "drop_old_points": drop, "min_gain": min_gain, "margin": margin,
            "better_on_new": better, "within_margin_on_old": within, "accepted": accepted,
            "forced": bool(force and not accepted), "promoted": bool(accepted or force), "reason": reason}  # fmt: skip


def _change(points: float) -> str:
    return "unchanged" if points == 0 else f"{points:+.2f} points"


# ------------------------------------------------------------------------------------------------------ the verb


def retrain(
    cfg: Config,
    run: str | Path,
    new_data: str | Path,
    *,
    holdout: float = 0.2,
    new_test: str | Path | None = None,
    old_test: str | Path | None = None,
    replay: float = 1.0,
    margin: float = 1.0,
    min_gain: float = 0.0,
    promote_to: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train the challenger of ``cfg`` (``api.retrain_config``) from ``run`` on ``new_data`` + replay, score both
    models on both held-out sets, decide, and place the challenger (a new version, a rejected hidden folder, or
    ``out``). Returns the ``retrain.json`` document.

    Raises:
        ImgclfError: bad input, before anything is trained.
        RetrainRefused: the challenger is not better (after everything is written), unless ``force``.
    """
    from .pipeline import run_training

    _check_numbers(holdout, replay, margin, min_gain)
    t0, art = time.perf_counter(), champion(run)
    place = placement(run, promote_to, out)
    plan = plan_data(art, cfg.train.seed, new_data, holdout=holdout, new_test=new_test, old_test=old_test,
                     replay=replay)  # fmt: skip
    (place.work / RETRAIN_DIR).mkdir(parents=True)
    files = write_plan(plan, place.work / RETRAIN_DIR, cfg.data.label_sep)
    data = replace(cfg.data, path=str(files["train"].resolve()), val_path=None, test_path=str(files["test"].resolve()))
    ch_cfg = replace(cfg, data=data, run=replace(cfg.run, output=str(place.work.parent), name=place.work.name))
    result = run_training(ch_cfg)
    metric = "map" if art.multi_label else "top1"
    opts = {"batch_size": cfg.data.eval_batch_size or 2 * cfg.data.batch_size, "device": cfg.train.device,
            "progress": cfg.run.progress, "num_workers": cfg.data.num_workers}  # fmt: skip
    scores = score(run, result.run_dir, files, metric, **opts)
    doc = {"champion": str(run), "run": str(result.run_dir), "metric": metric, "scores": scores,
           "decision": decide(scores, margin=margin, min_gain=min_gain, force=force),
           "data": _data_record(plan, new_data, replay, files), "epochs": ch_cfg.train.epochs,
           "lr": ch_cfg.optim.lr, "seed": cfg.train.seed, "notes": plan.notes}  # fmt: skip
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc = _place(place, Path(result.run_dir), doc)
    if not doc["decision"]["promoted"]:
        raise RetrainRefused(_refusal(doc), doc)
    if doc["decision"]["forced"]:
        log.warning("the challenger is not better (%s); promoted anyway (--force)", doc["decision"]["reason"])
    return doc


def _check_numbers(holdout: float, replay: float, margin: float, min_gain: float) -> None:
    if not 0 < holdout < 1:
        raise ImgclfError(f"--holdout must be between 0 and 1 (got {holdout})")
    if not replay >= 0:
        raise ImgclfError(f"--replay must be >= 0 old images per new one (got {replay})")
    if not margin >= 0:
        raise ImgclfError(f"--margin must be >= 0 points (got {margin})")
    if not math.isfinite(min_gain):
        raise ImgclfError(f"--min-gain must be a number of points (got {min_gain})")


def _data_record(plan: DataPlan, new_data: str | Path, replay: float, files: dict[str, Path]) -> dict[str, Any]:
    return {"new": {"source": str(new_data), "train": len(plan.new_train), "held_out": len(plan.new_test),
                    "held_out_from": plan.new_test_from},
            "old": {"held_out": len(plan.old_test), "held_out_from": plan.old_test_from},
            "replay": {"per_new_image": replay, "images": len(plan.replay), "pool": plan.pool},
            "train": len(plan.new_train) + len(plan.replay),
            "files": {k: str(Path(RETRAIN_DIR) / v.name) for k, v in files.items()}}  # fmt: skip


def _place(place: Placement, work: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """Record the decision (``retrain.json``, the artifact's ``retrain`` section, the report) and move the challenger:
    to the next version of the repository when promoted, to a hidden ``.rejected-<time>`` when not; with ``--out``
    it stays where it trained."""
    promoted, dest = doc["decision"]["promoted"], work
    if place.repo is not None:
        dest = place.repo / (str((versions(place.repo) or [0])[-1] + 1) if promoted else f".rejected-{place.stamp}")
        if dest.exists():
            raise ImgclfError(f"{dest} appeared while the challenger trained; the challenger stays at {work}")
        doc["version"] = int(dest.name) if promoted else None
    doc["run"] = str(dest)
    write_json(work / RETRAIN_FILE, doc)
    art = read_artifact(work)
    art.extra["retrain"] = {k: doc[k] for k in ("champion", "metric", "scores", "decision", "data", "date")}
    update_artifact(art)
    if (work / REPORT_FILE).is_file():
        from .eval.report import report_run

        report_run(work)  # with its retrain section
    if dest != work:
        _relocate(work, dest)
        os.rename(work, dest)  # one step: a watcher of the repository sees the whole version or none of it
    return doc


def _relocate(work: Path, dest: Path) -> None:
    """Rewrite the run's own paths (its data CSVs, its name) in ``config.yaml``, ``imgclf.json`` and the report to
    name ``dest``, before it is renamed there."""
    import json

    import yaml

    old, new = str(work), str(dest)
    cfg = _swap(yaml.safe_load((work / CONFIG_FILE).read_text(encoding="utf-8")), old, new)
    cfg["run"]["name"] = dest.name
    write_text(work / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
    meta = _swap(json.loads((work / META_FILE).read_text(encoding="utf-8")), old, new)
    meta["config"]["run"]["name"] = dest.name
    write_json(work / META_FILE, meta)
    if (work / REPORT_FILE).is_file():
        write_text(work / REPORT_FILE, (work / REPORT_FILE).read_text(encoding="utf-8").replace(old, new))


def _swap(obj: Any, old: str, new: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: _swap(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_swap(v, old, new) for v in obj]
    return obj


def _refusal(doc: dict[str, Any]) -> str:
    d = doc["decision"]
    return (f"the challenger is not promoted: {d['reason']}; kept at {doc['run']} (figures in "
            f"{Path(doc['run']) / RETRAIN_FILE}); --force promotes it anyway")  # fmt: skip
