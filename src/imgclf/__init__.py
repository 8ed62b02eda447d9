"""imgclf: from a folder of images to a trained, evaluated classifier saved as one artifact.

Importing ``imgclf`` is cheap and has no side effects; the heavy modules load on first use.

Example:
    >>> import imgclf
    >>> result = imgclf.train()  # doctest: +SKIP
    >>> imgclf.evaluate(result.run_dir, "builtin:fashion-mnist:test")["top1"]  # doctest: +SKIP
    0.91
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Config",
    "ImgclfError",
    "audit",
    "calibrate",
    "compress",
    "compress_config",
    "convert",
    "evaluate",
    "evaluate_ensemble",
    "explain",
    "load",
    "make_config",
    "predict",
    "report",
    "retrain",
    "retrain_config",
    "train",
]
_API = frozenset(__all__) - {"Config", "ImgclfError"}

if TYPE_CHECKING:  # pragma: no cover
    from .api import (
        audit,
        calibrate,
        compress,
        compress_config,
        convert,
        evaluate,
        evaluate_ensemble,
        explain,
        load,
        make_config,
        predict,
        report,
        retrain,
        retrain_config,
        train,
    )
    from .config import Config
    from .errors import ImgclfError


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "Config":
        from .config import Config

        return Config
    if name == "ImgclfError":
        from .errors import ImgclfError

        return ImgclfError
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
