"""Zero-shot classification with open_clip (CLIP, SigLIP, ...): class names in, a run directory out, no training.

``build_zeroshot`` loads an open_clip model (a hub tag or a local checkpoint file), embeds every class name
through prompt templates (CLIP's prompt ensembling) and saves a run of kind ``zeroshot``: ``model.safetensors``
(image tower + head of class embeddings + logit scale/bias, all ``predict`` needs), ``text.safetensors`` (the text
tower) and ``imgclf.json`` (section ``zeroshot``: open_clip model name and config dict, pretrained source as
given, templates, the prompts of every class, tokenizer). ``load_artifact``, ``eval``, ``predict``, ``calibrate``,
``export`` and ``serve`` take it like a trained run (``models.zeroshot.ZeroShotClassifier``).

``edit_classes`` adds, renames and removes classes offline from the stored text tower; ``add_support`` adds a
Tip-Adapter cache of labelled support images (Zhang et al. 2022, training-free). Both rewrite the run in place and
drop its calibration, OOD and drift statistics (they describe the old classes or logits).

Sources: CLIP (Radford et al. 2021), open_clip (Ilharco et al. 2021), SigLIP (Zhai et al. 2023), Tip-Adapter
(Zhang et al. 2022).

Example:
    >>> clf, art = build_zeroshot("ViT-B-32", "laion2b_s34b_b79k", ["cat", "dog"], "runs/pets-zs")  # doctest: +SKIP
    >>> edit_classes("runs/pets-zs", add=["rabbit"], rename={"dog": "puppy"})                       # doctest: +SKIP
    >>> add_support("runs/pets-zs", "support/", shots=16)                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .artifact import Artifact, load_artifact, save_artifact
from .config import EmbedConfig, InferConfig
from .data.preprocess import Preprocess
from .data.sources import open_source
from .errors import ImgclfError
from .io import copy_into, save_safetensors
from .models.embedding import embed_samples, open_labelled
from .models.zeroshot import (
    DEFAULT_TIP_ALPHA,
    DEFAULT_TIP_BETA,
    KIND,
    TEMPLATE_SETS,
    TEXT_FILE,
    TOKENIZER_DIR,
    ZeroShotClassifier,
    build_text_model,
    clean_class_names,
    create_clip,
    encode_classes,
    get_tokenizer,
    load_templates,
    prompts_for,
    rebuild_tokenizer,
    text_state,
    tokenizer_spec,
    zeroshot_from_clip,
    zeroshot_info,
)
from .rundir import RunDir

__all__ = ["DEFAULT_TIP_ALPHA", "DEFAULT_TIP_BETA", "KIND", "TEMPLATE_SETS", "ZeroShotClassifier", "add_support",
           "build_zeroshot", "class_names_from", "edit_classes", "interpolate_weights", "load_zeroshot_run",
           "wise_ft"]  # fmt: skip

log = logging.getLogger("imgclf")
_DROPPED = "calibration, OOD and drift statistics of the run are dropped (they describe the old classes); refit them "


def class_names_from(classes: Sequence[str] | str | None = None, classes_file: str | Path | None = None,
                     data: str | None = None) -> list[str]:  # fmt: skip
    """Class names from exactly one of: a list (or one comma-separated string), a text file (one name per line,
    blank lines skipped) or a labelled data source (its class names, e.g. the sub-folders of a folder).

    Raises:
        ImgclfError: none or several given, an unreadable file or source, or bad names (``clean_class_names``).
    """
    given = [x is not None for x in (classes, classes_file, data)]
    if sum(given) != 1:
        raise ImgclfError("give the classes once: --classes A,B,C, --classes-file FILE or --data DATA")
    if classes is not None:
        names = classes.split(",") if isinstance(classes, str) else list(classes)
        return clean_class_names(names if any(str(n).strip() for n in names) else [], "--classes")
    if classes_file is not None:
        try:
            lines = Path(classes_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ImgclfError(f"{classes_file}: cannot read class names ({type(e).__name__}: {e})") from None
        return clean_class_names([x for x in lines if x.strip()], str(classes_file))
    samples = open_source(data)
    if samples.multi_label:
        raise ImgclfError(f"{samples.name}: label sets (multi-label data); a zero-shot run has one class per image")
    return clean_class_names(samples.class_names, samples.name)


def _info(clip_info: dict[str, Any], clf: ZeroShotClassifier, names: list[str], templates: list[str],
          tokenizer: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {**clip_info, "logit_bias": clf.has_bias, "logit_scale": float(clf.logit_scale),
            "embedding_dim": clf.num_features, "templates": templates, "tokenizer": tokenizer,
            "prompts": {n: prompts_for(n, templates) for n in names}, "tip": None}  # fmt: skip


def build_zeroshot(
    model: str,
    pretrained: str,
    classes: Sequence[str],
    out: str | Path,
    *,
    templates: str | Sequence[str] = "imagenet",
    device: str = "cpu",
    overwrite: bool = False,
) -> tuple[ZeroShotClassifier, Artifact]:
    """Build and save a zero-shot classifier run: no images, no training.

    Args:
        model: an open_clip architecture (``ViT-B-32``, ``ViT-B-16-SigLIP``, ``hf-hub:ORG/REPO``, ...).
        pretrained: an open_clip tag of ``model`` (``laion2b_s34b_b79k``, ``webli``, ...) or a local checkpoint
            file (recorded as given).
        classes: the class names (Unicode NFC, stripped); their order is the class index.
        out: the run directory to write.
        templates: ``imagenet`` (80 prompts), ``simple`` (7), a file (one template per line) or a list; each
            template holds ``{}`` where the class name goes.
        device: where the text encoding runs.
        overwrite: replace a run already in ``out``.

    Returns:
        ``(ZeroShotClassifier in eval mode, Artifact)`` as saved.

    Raises:
        ImgclfError: bad class names or templates (checked before any model loads), unknown model or tag, a
        checkpoint that does not fit the model, a failed download, or ``out`` holding a run already.
    """
    names, temps = clean_class_names(classes), load_templates(templates)
    run = RunDir(out)
    if run.meta.exists() and not overwrite:
        raise ImgclfError(f"{run.path}: already holds a run; choose another --out")
    clip, clip_info = create_clip(model, pretrained, device)
    tokenizer = get_tokenizer(model)
    emb = encode_classes(clip, tokenizer, names, temps)  # (K, D)
    clf = zeroshot_from_clip(clip, emb, clip_info["preprocess_cfg"])
    spec = tokenizer_spec(tokenizer, model, clip_info["model_cfg"])
    art = Artifact(
        arch=f"open_clip:{model}",
        class_names=names,
        preprocessing=Preprocess.from_model(clf),
        config={"model": {"name": model, "weights": pretrained}},
        weights_source=pretrained,
        kind=KIND,
        ood=_ood_settings(),
        extra={KIND: _info(clip_info, clf, names, temps, spec)},
    )
    run.path.mkdir(parents=True, exist_ok=True)
    save_safetensors(run.path / TEXT_FILE, text_state(clip), {"model": model, "pretrained": pretrained})
    if spec["type"] == "hf":
        tokenizer.save_pretrained(str(run.path / TOKENIZER_DIR))  # JSON / text vocabulary files, no pickle
    save_artifact(run.path, clf, art, overwrite=True)
    return clf, art


def load_zeroshot_run(run: str | Path, device: str = "cpu") -> tuple[ZeroShotClassifier, Artifact]:
    """The ``ZeroShotClassifier`` (eval mode) and ``Artifact`` of a zero-shot run (ImgclfError for other kinds)."""
    model, art = load_artifact(run, device)
    if not isinstance(model, ZeroShotClassifier):
        raise ImgclfError(f"{run}: a {art.kind} run, not a zero-shot run (build one with `imgclf zeroshot`)")
    return model, art


def _ood_settings() -> dict[str, Any]:
    """The OOD section of a new (or changed) zero-shot run: logit scores (energy by default) at the default TPR,
    no thresholds yet; ``imgclf calibrate`` fits them (and the drift reference) on held-out labelled images."""
    from .config import TrustConfig
    from .eval.trust import Trust

    return Trust(tpr=TrustConfig().ood_tpr).to_json()


def _drop_statistics(art: Artifact) -> bool:
    """Forget what described the old classes or logits; True when something was dropped."""
    had = bool(art.calibration or (art.ood or {}).get("thresholds") or art.drift)
    art.calibration, art.ood, art.drift = {}, _ood_settings(), None
    art.metrics = {k: v for k, v in art.metrics.items() if not k.startswith("zeroshot_")}
    return had


def _plan_edits(names: list[str], add: Sequence[str], rename: dict[str, str], remove: Sequence[str],
                where: str) -> tuple[list[int], list[str], dict[int, str]]:  # fmt: skip
    """(indices of the classes kept, the new class list, position in it -> name to encode) for renames, removals
    and additions, all naming current classes; ImgclfError naming the bad one."""
    rename = {clean_class_names([o], where)[0]: clean_class_names([n], where)[0] for o, n in rename.items()}
    remove = set(clean_class_names(list(remove), where)) if remove else set()
    for old in [*rename, *remove]:
        if old not in names:
            raise ImgclfError(f"{where}: no class {old!r} to change (classes: {', '.join(names[:10])})")
    if set(rename) & remove:
        raise ImgclfError(f"{where}: class {sorted(set(rename) & remove)[0]!r} is both renamed and removed")
    kept = [i for i, n in enumerate(names) if n not in remove]
    new = [rename.get(names[i], names[i]) for i in kept] + list(add)
    if not new:
        raise ImgclfError(f"{where}: removing every class leaves none")
    new = clean_class_names(new, where)  # an added or renamed name that exists already fails here
    encode = {j: new[j] for j, i in enumerate(kept) if names[i] in rename}
    encode.update({len(kept) + j: a for j, a in enumerate(add)})
    return kept, new, encode


def edit_classes(
    run: str | Path,
    *,
    add: Sequence[str] = (),
    rename: dict[str, str] | None = None,
    remove: Sequence[str] = (),
    device: str = "cpu",
) -> tuple[ZeroShotClassifier, Artifact]:
    """Add, rename and remove classes of a zero-shot run in place, offline, with no training: added and renamed
    classes are encoded by the stored text tower with the run's templates (a renamed class keeps its index);
    every other row of the head stays bit-identical. On a run fine-tuned from a zero-shot run (or a WiSE-FT
    one) a rename keeps the trained row and adding is refused (a text row would not fit the trained tower).
    Calibration, OOD and drift statistics are dropped (a log line says so). A Tip-Adapter cache keeps its images
    (those of removed classes go; new classes have none).

    Raises:
        ImgclfError: not a zero-shot run, an unknown class to rename or remove, a name that exists or repeats, a
        name that tokenises to nothing, or no class left.
    """
    clf, art = load_zeroshot_run(run, device)
    info = zeroshot_info(art, Path(str(run)))
    add = clean_class_names(add, "--add-class") if add else []
    kept, names, encode = _plan_edits(list(art.class_names), add, dict(rename or {}), remove, str(run))
    trained = info.get("fine_tuned_from") or (info.get("wise_ft") or {}).get("zeroshot")
    if trained and add:  # its rows and image tower moved together in training; a text row would not fit them
        raise ImgclfError(f"{run}: its image tower was fine-tuned, so a new class's text embedding would not match "
                          f"it; add the class to the zero-shot run {trained} and fine-tune again")  # fmt: skip
    if trained:
        encode = {}  # a rename of a fine-tuned class relabels its trained row
    rows = torch.cat([clf.class_embeddings[kept], clf.class_embeddings.new_zeros(len(add), clf.num_features)])
    if encode:
        text = build_text_model(info["model_cfg"], art.run_dir / TEXT_FILE).to(device)
        tokenizer = rebuild_tokenizer(info["tokenizer"], art.run_dir)
        emb = encode_classes(text, tokenizer, list(encode.values()), info["templates"]).to(rows.device)
        rows[list(encode)] = emb
    values = clf.tip_values[:, kept]
    keep_cache = values.sum(1) > 0  # cache images of removed classes go with them
    clf.tip_keys = clf.tip_keys[keep_cache]
    values = torch.cat([values[keep_cache], values.new_zeros(int(keep_cache.sum()), len(add))], 1)
    clf.set_classes(rows, values)
    art.class_names = names
    info["prompts"] = {n: prompts_for(n, info["templates"]) for n in names}
    if info.get("tip"):
        info["tip"]["n_support"] = dict(zip(names, values.sum(0).long().tolist()))
    if _drop_statistics(art):
        log.warning("%s: classes changed: %s", run, _DROPPED + "with `imgclf calibrate`")
    save_artifact(art.run_dir, clf, art, overwrite=True)
    return clf, art


def add_support(
    run: str | Path,
    support: str | Path,
    *,
    alpha: float = DEFAULT_TIP_ALPHA,
    beta: float = DEFAULT_TIP_BETA,
    shots: int | None = None,
    seed: int = 0,
    infer: InferConfig | None = None,
) -> tuple[ZeroShotClassifier, Artifact]:
    """Give a zero-shot run a Tip-Adapter cache (Zhang et al. 2022), training-free: the L2-normalised embeddings
    of labelled support images (keys, (N, D)) and their one-hot labels (values, (N, K)); logits become
    ``zs_logits + alpha * exp(-beta * (1 - f keys^T)) values``. The cache replaces any earlier one; classes are
    matched by name (support classes that are not classes of the run are an error; classes without support
    images get no cache term). Unlike the paper (10 augmented views per image), each image is embedded once with
    the run's eval preprocessing.

    Args:
        run: a zero-shot run directory (rewritten in place).
        support: labelled images (folder, CSV, .npz, ``builtin:NAME``).
        alpha: weight of the cache term (0: the zero-shot logits exactly).
        beta: sharpness of the affinities (the paper's ImageNet value 5.5).
        shots: at most this many images per class (seeded by ``seed``; default all).
        infer: loader, device and image limits.

    Raises:
        ImgclfError: not a zero-shot run, unreadable support data, support classes the run does not have.
    """
    infer = infer or InferConfig()
    clf, art = load_zeroshot_run(run, "cpu")
    emb_cfg = EmbedConfig(per_class=shots, seed=seed)
    samples = open_labelled(support, emb_cfg, art.preprocessing, infer)
    unknown = [c for c in samples.class_names if c not in art.class_names]
    if unknown:
        raise ImgclfError(f"{samples.name}: support class(es) {', '.join(unknown[:5])} are not classes of {run}; "
                          f"add them first with --add-class")  # fmt: skip
    feats, labels, skipped = embed_samples(clf, samples, art.preprocessing, infer)
    if len(labels) == 0:
        raise ImgclfError(f"{samples.name}: no readable support images")
    clf = clf.cpu()
    lut = torch.tensor([art.class_names.index(c) for c in samples.class_names])
    values = F.one_hot(lut[labels.cpu()], clf.num_classes).float()  # (N, K)
    clf.set_tip(feats.cpu(), values, alpha, beta)
    counts = values.sum(0).long().tolist()
    info = art.extra[KIND]
    info["tip"] = {"alpha": float(alpha), "beta": float(beta), "shots": shots, "seed": seed, "data": str(support),
                   "n_support": dict(zip(art.class_names, counts)), "skipped": skipped}  # fmt: skip
    if _drop_statistics(art):
        log.warning("%s: logits changed: %s", run, _DROPPED + "with `imgclf calibrate`")
    save_artifact(art.run_dir, clf, art, overwrite=True)
    return clf, art


def set_tip_params(run: str | Path, alpha: float, beta: float) -> tuple[ZeroShotClassifier, Artifact]:
    """Change a run's Tip-Adapter ``alpha`` and ``beta`` without re-embedding its cache."""
    clf, art = load_zeroshot_run(run, "cpu")
    tip = art.extra[KIND].get("tip")
    if not tip:
        raise ImgclfError(f"{run}: has no Tip-Adapter cache; give --support DATA")
    clf.set_tip(clf.tip_keys, clf.tip_values, alpha, beta)
    tip.update(alpha=float(alpha), beta=float(beta))
    if _drop_statistics(art):
        log.warning("%s: logits changed: %s", run, _DROPPED + "with `imgclf calibrate`")
    save_artifact(art.run_dir, clf, art, overwrite=True)
    return clf, art


# --------------------------------------------------------------------------- WiSE-FT


def interpolate_weights(zeroshot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): ``(1 - alpha) * zeroshot + alpha
    * fine_tuned`` for every floating-point tensor (integer ones, e.g. BatchNorm counters, from ``fine_tuned``).

    Args:
        zeroshot, fine_tuned: state dicts with the same keys and shapes.
        alpha: 0 gives the zero-shot weights, 1 the fine-tuned ones.

    Raises:
        ImgclfError: keys or shapes that differ, or alpha outside [0, 1].

    Example:
        >>> interpolate_weights({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
        tensor([0.2500, 0.2500])
    """
    if not 0 <= alpha <= 1:
        raise ImgclfError(f"wise-ft: alpha must be in [0, 1] (got {alpha})")
    if zeroshot.keys() != fine_tuned.keys():
        diff = sorted(zeroshot.keys() ^ fine_tuned.keys())
        raise ImgclfError(f"wise-ft: the two models have different tensors (e.g. {', '.join(diff[:3])})")
    out = {}
    for k, ft in fine_tuned.items():
        zs = zeroshot[k]
        if zs.shape != ft.shape:
            raise ImgclfError(f"wise-ft: {k} is {tuple(zs.shape)} in the zero-shot model, {tuple(ft.shape)} fine-tuned")
        out[k] = torch.lerp(zs.to(ft.dtype), ft, alpha) if ft.is_floating_point() else ft.clone()
    return out


def wise_ft(
    fine_tuned: str | Path,
    alpha: float = 0.5,
    *,
    zeroshot: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
) -> tuple[ZeroShotClassifier, Artifact]:
    """Save the WiSE-FT interpolation of a run fine-tuned from a zero-shot run (``imgclf train DATA --weights
    ZS_RUN``) with that zero-shot run, as a new zero-shot-kind run (``out``, default ``<fine_tuned>-wise<alpha>``).

    ``zeroshot`` defaults to the run the fine-tuning started from (recorded in the run). The zero-shot head's rows
    are taken in the fine-tuned run's class order. Calibration, OOD thresholds and drift statistics are dropped
    (they described the fine-tuned logits; refit with ``imgclf calibrate``); the text tower comes along.

    Raises:
        ImgclfError: either run not a zero-shot kind, a fine-tuned class the zero-shot run lacks, models of
        different architectures, alpha outside [0, 1], or ``out`` holding a run.
    """
    ft, art = load_zeroshot_run(fine_tuned, device)
    info = zeroshot_info(art, Path(str(fine_tuned)))
    zs_run = zeroshot or info.get("fine_tuned_from")
    if not zs_run:
        raise ImgclfError(f"{fine_tuned}: not fine-tuned from a zero-shot run; pass --zeroshot RUN")
    zs, zs_art = load_zeroshot_run(zs_run, device)
    missing = [c for c in art.class_names if c not in zs_art.class_names]
    if missing:
        raise ImgclfError(f"{zs_run}: has no class {missing[0]!r} of {fine_tuned}; add it with --add-class first")
    zs.set_tip(torch.zeros(0, zs.num_features), torch.zeros(0, zs.num_classes))
    zs.set_classes(zs.class_embeddings[[zs_art.class_names.index(c) for c in art.class_names]])
    ft.load_state_dict(interpolate_weights(zs.state_dict(), ft.state_dict(), alpha))
    dest = RunDir(out or f"{str(fine_tuned).rstrip('/')}-wise{alpha:g}")
    if dest.meta.exists():
        raise ImgclfError(f"{dest.path}: already holds a run; choose another --out")
    _drop_statistics(art)
    art.metrics = {"wise_ft": {"alpha": alpha, "zeroshot": str(zs_run), "fine_tuned": str(fine_tuned)}}
    art.weights_source = f"wise-ft:{alpha:g}"
    art.extra[KIND] = {**info, "wise_ft": art.metrics["wise_ft"]}
    dest.path.mkdir(parents=True, exist_ok=True)
    for src in (art.run_dir / TEXT_FILE, art.run_dir / TOKENIZER_DIR):
        if src.exists():
            copy_into(src, dest.path)
    art.created, art.versions = "", {}
    save_artifact(dest.path, ft, art)
    return ft.eval(), art
