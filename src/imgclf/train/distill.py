"""Knowledge distillation: trained runs teach the model being trained (``imgclf train --teacher RUN [RUN ...]``).

- **Teachers** (``load_teachers``): each run loads in eval mode, without gradients, outside DDP, the optimizer and
  the checkpoints. It sees its own preprocessing of the student's batch (the same crop, MixUp and all): the
  student's normalisation undone, resized to the teacher's input size (antialiased, with the teacher's
  interpolation) and normalised the teacher's way. Its logits are put in the student's class order (classes
  matched by name, case and surrounding spaces ignored) and calibrated with its own temperature; several teachers
  average their calibrated probabilities (an ensemble).
- **Terms** (``config.DistillConfig.methods``, joined with +):

  - ``logit``: KL(teacher || student) of the softmax at temperature T, x T^2 (Hinton et al. 2015, "Distilling
    the knowledge in a neural network"); for a multi-label student the per-class Bernoulli KL of the sigmoids
    at T (sigmoid KD). The task loss gets ``1 - alpha``, this term ``alpha``.
  - ``hard``: cross-entropy on the teacher's top-1 (multi-label: BCE on its decisions at 0.5), weighted as
    ``logit`` (DeiT's hard distillation, Touvron et al. 2021, with alpha 0.5).
  - ``feature``: a learned linear projector from the student's pooled features to the teacher's, with
    1 - cosine similarity or MSE (FitNets-style hint on the pre-logits, Romero et al. 2015; as timm's
    ``task/distillation.py``), weighted by ``feature_weight``; the projector trains with the student and is
    dropped afterwards.
  - ``attention``: the spatial attention maps ``normalize(mean_c(A^2))`` of the last (up to) three stages of
    each CNN, matched from the last stage back, ``beta / 2 x sum ||Q_s - Q_t||^2`` (Zagoruyko & Komodakis 2017,
    "Paying more attention to attention"; their code's mean squared difference and beta 1e3).

``DistillModule`` takes ``tasks.TaskModule``'s place in the loop: ``forward(images, targets) -> (loss, logits)``.
Everything is checked before training by one forward of a 2-image batch (``Distiller.check``): classes, tasks,
kinds (a k-NN index cannot teach), channel counts, feature and stage shapes; each problem is one ImgclfError.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifact import Artifact, content_key, load_artifact, read_artifact, require
from ..config import DistillConfig
from ..data.preprocess import Preprocess
from ..errors import ImgclfError

log = logging.getLogger("imgclf")
AT_STAGES = 3  # stage pairs of the attention term (the last ones)
#: Preprocess interpolation -> F.interpolate mode for the teacher's resize of a tensor batch
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "bicubic",
          "hamming": "bilinear", "box": "area", "random": "bilinear"}  # fmt: skip


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def class_order(teacher: list[str], student: list[str], where: str) -> list[int]:
    """Index into the teacher's classes for each of the student's (names matched after normalising case and
    spaces). ImgclfError naming what is missing or extra when the two sets differ.

    Example:
        >>> class_order(["Cat", "dog "], ["dog", "cat"], "t")
        [1, 0]
    """
    pos = {_norm(c): i for i, c in enumerate(teacher)}
    missing = [c for c in student if _norm(c) not in pos]
    extra = sorted(set(pos) - {_norm(c) for c in student})
    if missing or extra or len(pos) != len(teacher):
        said = "; ".join(x for x in (f"missing {', '.join(map(repr, missing[:5]))}" if missing else "",
                                     f"not in the data {', '.join(map(repr, extra[:5]))}" if extra else "",
                                     "duplicate names" if len(pos) != len(teacher) else "") if x)  # fmt: skip
        raise ImgclfError(f"teacher {where}: its classes are not the data's ({said})")
    return [pos[_norm(c)] for c in student]


class StageTap:
    """Forward hooks on a model's stages (``feature_info`` modules) that keep their outputs while armed."""

    def __init__(self, model: nn.Module, where: str):
        info = getattr(model, "feature_info", None)
        info = info.get_dicts() if hasattr(info, "get_dicts") else info
        names = [d.get("module") for d in info or [] if isinstance(d, dict)]
        modules = dict(model.named_modules())
        names = [n for n in names if n in modules]
        if not names:
            raise ImgclfError(f"distill attention: {where} lists no stages (timm feature_info); drop that term")
        self.names, self.out, self.armed = names[-AT_STAGES:], [], False
        self.handles = [modules[n].register_forward_hook(self._keep) for n in self.names]

    def _keep(self, _m: nn.Module, _i: Any, out: Any) -> None:
        if self.armed:
            self.out.append(out)

    def take(self) -> list[torch.Tensor]:
        out, self.out = self.out, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Teacher(nn.Module):
    """One trained run as a teacher: ``forward(x) -> (calibrated logits (B, K) in the student's class order, pooled
    features (B, D) or None)``, ``x`` being the student's normalised batch (B, C, H, W)."""

    def __init__(self, model: nn.Module, art: Artifact, student: Preprocess, order: list[int], features: bool):
        super().__init__()
        self.model, self.art, self.features = model.requires_grad_(False).eval(), art, features
        t = art.preprocessing
        self.size, self.mode = tuple(t.input_size[1:]), _MODES.get(t.interpolation, "bilinear")
        view = (1, -1, 1, 1)
        self.register_buffer("s_mean", torch.tensor(student.mean).view(view), persistent=False)
        self.register_buffer("s_std", torch.tensor(student.std).view(view), persistent=False)
        self.register_buffer("t_mean", torch.tensor(t.mean).view(view), persistent=False)
        self.register_buffer("t_std", torch.tensor(t.std).view(view), persistent=False)
        self.register_buffer("order", torch.tensor(order), persistent=False)
        temp = torch.tensor(art.temperature, dtype=torch.float32)
        self.register_buffer("temp", temp if temp.ndim == 0 else temp[order], persistent=False)
        bias = art.calibration.get("bias") if art.multi_label else None
        self.register_buffer("bias", torch.tensor(bias)[order] if bias else torch.zeros(()), persistent=False)
        self.same_input = tuple(student.mean) == tuple(t.mean) and tuple(student.std) == tuple(t.std)
        self.same_input = self.same_input and tuple(student.input_size[1:]) == self.size

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch as this teacher's preprocessing makes it (same pixels, its size and normalisation)."""
        if self.same_input:
            return x
        px = x.float() * self.s_std + self.s_mean  # [0, 1] pixels
        if tuple(px.shape[-2:]) != self.size:
            kw = {} if self.mode in ("nearest", "area") else {"align_corners": False, "antialias": True}
            px = F.interpolate(px, size=self.size, mode=self.mode, **kw)
        return ((px - self.t_mean) / self.t_std).to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.inputs(x)
        if self.features:
            f = self.model.forward_features(x)
            logits, pooled = self.model.forward_head(f), self.model.forward_head(f, pre_logits=True)
        else:
            logits, pooled = self.model(x), None
        return logits.float()[:, self.order] / self.temp + self.bias, pooled


class Targets(NamedTuple):
    """What the teachers say about one batch: ``logits`` (B, K): the ensemble's calibrated logits (softmax
    students: log of the mean probabilities; sigmoid students: logit of the mean probabilities), ``features``
    (B, D) of the one teacher or None, ``stages``: its stage outputs (attention term) or []."""

    logits: torch.Tensor
    features: torch.Tensor | None
    stages: list[torch.Tensor]


class TeacherCache:
    """The teachers' outputs per training image, keyed by a BLAKE2b digest of the exact input bytes (a view seen
    again, e.g. the same image under deterministic augmentation, gets the stored targets; any change in a pixel is
    a different key, so a hit is never another image's answer). ``mode`` auto switches itself off (and frees the
    memory) when, after ``2 x n_train`` lookups, under half of the lookups since the first ``n_train`` hit. Our
    own code: the caching needs the distiller's own targets (calibrated, reordered, ensembled)."""

    def __init__(self, mode: str, n_train: int, max_mb: float):
        self.mode, self.n_train, self.max_bytes = mode, max(n_train, 1), max_mb * 2**20
        self.entries: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.bytes = self.lookups = self.hits = self.late_hits = 0
        self.active = mode != "off"

    @staticmethod
    def keys(x: torch.Tensor) -> list[bytes]:
        rows = x.detach().contiguous().view(len(x), -1).cpu()  # one host copy per step (no teacher forward on hits)
        return [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in rows]

    def get(self, keys: list[bytes], device: torch.device) -> Targets | None:
        self.lookups += len(keys)
        found = [self.entries.get(k) for k in keys]
        hit = all(f is not None for f in found)
        if hit:
            self.hits += len(keys)
            if self.lookups > self.n_train:
                self.late_hits += len(keys)
        self._review()
        if not hit:
            return None
        logits = torch.stack([f[0] for f in found]).to(device, non_blocking=True)
        feats = found[0][1]
        feats = torch.stack([f[1] for f in found]).to(device, non_blocking=True) if feats is not None else None
        return Targets(logits, feats, [])

    def put(self, keys: list[bytes], t: Targets) -> None:
        if not self.active:
            return
        logits, feats = t.logits.detach().cpu(), t.features.detach().cpu() if t.features is not None else None
        row = logits[0].nbytes + (feats[0].nbytes if feats is not None else 0) + 64
        for i, k in enumerate(keys):
            if k not in self.entries and self.bytes + row <= self.max_bytes:
                self.entries[k] = (logits[i].clone(), feats[i].clone() if feats is not None else None)
                self.bytes += row

    def _review(self) -> None:
        if self.mode != "auto" or not self.active or self.lookups < 2 * self.n_train:
            return
        later = self.lookups - self.n_train
        if self.late_hits < 0.5 * later:
            log.info("distill.cache auto: %.0f %% of the teacher lookups hit after the first pass (augmentation "
                     "makes each view new); cache off", 100 * self.late_hits / later)  # fmt: skip
            self.active, self.entries, self.bytes = False, {}, 0
        else:
            self.mode = "on"  # it pays: keep it without reviewing again


@dataclass
class Distiller:
    """The teachers, the terms and the trainable projector of one training job (built once, ``load_teachers``)."""

    cfg: DistillConfig
    teachers: list[Teacher]
    multi_label: bool  # the student's task: sigmoid KD and BCE hard targets
    projector: nn.Module | None = None  # feature term: student features -> teacher features
    student_tap: StageTap | None = None
    teacher_tap: StageTap | None = None
    identities: list[dict[str, Any]] = field(default_factory=list)
    cache: TeacherCache | None = None  # teacher outputs per training view (``distill.cache``)
    terms: list[str] = field(init=False)  # ``cfg.terms``, parsed once rather than per training step

    def __post_init__(self) -> None:
        self.terms = self.cfg.terms

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> Targets:
        """The teachers' targets for the student's batch ``x``: from the cache when every view is in it."""
        if self.cache is None or not self.cache.active:
            return self._targets(x)
        keys = self.cache.keys(x)
        hit = self.cache.get(keys, x.device)
        if hit is not None:
            return hit
        t = self._targets(x)
        self.cache.put(keys, t)
        return t

    def _targets(self, x: torch.Tensor) -> Targets:
        outs, feats = [], None
        if self.teacher_tap is not None:
            self.teacher_tap.armed = True
        try:
            for t in self.teachers:
                logits, feats = t(x)
                outs.append(logits)
        finally:
            if self.teacher_tap is not None:
                self.teacher_tap.armed = False
        stages = self.teacher_tap.take() if self.teacher_tap is not None else []
        if len(outs) == 1:
            return Targets(outs[0], feats, stages)
        z = torch.stack(outs)  # (T, B, K)
        if self.multi_label:
            return Targets(torch.logit(torch.sigmoid(z).mean(0), eps=1e-6), feats, stages)
        return Targets(torch.logsumexp(F.log_softmax(z, -1), 0) - math.log(len(outs)), feats, stages)

    def tap(self, student: nn.Module) -> None:
        """Stage hooks on the student and the (one) teacher when the attention term is on (after the EMA copy)."""
        if "attention" in self.terms and self.student_tap is None:
            self.student_tap = StageTap(student, "the student")
            self.teacher_tap = StageTap(self.teachers[0].model, f"teacher {self.identities[0]['run']}")

    def untap(self) -> None:
        for t in (self.student_tap, self.teacher_tap):
            if t is not None:
                t.remove()
        self.student_tap = self.teacher_tap = None

    def to(self, device: torch.device, fmt: torch.memory_format) -> Distiller:
        for t in self.teachers:
            t.to(device)
            t.model.to(memory_format=fmt)
        if self.projector is not None:
            self.projector.to(device)
        return self


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, multi_label: bool) -> torch.Tensor:
    """KL(teacher || student) at ``temperature`` x T^2 (Hinton et al. 2015), batch mean: softmax over the K
    classes of (B, K) logits, or for ``multi_label`` the Bernoulli KL of each class's sigmoid, averaged over classes.

    Example:
        >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> round(float(logit_kd(s, t, 2.0, False)), 4)  # 4 x KL([.269,.731] || [.731,.269])
        1.8485
    """
    s, t = student.float() / temperature, teacher.float() / temperature
    if multi_label:
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return kl.mean() * temperature**2
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True) * temperature**2


def hard_kd(student: torch.Tensor, teacher: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy on the teacher's top-1 (DeiT hard distillation); multi-label: BCE on its decisions at 0.5."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(student.float(), (teacher > 0).float())
    return F.cross_entropy(student.float(), teacher.argmax(-1))


def feature_kd(projected: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """1 - cosine similarity (batch mean) or the MSE between (B, D) projected student and teacher features."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(projected.float(), teacher.float(), dim=1).mean()
    return F.mse_loss(projected.float(), teacher.float())


def attention_map(a: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis' attention map of a (B, C, H, W) activation: mean over channels of A^2, resized to
    ``size`` (adaptive average pooling down, bilinear up), flattened and L2-normalised: (B, H*W)."""
    q = a.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        big = q.shape[-2] >= size[0] and q.shape[-1] >= size[1]
        q = F.adaptive_avg_pool2d(q, size) if big else F.interpolate(q, size=size, mode="bilinear", align_corners=False)
    return F.normalize(q.flatten(1), dim=1)


def attention_kd(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over stage pairs (matched from the last stage back) of the mean squared difference of the attention
    maps, the teacher's at the student's resolution (their ``at_loss``)."""
    k = min(len(student), len(teacher))
    total = student[-1].new_zeros((), dtype=torch.float32)
    for s, t in zip(student[-k:], teacher[-k:]):
        total = total + (attention_map(s) - attention_map(t, tuple(s.shape[-2:]))).pow(2).mean()
    return total


class DistillModule(nn.Module):
    """The student, its task loss and the distillation terms as one module (``tasks.TaskModule``'s place, so DDP
    wraps the student and the projector): ``forward(images, targets) -> (loss, student logits (B, K))``. The
    teachers are held outside the module tree: not synced, not optimised, not saved."""

    def __init__(self, model: nn.Module, criterion: nn.Module, distiller: Distiller):
        super().__init__()
        self.model, self.criterion, self.projector = model, criterion, distiller.projector
        self.__dict__["distiller"] = distiller  # not a submodule

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.distiller
        cfg, terms = d.cfg, d.terms
        tap = d.student_tap
        if tap is not None:
            tap.armed = True
        try:
            if "feature" in terms:
                f = self.model.forward_features(images)
                logits, pooled = self.model.forward_head(f), self.model.forward_head(f, pre_logits=True)
            else:
                logits, pooled = self.model(images), None
        finally:
            if tap is not None:
                tap.armed = False
        stages = tap.take() if tap is not None else []
        t = d.targets(images)
        soft = "logit" in terms or "hard" in terms
        loss = (1 - cfg.alpha if soft else 1.0) * self.criterion(logits, targets)
        if "logit" in terms:
            loss = loss + cfg.alpha * logit_kd(logits, t.logits, cfg.temperature, d.multi_label)
        if "hard" in terms:
            loss = loss + cfg.alpha * hard_kd(logits, t.logits, d.multi_label)
        if pooled is not None and t.features is not None:
            loss = loss + cfg.feature_weight * feature_kd(self.projector(pooled), t.features, cfg.feature_loss)
        if stages:
            loss = loss + cfg.attention_weight / 2 * attention_kd(stages, t.stages)
        return loss, logits


def load_teachers(
    dcfg: DistillConfig,
    student: nn.Module,
    pre: Preprocess,
    class_names: list[str],
    multi_label: bool,
    strategy: str,
    n_train: int = 0,
) -> Distiller | None:
    """The ``Distiller`` of ``dcfg.teachers`` for a student (its bare network on the CPU, its preprocessing, the
    data's classes and task), checked by one forward of a 2-image batch; None without teachers.

    Raises:
        ImgclfError (one line, before training): not a run directory, a k-NN index, classes not the data's, a
        teacher of the other task (multi-label vs single-label) without ``teacher_task any``, another channel
        count, several teachers with the feature or attention term, the cached-feature probe, a student or
        teacher without pooled features or CNN stages the terms need.
    """
    if not dcfg.teachers:
        return None
    terms = dcfg.terms
    if strategy == "probe":
        raise ImgclfError("distillation trains on images; transfer.strategy probe fits a head on cached features: "
                          "use finetune, staged or scratch")  # fmt: skip
    if len(dcfg.teachers) > 1 and {"feature", "attention"} & set(terms):
        raise ImgclfError("distill.methods feature and attention take one teacher (an ensemble's logits average; "
                          f"its features do not): got {len(dcfg.teachers)}")  # fmt: skip
    teachers, ids = [], []
    for path in dcfg.teachers:
        art = _teacher_artifact(Path(path), dcfg, pre, multi_label)
        model, _ = load_artifact(art)
        teachers.append(Teacher(model, art, pre, class_order(art.class_names, class_names, path), "feature" in terms))
        ids.append({"run": str(path), "content_key": content_key(path), "arch": art.arch,
                    "params": sum(p.numel() for p in model.parameters()),
                    "test_top1": (art.metrics.get("test") or {}).get("top1")})  # fmt: skip
    d = Distiller(dcfg, teachers, multi_label, identities=ids)
    if dcfg.cache != "off" and "attention" not in terms:  # stage maps are not cached: attention runs the teacher
        d.cache = TeacherCache(dcfg.cache, n_train, dcfg.cache_max_mb)
    _check_shapes(d, student, pre)
    log.info("distilling from %s (%s; T %g, alpha %g)", ", ".join(f"{i['run']} ({i['arch']})" for i in ids),
             dcfg.methods, dcfg.temperature, dcfg.alpha)  # fmt: skip
    return d


def _teacher_artifact(path: Path, dcfg: DistillConfig, pre: Preprocess, multi_label: bool) -> Artifact:
    if not (path / "imgclf.json").is_file():
        raise ImgclfError(f"teacher {path}: not a trained run directory (no imgclf.json)")
    art = read_artifact(path)
    require(art, "teach")
    if art.multi_label != multi_label and dcfg.teacher_task == "same":
        kinds = ("multi-label", "single-label")
        t, s = kinds[not art.multi_label], kinds[not multi_label]
        raise ImgclfError(f"teacher {path} is {t}, the data {s}: teach with a {s} run, or read its logits as the "
                          "student's task with --distill.teacher_task any")  # fmt: skip
    if art.preprocessing.input_size[0] != pre.input_size[0]:
        raise ImgclfError(f"teacher {path} takes {art.preprocessing.input_size[0]} channels, the student "
                          f"{pre.input_size[0]}")  # fmt: skip
    return art


@torch.no_grad()
def _check_shapes(d: Distiller, student: nn.Module, pre: Preprocess) -> None:
    """One forward of a 2-image batch through the student and the teachers: the projector's shape, and every
    output the terms need present and of the right shape (ImgclfError before training otherwise)."""
    terms, x = d.terms, torch.zeros(2, *pre.input_size)
    was = student.training
    student.eval()
    try:
        d.tap(student)
        if d.student_tap is not None:
            d.student_tap.armed = True
        s_pooled = student.forward_head(student.forward_features(x), pre_logits=True) if "feature" in terms else None
        if "feature" not in terms:
            student(x)
        if d.student_tap is not None:
            d.student_tap.armed = False
        t = d.targets(x)
        if s_pooled is not None:
            if s_pooled.ndim != 2 or t.features is None or t.features.ndim != 2:
                raise ImgclfError("distill feature: the student's and the teacher's pooled features must be (B, D); "
                                  f"got {tuple(s_pooled.shape)} and "
                                  f"{None if t.features is None else tuple(t.features.shape)}")  # fmt: skip
            d.projector = nn.Linear(s_pooled.shape[1], t.features.shape[1])
        if d.student_tap is not None:
            _check_stages(d.student_tap.take(), "the student")
            _check_stages(t.stages, f"teacher {d.identities[0]['run']}")
    finally:
        d.untap()
        student.train(was)


def _check_stages(outs: list[Any], who: str) -> None:
    bad = [tuple(o.shape) if torch.is_tensor(o) else type(o).__name__ for o in outs
           if not (torch.is_tensor(o) and o.ndim == 4)]  # fmt: skip
    if bad or not outs:
        raise ImgclfError(f"distill attention: attention maps need CNN stage outputs (B, C, H, W); {who}'s are "
                          f"{bad or 'missing'} (drop the attention term for this architecture)")  # fmt: skip
