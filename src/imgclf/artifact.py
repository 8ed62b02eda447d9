"""The run artifact: ``model.safetensors`` + ``imgclf.json``, the hub every later stage reads.

The JSON holds everything needed to use the weights without the training code: architecture,
class names, preprocessing, the resolved config, metrics and package versions (later: calibration,
OOD and drift statistics under their own keys). Loading never unpickles anything.

The weights also load in plain timm::

    timm.create_model(arch, pretrained=True, num_classes=K,
                      pretrained_cfg_overlay=dict(file="runs/x/model.safetensors", num_classes=K))

(runs trained with ``model.head`` gem / bilinear first need ``imgclf.models.heads.set_head(model, head, arch)``
with the JSON's ``head``, then ``load_state_dict``).
"""

from __future__ import annotations

import functools
import json
import platform
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data.preprocess import Preprocess
from .errors import ImgclfError
from .io import atomic_path, save_safetensors, write_json
from .rundir import META_FILE, WEIGHTS_FILE, RunDir  # noqa: F401 - the layout, re-exported

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "arch", "class_names", "preprocessing")


@dataclass
class Artifact:
    """What a run leaves behind, apart from the weights (``imgclf.json``; its top-level keys are these fields).

    The sections later stages add have their own fields, read nowhere by string key: ``kind`` (a key of
    ``KINDS``), ``task`` (``train.tasks.task_from_json``; ``None`` in runs from before tasks: single-label
    cross-entropy), ``calibration`` (``temperature`` and its fit), ``ood`` (score, TPR, thresholds), ``drift``
    (reference statistics), ``data`` (training data name and split sizes) and ``head`` (a pooling head that
    ``models.factory.build_model`` rebuilds before the weights load). Keys this imgclf does not know
    (a kind's own section such as ``knn``, or a newer imgclf's) stay in ``extra`` and are written back.
    """

    arch: str
    class_names: list[str]
    preprocessing: Preprocess
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_source: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    kind: str = "classifier"
    task: dict[str, Any] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] | None = None  # multi-label decision rule and thresholds (``train.tasks.Decision``)
    ood: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm build arguments (img_size of fixed-size models)
    head: dict[str, Any] | None = None  # pooling head (``models.heads.head_spec``); None: the architecture's own
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    run_dir: Path | None = field(default=None, repr=False, compare=False)  # where it was read from; not stored

    def __post_init__(self) -> None:
        self.preprocessing = Preprocess.from_json(self.preprocessing)  # a dict from JSON (or callers) is typed here

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def temperature(self) -> float | list[float]:
        """The calibration temperature (1.0 for runs without one): one value, or one per class for multi-label
        runs (whose Platt offsets are ``calibration["bias"]``)."""
        t = self.calibration.get("temperature", 1.0)
        return [float(x) for x in t] if isinstance(t, list) else float(t)

    @property
    def multi_label(self) -> bool:
        return bool(self.task) and self.task.get("kind") == "multi_label"

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d.pop("run_dir")
        extra = d.pop("extra")
        d["preprocessing"] = self.preprocessing.to_json()
        for section in ("task", "calibration", "decision", "ood", "drift", "data", "model_kwargs", "head"):
            if not d[section]:
                d.pop(section)  # absent rather than empty: files of runs without the section stay as they were
        return {**d, **extra}


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, for the record next to every figure."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("imgclf", "torch", "torchvision", "timm", "torchmetrics", "safetensors", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda or "none"
    return out


def save_artifact(run_dir: str | Path, model: nn.Module, art: Artifact, *, overwrite: bool = True) -> Path:
    """The one writer of a run: ``model.safetensors`` (what ``art``'s kind stores of ``model``) and
    ``imgclf.json``, each written to a temporary file and renamed into place, weights first. Returns the
    directory; ``art.run_dir`` is set to it.

    Raises ImgclfError when ``run_dir`` already holds a run and ``overwrite`` is False."""
    run = RunDir(run_dir)
    if run.meta.exists() and not overwrite:
        raise ImgclfError(f"{run.path}: already holds a run; choose another directory or pass overwrite=True")
    tensors, meta = kind_of(art).state(model, art)
    art.created = art.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    art.versions = art.versions or package_versions()
    run.path.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.meta) as tmp_meta:
        save_safetensors(run.weights, tensors, {"arch": art.arch, "num_classes": str(art.num_classes), **meta})
        write_json(tmp_meta, art.to_json())
    art.run_dir = run.path
    return run.path


def content_key(run_dir: str | Path) -> str:
    """A hash of a run's weights and ``imgclf.json`` (their bytes, not their paths or times): exports record
    it and count as current only while the run still has it (copies that reset file times cannot fool it).
    Memoised on the two files' (size, mtime), so one command hashes a large model once."""
    files = [Path(run_dir) / WEIGHTS_FILE, Path(run_dir) / META_FILE]
    return _content_key(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=32)
def _content_key(files: tuple[tuple[str, int, int], ...]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def update_artifact(art: Artifact) -> Path:
    """Rewrite ``imgclf.json`` of the run ``art`` was read from (atomically) after changing its fields, e.g. a
    refitted temperature; the weights are untouched. Returns the run directory."""
    run_dir = run_path(art)
    write_json(run_dir / META_FILE, art.to_json())
    return run_dir


def as_artifact(run: str | Path | Artifact) -> Artifact:
    """``run`` itself when it is an ``Artifact`` already read, else ``read_artifact(run)``: functions take either,
    so one command reads a run's ``imgclf.json`` once and hands the result along."""
    return run if isinstance(run, Artifact) else read_artifact(run)


def run_path(run: str | Path | Artifact) -> Path:
    """The run directory of a path or of an artifact read from one."""
    if isinstance(run, Artifact):
        if run.run_dir is None:
            raise ImgclfError("this artifact was not read from a run directory")
        return run.run_dir
    return Path(run)


def read_artifact(run_dir: str | Path) -> Artifact:
    """Read and validate ``imgclf.json`` of a run directory."""
    run_dir = Path(run_dir)
    meta_path = run_dir / META_FILE
    if not run_dir.exists():
        raise ImgclfError(f"run directory not found: {run_dir}")
    if not meta_path.is_file():
        raise ImgclfError(f"{run_dir}: not a finished imgclf run (no {META_FILE}; train it or use --resume)")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgclfError(f"{meta_path}: cannot read run metadata ({e})") from None
    if not isinstance(doc, dict):
        raise ImgclfError(f"{meta_path}: expected a JSON object, got {type(doc).__name__}")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ImgclfError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    checks = {
        "format_version": isinstance(doc["format_version"], int),
        "arch": isinstance(doc["arch"], str),
        "class_names": isinstance(doc["class_names"], list) and all(isinstance(c, str) for c in doc["class_names"]),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ImgclfError(f"{meta_path}: field(s) of the wrong type: {', '.join(bad)}")
    if doc["format_version"] > FORMAT_VERSION:
        raise ImgclfError(f"{meta_path}: format {doc['format_version']} is newer than this imgclf; upgrade imgclf")
    doc["class_names"] = [unicodedata.normalize("NFC", c) for c in doc["class_names"]]  # as every source reads them
    known = {k: doc.pop(k) for k in list(doc) if k in Artifact.__dataclass_fields__ and k not in ("extra", "run_dir")}
    for section, typ in (("kind", str), ("task", dict), ("calibration", dict), ("decision", dict), ("ood", dict),
                         ("drift", dict), ("data", dict), ("model_kwargs", dict), ("head", dict)):  # fmt: skip
        if known.get(section) is not None and not isinstance(known[section], typ):
            raise ImgclfError(f"{meta_path}: field {section} should be a {typ.__name__}, "
                              f"got {type(known[section]).__name__}")  # fmt: skip
    for section in ("kind", "calibration", "data", "model_kwargs"):
        if known.get(section, 0) is None:
            known.pop(section)  # null in the file: the default
    known["preprocessing"] = Preprocess.from_json(known["preprocessing"], f"{meta_path}: preprocessing")
    return Artifact(**known, extra=doc, run_dir=run_dir)


@dataclass(frozen=True)
class Kind:
    """What one kind of artifact is: how its model loads, and the stages that cannot take it yet (with the
    reason, said as a one-line error by ``require``). Stages ask the registry, never ``if kind == ...``."""

    load: Callable[[Artifact, Path, Any], nn.Module]
    state: Callable[[nn.Module, Artifact], tuple[dict[str, torch.Tensor], dict[str, str]]]  # tensors, file metadata
    cannot: dict[str, str] = field(default_factory=dict)  # stage -> why not
    torch_only: bool = False  # no exported runtime (predict/serve use PyTorch)


def _load_classifier(art: Artifact, run_dir: Path, device: Any) -> nn.Module:
    """A trained timm classifier from ``model.safetensors``."""
    from safetensors.torch import load_file

    from .models.factory import build_model

    wpath = run_dir / WEIGHTS_FILE
    if not wpath.is_file():
        raise ImgclfError(f"{run_dir}: weights file {WEIGHTS_FILE} is missing")
    model = build_model(art.arch, art.num_classes, art.model_kwargs, art.head)
    try:
        state = load_file(str(wpath), device=str(device))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - corrupt or mismatched file
        first = str(e).strip().splitlines()[0][:200]
        raise ImgclfError(f"{wpath}: cannot load weights into {art.arch} ({first})") from None
    return model


def _classifier_state(model: nn.Module, art: Artifact) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return model.state_dict(), {}


def _knn_state(model: nn.Module, art: Artifact) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Backbone (timm's own keys) + index tensors; the class names in the file's metadata let a load notice
    weights and ``imgclf.json`` from different writes."""
    if len(art.class_names) != model.num_classes:
        raise ImgclfError(f"save_index: {len(art.class_names)} class names for an index of {model.num_classes} classes")
    return model.index_state(), {"kind": art.kind, "class_names": json.dumps(art.class_names)}  # copied on save


def _load_knn(art: Artifact, run_dir: Path, device: Any) -> nn.Module:
    """A few-shot k-NN index (``imgclf knn build``) as ``imgclf.models.knn.KNNClassifier``."""
    from .models.knn import load_knn

    return load_knn(run_dir / WEIGHTS_FILE, run_dir / META_FILE, art, device)


def _refuse_backbone(art: Artifact, run_dir: Path, device: Any) -> nn.Module:
    raise ImgclfError(f"{run_dir}: {_BACKBONE_WHY}")


_BACKBONE_WHY = (
    "a self-supervised backbone has no classes to predict; train a head on it with `imgclf train DATA "
    "--weights RUN` (probe or finetune) or build a k-NN index with `imgclf knn build DATA --weights RUN`"
)
_BACKBONE_STAGES = ("export", "serve", "report", "explain", "calibrate", "rebalance", "teach", "retrain")


def _zeroshot_state(model: nn.Module, art: Artifact) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Image tower + class-embedding head + logit scale/bias + Tip-Adapter cache (the text tower is the zero-shot
    run's own ``text.safetensors``); the class names in the metadata let a load notice mixed writes."""
    if len(art.class_names) != model.num_classes:
        raise ImgclfError(f"zeroshot: {len(art.class_names)} class names for a head of {model.num_classes} classes")
    return model.state_dict(), {"kind": art.kind, "class_names": json.dumps(art.class_names)}


def _load_zeroshot(art: Artifact, run_dir: Path, device: Any) -> nn.Module:
    """A zero-shot open_clip classifier (``imgclf zeroshot``) as ``imgclf.models.zeroshot.ZeroShotClassifier``."""
    from .models.zeroshot import load_zeroshot

    return load_zeroshot(run_dir / WEIGHTS_FILE, run_dir / META_FILE, art, device)


#: artifact kind (``imgclf.json`` ``kind``) -> what it is
KINDS: dict[str, Kind] = {
    "classifier": Kind(_load_classifier, _classifier_state),
    "knn": Kind(_load_knn, _knn_state, torch_only=True, cannot={
        "export": "a k-NN index cannot be exported yet; export a trained run",
        "serve": "a k-NN index cannot be served yet; serve a trained run",
        "report": "a k-NN index has no training report; evaluate it with `imgclf eval`",
        "explain": "CAMs need a trained classifier (a k-NN index has no class head)",
        "calibrate": "a k-NN index has no temperature to fit (its votes are its probabilities)",
        "rebalance": "a k-NN index has no classifier head to rebalance (its votes weigh every support image)",
        "teach": "a k-NN index cannot teach (its votes are not logits); distil from a trained classifier run",
        "retrain": "a k-NN index has no trained network to fine-tune; add the new images with `imgclf knn add`",
    }),
    # ``imgclf pretrain``: a headless timm backbone (``num_classes=0``) for ``--weights RUN``; nothing predicts with it
    "backbone": Kind(_refuse_backbone, _classifier_state, torch_only=True,
                     cannot=dict.fromkeys(_BACKBONE_STAGES, _BACKBONE_WHY)),
    # ``imgclf zeroshot``: an open_clip image tower + a head of class text embeddings
    "zeroshot": Kind(_load_zeroshot, _zeroshot_state, cannot={
        "report": "a zero-shot run has no training report; evaluate it with `imgclf eval`",
        "explain": "CAMs need a spatial feature map; a zero-shot model's features are its pooled image embedding",
        "rebalance": "a zero-shot head is text embeddings, not trained on class counts; nothing to rebalance",
        "retrain": "retrain takes a trained classifier run; fine-tune a zero-shot run with `imgclf train DATA "
                   "--weights RUN` first",
    }),
}  # fmt: skip


def kind_of(art: Artifact) -> Kind:
    """The registry entry of ``art``'s kind (ImgclfError for a kind this imgclf does not know)."""
    if art.kind not in KINDS:
        raise ImgclfError(f"{art.run_dir}: artifact kind {art.kind!r} is not known to this imgclf (known: "
                          f"{', '.join(KINDS)}); upgrade imgclf")  # fmt: skip
    return KINDS[art.kind]


def require(art: Artifact, stage: str) -> None:
    """ImgclfError naming the run and the reason when ``stage`` (export, serve, report, explain) cannot take
    ``art``'s kind."""
    why = kind_of(art).cannot.get(stage)
    if why:
        raise ImgclfError(f"{art.run_dir}: {why}")


def load_artifact(run: str | Path | Artifact, device: str | torch.device = "cpu") -> tuple[nn.Module, Artifact]:
    """The model (eval mode) and its metadata from a run directory (or an ``Artifact`` already read from one),
    loaded by its kind's loader (``KINDS``; a few-shot index loads as ``imgclf.models.knn.KNNClassifier``)."""
    art, run_dir = as_artifact(run), run_path(run)
    model = kind_of(art).load(art, run_dir, device)
    return model.to(device).eval(), art
