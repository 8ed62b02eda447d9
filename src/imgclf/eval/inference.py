"""A saved run over data: its decoding (``run_decode_policy``), its eval preprocessing or TTA views, the one
inference loop (``imgclf.models.inference.infer``), with the inputs checked and the skipped ones logged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from ..artifact import Artifact, load_artifact
from ..data.images import MAX_ASPECT, PILLOW_MAX_PIXELS, DecodePolicy
from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.sources import LabelFormat, Samples
from ..dist import resolve_device
from ..models.inference import Outputs, infer, reparameterized
from .tta import tta_transform

log = logging.getLogger("imgclf")


def run_decode_policy(art: Artifact, max_pixels: int | None = PILLOW_MAX_PIXELS,
                      max_aspect: float | None = MAX_ASPECT) -> DecodePolicy:  # fmt: skip
    """How a run decodes its inputs (as in training: stored in the artifact) with this command's limits."""
    return art.preprocessing.decoder(max_pixels, max_aspect)


def run_label_format(art: Artifact) -> LabelFormat:
    """How labelled data is read for a run (eval, calibrate, export checks): as its kind (single- or multi-label;
    a single-label source read for a multi-label run becomes one-hot label sets) with its label-set separator."""
    data = art.config.get("data", {})
    return LabelFormat("multi_label" if art.multi_label else "single_label", None, data.get("label_sep") or "|",
                       data.get("image_column"), data.get("label_column"))  # fmt: skip


def check_inputs(samples: Samples, progress: bool = False) -> None:
    """Read the inputs' headers (``Samples.check_files``: non-images and images over the limits are known
    before decoding) and say once what discovery noticed (hidden files ignored, animations read as one frame)."""
    samples.check_files(progress=progress)
    for note in samples.notes:
        log.warning(note)


def infer_run(
    run: str | Path | Artifact,
    open_samples: Callable[[Artifact, DecodePolicy], Samples],
    *,
    batch_size: int = 64,
    num_workers: int = -1,
    device: str = "auto",
    strict_images: bool = False,
    progress: bool = True,
    features: bool = False,
    tta: str | None = None,
    tta_merge: str = "mean_logits",
    desc: str = "infer",
    max_pixels: int | None = PILLOW_MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
    loaded: tuple[nn.Module, Artifact] | None = None,
) -> tuple[Outputs, Artifact, Samples, SkipLog]:
    """Load a saved run and run it over ``open_samples(artifact, decode_policy)`` with the artifact's decoding
    (bit depth, background; within ``max_pixels``/``max_aspect``) and eval preprocessing (or its TTA views).
    ``loaded``: the (model on ``device``, artifact) of an earlier call, to run more data without loading again."""
    dev = resolve_device(device)
    model, art = loaded if loaded is not None else load_artifact(run, dev)
    model = reparameterized(model, art.preprocessing.input_size)  # MobileOne, FastViT, ...: the fused form
    samples = open_samples(art, run_decode_policy(art, max_pixels, max_aspect))
    check_inputs(samples, progress)
    transform = tta_transform(art.preprocessing, tta) if tta else art.preprocessing.eval()
    loader = make_loader(ImageDataset(samples, transform), batch_size, train=False, num_workers=num_workers,
                         pin_memory=dev.type == "cuda")  # fmt: skip
    skips = SkipLog(strict=strict_images)
    out = infer(model, loader, dev, skips=skips, progress=progress, desc=desc, features=features, tta_merge=tta_merge,
                temperature=art.temperature, bias=art.calibration.get("bias"), multi_label=art.multi_label,
                channels_last=dev.type != "mps")  # fmt: skip
    return out, art, samples, skips
