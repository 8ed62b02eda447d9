"""Zero-shot image classification with an open_clip model: the image tower and a head of class text embeddings.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") and SigLIP
(Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") embed images and texts in one space; a class
is the text "a photo of a {class}." and an image's logit for it is ``scale * cos(image, text) (+ bias)``.
Models, weights, tokenizers and prompt templates come from open_clip (Ilharco et al., github.com/mlfoundations/
open_clip). Prompt ensembling (Radford et al. 2021, section 3.1.4): per class, the mean of the L2-normalised
embeddings of every template filled with the class name, L2-normalised again.

``ZeroShotClassifier`` keeps only the image tower (``model.visual``) and a bias-free ``nn.Linear`` whose rows are
those class embeddings, so a saved run never needs the hub or the text tower to predict; it follows timm's model
contract so every stage (eval, calibration, OOD, export, serving) takes it unchanged. The text tower is stored next
to it (``TEXT_FILE``) so classes can be added or renamed later offline, with no training.

Tip-Adapter (Zhang et al. 2022, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification", ECCV;
official code github.com/gaopengcuhk/Tip-Adapter) adds a cache of labelled support embeddings:
``logits = zs_logits + alpha * exp(-beta * (1 - f K^T)) V`` with the zero-shot logits at the model's own scale and
the cache term unscaled: the official code's ``clip_logits = 100. * features @ clip_weights`` (100 = trained CLIP's
``logit_scale.exp()``, which open_clip clamps there) plus ``alpha * exp(-(beta - beta * affinity)) @ cache_values``.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ImgclfError, first_line

log = logging.getLogger("imgclf")

KIND = "zeroshot"  #: ``imgclf.json`` ``kind`` (and section name) of a zero-shot run
TEXT_FILE = "text.safetensors"  #: the text tower (open_clip's own keys), next to ``model.safetensors``
TOKENIZER_DIR = "tokenizer"  #: a Hugging Face tokenizer's files, saved so edits stay offline
TEMPLATE_SETS = ("imagenet", "simple")  #: open_clip's 80 OpenAI ImageNet templates, its 7 "simple" ones
DEFAULT_TIP_ALPHA, DEFAULT_TIP_BETA = 1.0, 5.5  #: Tip-Adapter's ImageNet values (Zhang et al. 2022, section 4.1)
#: open_clip's eval resize modes -> timm's crop modes (crop_pct 1.0): the same resize and crop
_CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}


def open_clip_module():
    """``open_clip``, or ImgclfError saying how to install it."""
    try:
        import open_clip
    except ImportError:
        raise ImgclfError("zero-shot classification needs open_clip: pip install 'imgclf[foundation]'") from None
    return open_clip


# --------------------------------------------------------------------------- class names and prompts


def clean_class_names(names: Sequence[str], where: str = "classes") -> list[str]:
    """Class names as every source reads them (Unicode NFC, outer spaces stripped).

    Raises:
        ImgclfError: no names, an empty name, or a name given twice (after normalisation), naming ``where``.

    Example:
        >>> clean_class_names([" cat", "dog "])
        ['cat', 'dog']
    """
    out = [unicodedata.normalize("NFC", str(n)).strip() for n in names]
    if not out:
        raise ImgclfError(f"{where}: no class names given")
    if "" in out:
        raise ImgclfError(f"{where}: class {out.index('') + 1} of {len(out)} is an empty name")
    dup = [n for n, c in Counter(out).items() if c > 1]
    if dup:
        raise ImgclfError(f"{where}: duplicated class name(s) {', '.join(map(repr, dup[:5]))} (after Unicode NFC "
                          "normalisation and stripping spaces); give each class once")  # fmt: skip
    return out


def builtin_templates(name: str) -> list[str]:
    """open_clip's template set ``imagenet`` (the 80 OpenAI ImageNet prompts) or ``simple`` (7), as ``{}`` strings."""
    oc = open_clip_module()
    sets = {"imagenet": oc.OPENAI_IMAGENET_TEMPLATES, "simple": oc.SIMPLE_IMAGENET_TEMPLATES}
    return [t("{}") for t in sets[name]]  # open_clip keeps them as lambdas; "{}" marks where the class goes


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Prompt templates: ``imagenet``, ``simple``, a text file (one template per line; blank lines and lines
    starting with ``#`` skipped) or a list. Each must contain ``{}`` (replaced by the class name).

    Raises:
        ImgclfError: an unknown name or missing file, an empty set, or a template without ``{}`` (naming the file
        and line).
    """
    if isinstance(spec, str) and spec in TEMPLATE_SETS:
        return builtin_templates(spec)
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if not path.is_file():
            raise ImgclfError(f"--templates: {spec!r} is neither {' nor '.join(TEMPLATE_SETS)} nor a file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ImgclfError(f"{path}: cannot read templates ({first_line(e)})") from None
        numbered = [(i, t.strip()) for i, t in enumerate(lines, 1) if t.strip() and not t.strip().startswith("#")]
        where = str(path)
    else:
        numbered, where = [(i, str(t).strip()) for i, t in enumerate(spec, 1)], "templates"
    for i, t in numbered:
        if "{}" not in t:
            raise ImgclfError(f"{where}:{i}: template {t!r} has no {{}} where the class name goes")
    if not numbered:
        raise ImgclfError(f"{where}: no templates")
    return [t for _, t in numbered]


def prompts_for(name: str, templates: Sequence[str]) -> list[str]:
    """The prompts of one class: every template with ``{}`` replaced by ``name`` (literally, so braces in a class
    name are safe)."""
    return [t.replace("{}", name) for t in templates]


@torch.no_grad()
def encode_classes(clip: nn.Module, tokenizer: Any, names: Sequence[str], templates: Sequence[str],
                   batch: int = 256) -> torch.Tensor:  # fmt: skip
    """(K, D) float32 class embeddings on CPU: per class the L2-normalised mean of the L2-normalised text
    embeddings of its prompts (CLIP's prompt ensembling; open_clip's ``build_zero_shot_classifier_legacy``
    computes the same, we keep our loop to check each name and to batch long template lists).

    Raises:
        ImgclfError: a class name that tokenises to nothing (its tokens equal those of the empty string after the
        tokenizer's own cleaning, e.g. ``&nbsp;``).
    """
    empty = tokenizer([""])
    blank = [n for n in names if torch.equal(tokenizer([n]), empty)]
    if blank:
        raise ImgclfError(f"class name(s) {', '.join(map(repr, blank[:5]))} tokenise to nothing (empty after the "
                          "tokenizer's cleaning); give names with visible words")  # fmt: skip
    device = next(clip.parameters()).device
    rows = []
    for name in names:
        texts = prompts_for(name, templates)
        emb = torch.cat([clip.encode_text(tokenizer(texts[i : i + batch]).to(device), normalize=True).float()
                         for i in range(0, len(texts), batch)])  # fmt: skip
        rows.append(F.normalize(emb.mean(0), dim=-1))  # (D,)
    return torch.stack(rows).cpu()


# --------------------------------------------------------------------------- the classifier module


def timm_pretrained_cfg(pp: dict[str, Any]) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` (input_size, mean, std, interpolation, crop_pct, crop_mode) for open_clip's
    preprocessing dict (``open_clip.get_model_preprocess_cfg``), so ``Preprocess.from_model`` gives the same
    resize, crop and normalisation: open_clip's eval resize keeps the whole crop (crop_pct 1.0); ``shortest``
    is timm's ``center``, ``squash`` its ``squash``, ``longest`` its ``border`` (timm pads with the mean colour,
    open_clip with ``fill_color``)."""
    size = pp.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mode = pp.get("resize_mode", "shortest")
    if mode not in _CROP_MODES:
        raise ImgclfError(f"open_clip resize_mode {mode!r} is not one of {', '.join(_CROP_MODES)}")
    interp = pp.get("interpolation", "bicubic")
    return {"input_size": (3, int(h), int(w)), "mean": tuple(pp["mean"]), "std": tuple(pp["std"]),
            "interpolation": "bicubic" if interp == "random" else interp,  # open_clip evaluates "random" as bicubic
            "crop_pct": 1.0, "crop_mode": _CROP_MODES[mode]}  # fmt: skip


class ZeroShotClassifier(nn.Module):
    """An open_clip image tower with a head of class text embeddings: ``logits = scale * normalize(visual(x)) @
    T^T (+ bias)`` (+ the Tip-Adapter cache term when one is set).

    timm's contract: ``forward(x)`` (B, 3, H, W) -> (B, K) logits; ``forward_features(x)`` and
    ``forward_head(f, pre_logits=True)`` -> the L2-normalised (B, D) image embedding; ``num_classes``,
    ``num_features`` (D), ``pretrained_cfg`` (open_clip's preprocessing), ``get_classifier()`` (the bias-free
    ``nn.Linear(D, K)`` whose rows are the unit class embeddings), ``reset_classifier(K)``.

    Args:
        visual: open_clip's image tower (``model.visual``): (B, 3, H, W) -> (B, D).
        class_embeddings: (K, D) L2-normalised class text embeddings (copied as they are into the head).
        logit_scale: the multiplier (CLIP's ``logit_scale.exp()``, about 100 for trained CLIP models).
        logit_bias: SigLIP's logit bias, None for models without one (stored as 0, which adds exactly nothing).
        preprocess_cfg: open_clip's preprocessing dict (size, mean, std, interpolation, resize_mode).

    Example:
        >>> import open_clip  # doctest: +SKIP
        >>> clip = open_clip.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
        >>> clf = ZeroShotClassifier(clip.visual, text_emb, clip.logit_scale.exp().item(), None,
        ...                          open_clip.get_model_preprocess_cfg(clip))  # doctest: +SKIP
    """

    logit_scale: torch.Tensor  # () multiplier
    logit_bias: torch.Tensor  # () added to every logit (0 without one)
    tip_keys: torch.Tensor  # (N, D) unit support embeddings (N = 0: no cache)
    tip_values: torch.Tensor  # (N, K) one-hot support labels
    tip_alpha: torch.Tensor  # () residual ratio
    tip_beta: torch.Tensor  # () sharpness

    def __init__(self, visual: nn.Module, class_embeddings: torch.Tensor, logit_scale: float,
                 logit_bias: float | None, preprocess_cfg: dict[str, Any]):  # fmt: skip
        super().__init__()
        emb = torch.as_tensor(class_embeddings).detach().float()
        if emb.ndim != 2:
            raise ImgclfError(f"zeroshot: class embeddings must be (K, D), got {tuple(emb.shape)}")
        k, d = emb.shape
        self.visual = visual
        self.num_features = d
        self.num_classes = k
        self.head: nn.Module = nn.Linear(d, k, bias=False)
        self.head.weight = nn.Parameter(emb.clone())
        self.has_bias = logit_bias is not None
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("logit_bias", torch.tensor(float(logit_bias or 0.0)))
        self.register_buffer("tip_keys", torch.zeros(0, d))
        self.register_buffer("tip_values", torch.zeros(0, k))
        self.register_buffer("tip_alpha", torch.tensor(DEFAULT_TIP_ALPHA))
        self.register_buffer("tip_beta", torch.tensor(DEFAULT_TIP_BETA))
        self.preprocess_cfg = dict(preprocess_cfg)
        self.pretrained_cfg = timm_pretrained_cfg(preprocess_cfg)

    # ---------------------------------------------------------------- timm's contract

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)  # (B, 3, H, W) -> (B, D) unit image embeddings

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits or isinstance(self.head, nn.Identity):
            return x  # (B, D)
        logits = self.head(x) * self.logit_scale + self.logit_bias  # (B, K)
        if self.tip_keys.shape[0]:  # Tip-Adapter: affinities to the cache, sharpened, times the one-hot labels
            affinity = x @ self.tip_keys.T  # (B, N) cosines
            logits = logits + self.tip_alpha * torch.exp(-self.tip_beta * (1 - affinity)) @ self.tip_values
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (B, K)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh (randomly initialised) head of ``num_classes`` rows (0: none, ``forward`` returns the
        embedding), as timm does; the Tip-Adapter cache (labelled with the old classes) is dropped."""
        d = self.num_features
        self.head = nn.Linear(d, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        self.set_tip(torch.zeros(0, d), torch.zeros(0, num_classes))

    # ---------------------------------------------------------------- classes and cache

    @property
    def class_embeddings(self) -> torch.Tensor:
        """(K, D) the head's rows."""
        return self.head.weight.detach()

    def set_classes(self, class_embeddings: torch.Tensor, tip_values: torch.Tensor | None = None) -> None:
        """Replace the head with ``class_embeddings`` (K, D) (copied as they are) and the cache labels with
        ``tip_values`` (N, K) (required when a cache is set)."""
        emb = torch.as_tensor(class_embeddings).detach().float().to(self.head.weight.device)
        self.head = nn.Linear(self.num_features, emb.shape[0], bias=False).to(emb.device)
        self.head.weight = nn.Parameter(emb.clone())
        self.num_classes = emb.shape[0]
        values = tip_values if tip_values is not None else torch.zeros(0, self.num_classes)
        self.set_tip(self.tip_keys, values, float(self.tip_alpha), float(self.tip_beta))

    def set_tip(self, keys: torch.Tensor, values: torch.Tensor, alpha: float = DEFAULT_TIP_ALPHA,
                beta: float = DEFAULT_TIP_BETA) -> None:  # fmt: skip
        """Set the Tip-Adapter cache: ``keys`` (N, D) unit support embeddings, ``values`` (N, K) their one-hot
        labels (N = 0: no cache). ImgclfError for shapes that do not fit the model or non-finite alpha/beta."""
        keys, values = torch.as_tensor(keys).detach().float(), torch.as_tensor(values).detach().float()
        d, k = self.num_features, self.num_classes
        if keys.ndim != 2 or keys.shape[1] != d or values.shape != (keys.shape[0], k):
            raise ImgclfError(f"tip-adapter: cache keys must be (N, {d}) and values (N, {k}), got "
                              f"{tuple(keys.shape)} and {tuple(values.shape)}")  # fmt: skip
        if not (torch.isfinite(torch.tensor([alpha, beta])).all() and beta >= 0):
            raise ImgclfError(f"tip-adapter: alpha must be finite and beta >= 0 (got {alpha}, {beta})")
        dev = self.logit_scale.device
        self.tip_keys, self.tip_values = keys.to(dev), values.to(dev)
        self.tip_alpha, self.tip_beta = torch.tensor(float(alpha), device=dev), torch.tensor(float(beta), device=dev)

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, dim={self.num_features}, scale={float(self.logit_scale):.4g}, "
                f"bias={float(self.logit_bias):.4g}, tip_cache={self.tip_keys.shape[0]}")  # fmt: skip


# --------------------------------------------------------------------------- open_clip models


def _close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"


def model_config(model: str) -> dict[str, Any]:
    """open_clip's config dict of the architecture ``model`` (a built-in name or ``hf-hub:ORG/REPO``).

    Raises:
        ImgclfError: an unknown name (suggesting close ones from ``open_clip.list_models()``), a CoCa model (no
        zero-shot head here), or a hub config that cannot be fetched.
    """
    oc = open_clip_module()
    try:
        cfg = oc.get_model_config(model if model.startswith(("hf-hub:", "local-dir:")) else model.replace("/", "-"))
    except Exception as e:  # noqa: BLE001 - network, missing file
        raise ImgclfError(f"open_clip model {model!r}: cannot read its config ({first_line(e)}); check the network "
                          "or pass a built-in name with --pretrained FILE") from None  # fmt: skip
    if cfg is None:
        raise ImgclfError(f"unknown open_clip model {model!r}; {_close_names(model, oc.list_models())}")
    if "multimodal_cfg" in cfg:
        raise ImgclfError(f"open_clip model {model!r} is a CoCa captioner; use a CLIP or SigLIP model")
    return cfg


def file_preprocess(model: str) -> tuple[dict[str, Any], str]:
    """open_clip's preprocessing for weights loaded from a file (which carry none) and where it came from: the
    preprocessing every published tag of ``model`` shares (SigLIP's are not open_clip's defaults), else open_clip's
    defaults with a warning (a silent wrong mean/std would cost accuracy without a sound)."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    oc = open_clip_module()
    base = asdict(PreprocessCfg())
    tags = oc.list_pretrained_tags_by_model(model)
    found = {json.dumps(merge_preprocess_dict(base, oc.get_pretrained_cfg(model, t)), sort_keys=True) for t in tags}
    if len(found) == 1:
        return json.loads(found.pop()), f"shared by its {len(tags)} published open_clip tag(s) ({tags[0]}, ...)"
    if tags:
        log.warning("%s: its published tags (%s) differ in preprocessing; a local file gets open_clip's defaults "
                    "(mean/std of OpenAI CLIP, bicubic, resize shortest side)", model, ", ".join(tags))  # fmt: skip
    return base, "open_clip defaults"


def create_clip(
    model: str, pretrained: str | None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """An open_clip model with weights from a hub tag or a local checkpoint file (``open_clip.create_model``, the
    library's own loading), and what the artifact records of it.

    ``model`` may also be ``hf-hub:ORG/REPO`` or ``local-dir:PATH`` (open_clip's schemas; their weights come with
    the config and ``pretrained`` is only recorded).

    Returns:
        ``(model in eval mode, info)``; ``info`` holds ``model``, ``model_cfg`` (the config dict the image tower
        is rebuilt from), ``pretrained`` (as given), ``preprocess_cfg`` and ``preprocess_source``.

    Raises:
        ImgclfError: unknown model or tag, a checkpoint that does not fit the architecture (naming the file and
        the model), or a failed download (check the network or pass a local file).
    """
    oc = open_clip_module()
    cfg = model_config(model)
    schema = model.startswith(("hf-hub:", "local-dir:"))  # weights come with the repo / folder: no tag
    pretrained = pretrained or ""
    local = not schema and os.path.isfile(pretrained)
    if not schema and not local and not oc.get_pretrained_cfg(model, pretrained):
        tags = oc.list_pretrained_tags_by_model(model)
        raise ImgclfError(f"--pretrained {pretrained!r}: neither a file nor a tag of open_clip model {model!r} "
                          f"(tags: {', '.join(tags) or 'none'})")  # fmt: skip
    try:
        clip = oc.create_model(model, pretrained=None if schema else pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - size mismatch, missing keys, network: all said in one line
        if local:
            raise ImgclfError(f"{pretrained}: checkpoint does not match open_clip model {model!r} ({first_line(e)}); "
                              "pass the --model it was saved from") from None  # fmt: skip
        raise ImgclfError(f"open_clip {model} {pretrained}: download failed ({first_line(e)}); check the network "
                          "or pass a local checkpoint file with --pretrained FILE") from None  # fmt: skip
    if local:
        pp, source = file_preprocess(model)
        pp["size"] = getattr(clip.visual, "image_size", pp["size"])
    else:
        pp, source = dict(oc.get_model_preprocess_cfg(clip)), f"open_clip tag {pretrained}"
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}  # JSON-ready
    info = {"model": model, "model_cfg": cfg, "pretrained": pretrained, "preprocess_cfg": pp,
            "preprocess_source": source}  # fmt: skip
    return clip.eval(), info


def zeroshot_from_clip(clip: nn.Module, class_embeddings: torch.Tensor, preprocess_cfg: dict[str, Any]):
    """The ``ZeroShotClassifier`` of an open_clip model (its image tower, scale and bias) and class embeddings."""
    bias = getattr(clip, "logit_bias", None)
    scale = float(clip.logit_scale.detach().exp().reshape(-1)[0])
    bias = None if bias is None else float(bias.detach().reshape(-1)[0])
    return ZeroShotClassifier(clip.visual, class_embeddings, scale, bias, preprocess_cfg).eval()


def text_state(clip: nn.Module) -> dict[str, torch.Tensor]:
    """What ``TEXT_FILE`` holds: every key of the open_clip model but the image tower's (open_clip's names)."""
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}


# --------------------------------------------------------------------------- tokenizers


def tokenizer_spec(tokenizer: Any, model: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """How to rebuild ``tokenizer`` offline: open_clip's ``SimpleTokenizer`` ships its vocabulary; a Hugging Face
    tokenizer is saved into the run (``TOKENIZER_DIR``)."""
    text_cfg = cfg.get("text_cfg", {})
    spec = {"context_length": int(tokenizer.context_length), "kwargs": text_cfg.get("tokenizer_kwargs") or {}}
    if type(tokenizer).__name__ == "SimpleTokenizer":
        return {"type": "simple", **spec}
    if type(tokenizer).__name__ == "HFTokenizer":
        return {"type": "hf", "mode": text_cfg.get("tokenizer_mode"), **spec}
    return {"type": "open_clip", "model": model, **spec}  # rebuilt by open_clip.get_tokenizer (may need the hub)


def get_tokenizer(model: str) -> Any:
    """open_clip's tokenizer for ``model`` (ImgclfError when it cannot be fetched)."""
    try:
        return open_clip_module().get_tokenizer(model)
    except Exception as e:  # noqa: BLE001 - Hugging Face download
        raise ImgclfError(
            f"open_clip {model}: cannot load its tokenizer ({first_line(e)}); check the network"
        ) from None


def rebuild_tokenizer(spec: dict[str, Any], run_dir: Path) -> Any:
    """The tokenizer ``tokenizer_spec`` described, from the run directory (offline for ``simple`` and ``hf``)."""
    oc = open_clip_module()
    if spec["type"] == "simple":
        return oc.SimpleTokenizer(context_length=spec["context_length"], **spec["kwargs"])
    if spec["type"] == "hf":
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(str(run_dir / TOKENIZER_DIR), context_length=spec["context_length"],
                           tokenizer_mode=spec.get("mode"), **spec["kwargs"])  # fmt: skip
    return get_tokenizer(spec["model"])


# --------------------------------------------------------------------------- loading a saved run


def zeroshot_info(art: Any, where: Path) -> dict[str, Any]:
    """The ``zeroshot`` section of a run's ``imgclf.json`` (ImgclfError naming the file when missing or bad)."""
    info = art.extra.get(KIND)
    need = ("model", "model_cfg", "pretrained", "preprocess_cfg", "templates", "tokenizer")
    if not isinstance(info, dict) or any(k not in info for k in need):
        raise ImgclfError(
            f"{where}: missing or incomplete '{KIND}' section of a zero-shot run (needs {', '.join(need)})"
        )
    return info


def build_visual(cfg: dict[str, Any]) -> nn.Module:
    """open_clip's image tower of the config dict ``cfg``, randomly initialised, without the hub (a timm trunk is
    built with ``pretrained=False``) and without the text tower. open_clip has no public function for this; its
    ``_build_vision_tower`` is what ``CLIP.__init__`` calls, so the weights' names match ``model.visual``'s."""
    from open_clip.model import _build_vision_tower

    vision = {**cfg["vision_cfg"], "timm_model_pretrained": False}
    return _build_vision_tower(cfg["embed_dim"], vision, cfg.get("quick_gelu", False), None)


def build_text_model(cfg: dict[str, Any], text_path: Path) -> nn.Module:
    """The open_clip model (``CLIP`` or ``CustomTextCLIP``) of ``cfg`` with the text weights of ``text_path``, for
    re-encoding class names offline. Its image tower stays randomly initialised (unused)."""
    from safetensors.torch import load_file

    oc = open_clip_module()
    cfg = copy.deepcopy(cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "timm_model_pretrained": False}
    if custom:
        cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_pretrained": False}
    if not text_path.is_file():
        raise ImgclfError(f"{text_path.parent}: the text tower {text_path.name} is missing; rebuild the run with "
                          "imgclf zeroshot --model ... --pretrained ...")  # fmt: skip
    try:
        model = (oc.CustomTextCLIP if custom else oc.CLIP)(**cfg)
        missing, unexpected = model.load_state_dict(load_file(str(text_path)), strict=False)
    except Exception as e:  # noqa: BLE001 - corrupt file, mismatched shapes
        raise ImgclfError(f"{text_path}: cannot load the text tower ({first_line(e)})") from None
    bad = [k for k in missing if not k.startswith("visual.")] + list(unexpected)
    if bad:
        raise ImgclfError(f"{text_path}: does not hold this model's text tower (keys {', '.join(bad[:3])})")
    return model.eval()


def load_zeroshot(wpath: Path, mpath: Path, art: Any, device: str | torch.device = "cpu") -> ZeroShotClassifier:
    """Rebuild the ``ZeroShotClassifier`` saved as ``wpath`` described by ``art`` (read from ``mpath``): the image
    tower from the stored open_clip config, never the hub or the text tower. ``imgclf.artifact.load_artifact``
    calls this for runs of kind ``zeroshot``.

    Raises:
        ImgclfError: missing section or weights, weights that do not fit, or weights and ``imgclf.json`` from
        different writes.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    info = zeroshot_info(art, mpath)
    if not wpath.is_file():
        raise ImgclfError(f"{wpath.parent}: weights file {wpath.name} is missing")
    try:
        with safe_open(str(wpath), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("class_names", "null"))
        state = load_file(str(wpath))
        clf = ZeroShotClassifier(build_visual(info["model_cfg"]), state["head.weight"], 1.0,
                                 0.0 if info.get("logit_bias") else None, info["preprocess_cfg"])  # fmt: skip
        clf.set_tip(state["tip_keys"], state["tip_values"])
        clf.load_state_dict(state, strict=True)
    except ImgclfError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt file, missing keys, another architecture
        raise ImgclfError(f"{wpath}: cannot load the zero-shot model {info['model']} ({first_line(e)})") from None
    if stored is None or [unicodedata.normalize("NFC", c) for c in stored] != art.class_names:
        raise ImgclfError(f"{wpath.parent}: {wpath.name} and {mpath.name} come from different writes (interrupted "
                          "save?); rebuild the run")  # fmt: skip
    if clf.num_classes != len(art.class_names):
        raise ImgclfError(f"{wpath}: {clf.num_classes} class rows for {len(art.class_names)} class names")
    return clf.to(device).eval()


# --------------------------------------------------------------------------- fine-tuning from a zero-shot run


def zeroshot_for_training(run: Path, meta: dict[str, Any], class_names: Sequence[str]) -> ZeroShotClassifier:
    """The zero-shot model of run directory ``run`` (its ``imgclf.json`` ``meta``) as the start of fine-tuning on
    data with ``class_names``: the image tower and the text-embedding head, its rows in the data's class order
    (classes of the run the data lacks are left out). The Tip-Adapter cache is dropped: fine-tuning moves the
    image embeddings it was keyed by. The model carries what the trained run needs to be a zero-shot run again
    (``artifact_kind``, ``artifact_section``, ``artifact_files``: its text tower and tokenizer, for class edits).

    The zero-shot head as the initialisation of fine-tuning is the FLYP/WiSE-FT practice (Wortsman et al. 2022,
    "Robust fine-tuning of zero-shot models": a zero-shot head beats a random one, and weight-space interpolation
    with the zero-shot model (``imgclf wise-ft``) keeps its robustness).

    Raises:
        ImgclfError: data classes the run has no text embedding for (add them first: ``imgclf zeroshot RUN
        --add-class NAME``), or an unreadable run.
    """
    from types import SimpleNamespace

    names = [unicodedata.normalize("NFC", c) for c in meta.get("class_names") or []]
    wanted = [unicodedata.normalize("NFC", c) for c in class_names]
    missing = [c for c in wanted if c not in names]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ImgclfError(f"weights {run}: the zero-shot run has no text embedding for class(es) {shown}; add them "
                          f"by text first: imgclf zeroshot {run} --add-class NAME")  # fmt: skip
    art = SimpleNamespace(extra=meta, class_names=names)
    clf = load_zeroshot(Path(run) / "model.safetensors", Path(run) / "imgclf.json", art)
    if clf.tip_keys.shape[0]:
        log.info("weights %s: its Tip-Adapter cache (%d images) is dropped for fine-tuning", run, clf.tip_keys.shape[0])
    clf.set_tip(torch.zeros(0, clf.num_features), torch.zeros(0, clf.num_classes))
    clf.set_classes(clf.class_embeddings[[names.index(c) for c in wanted]])
    section = {k: v for k, v in meta[KIND].items() if k not in ("tip", "zeroshot_top1")}
    section["prompts"] = {c: p for c, p in (section.get("prompts") or {}).items() if c in wanted}
    section.update(tip=None, fine_tuned_from=str(Path(run).resolve()))
    clf.artifact_kind, clf.artifact_section = KIND, section
    clf.artifact_files = [p for p in (Path(run) / TEXT_FILE, Path(run) / TOKENIZER_DIR) if p.exists()]
    return clf.train()
