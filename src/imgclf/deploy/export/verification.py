"""Images for verifying an export against PyTorch (and for int8 calibration), the comparison itself, and
``_Job``: what every format's export needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...artifact import Artifact
from ...data.splits import run_split
from ...errors import ImgclfError
from ...eval.inference import run_label_format
from .graph import ServingModel, to_input


def verification_batches(art: Artifact, data: Any, n: int, batch: int = 32, split: str = "val"):
    """Up to ``n`` images as (uint8 NCHW pixels at the input size, labels) batches.

    From ``data`` (any source, or labelled ``Samples`` already opened; the pixels are the resized and
    centre-cropped images, the artifact's eval transform without normalisation, so PyTorch and the exported graph
    see exactly the same numbers), or, without data, ``generated_batches``: the run's training data is never needed.
    """
    from ...data.sources import open_source

    if not data:
        return generated_batches(art, n, batch)
    if isinstance(data, str | Path):
        data = open_source(data, split, art.preprocessing.decoder(), run_label_format(art))
    samples = data.remap_to(art.class_names)
    return pixel_batches(samples, art, n, batch, seed=0)


def generated_batches(art: Artifact, n: int, batch: int = 32, seed: int = 0):
    """``n`` generated pictures (unlabelled: label -1) as (uint8 NCHW pixels, labels) batches: smooth random
    colour fields (a 4 x 4 grid upsampled, plus noise), which give the model varied, confident answers,
    unlike white noise, so a top-1 agreement on them means something."""
    c, h, w = art.preprocessing.input_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        grid = torch.rand(b, c, 4, 4, generator=g) * 255
        x = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        x = (x + torch.randn(b, c, h, w, generator=g) * 12).clamp(0, 255).round().to(torch.uint8)
        out.append((x, torch.full((b,), -1, dtype=torch.long)))
    return out


def _calibration_batches(run_dir: Path, art: Artifact, data: str | None, n: int, held_n: int = 0, seed: int = 1):
    """Training images (not the verification ones) for int8 calibration: ``(calibration batches, held-out
    batches)``, ``n`` and up to ``held_n`` images from one seeded permutation, so the two never share an
    image (the held-out ones judge the quantized model on images it was not calibrated on)."""
    from ...data.sources import open_source

    if data:
        samples = open_source(data, "train", art.preprocessing.decoder(), run_label_format(art))
    else:
        samples = run_split(art, "train", "--calib-data")
    idx = np.random.default_rng(seed).permutation(len(samples))
    calib = list(pixel_batches(samples, art, n, idx=idx[:n]))
    rest = idx[n : n + held_n]
    return calib, (list(pixel_batches(samples, art, held_n, idx=rest)) if len(rest) else [])


def pixel_batches(samples, art: Artifact, n: int, batch: int = 32, seed: int = 0, idx: np.ndarray | None = None):
    """Up to ``n`` random images of ``samples`` (or exactly the indices ``idx``) as (uint8 NCHW pixels at the
    input size, labels) batches."""
    to_pixels = art.preprocessing.chw_pixels()
    if idx is None:
        idx = np.random.default_rng(seed).permutation(len(samples))[:n]
    xs, ys = [], []
    for i in idx:
        try:
            img = samples.load(int(i))
        except Exception:  # noqa: BLE001 - an unreadable file is just not used
            continue
        xs.append(to_pixels(img))
        ys.append(torch.as_tensor(samples.labels[i]).long())  # a class index, or a (K,) 0/1 label set
    if not xs:
        raise ImgclfError(f"{samples.name}: no readable images for the export")
    for s in range(0, len(xs), batch):
        yield torch.stack(xs[s : s + batch]), torch.stack(ys[s : s + batch])


def decider(art: Artifact):
    """``logits (B, K) -> decisions``: (B,) argmax classes, or for a multi-label run (B, K) label sets by its
    calibration and decision thresholds (what predict and serve answer)."""
    from ...eval.trust import Trust

    trust = Trust.of(art)
    if not trust.multi_label:
        return lambda z: torch.as_tensor(z).argmax(1)
    return lambda z: trust.decide(trust.probs(torch.as_tensor(z)))


#: an fp32 export agrees with PyTorch when its logits are this close relative to their scale ...
PARITY_REL_TOL = 1e-3
#: ... and this share of images get the same top-1 class
PARITY_MIN_AGREEMENT = 0.999


def verify(run_fn, serving: ServingModel, batches, art: Artifact, pixels: str) -> dict[str, Any]:
    """Compare ``run_fn(input) -> logits`` with PyTorch on the verification batches.

    ``max_rel_logit_diff`` is the largest ``max_k |exported - torch| / max_k |torch|`` over images: a
    relative error, so it neither cries wolf on models whose logits are ~1e10 (MobileOne with random weights)
    nor misses differences on models whose logits are ~1e-3; ``max_abs_logit_diff`` is kept for reference.
    ``top1_*`` compare the run's decisions (``decision``): the top-1 class, or for multi-label runs the whole
    label set under the run's thresholds (agreement = identical sets; accuracy = exact match)."""
    diffs, rels, agree, n, known_n, correct_ref, correct = [], [], 0, 0, 0, 0, 0
    decide = decider(art)
    for px, y in batches:
        x = to_input(px, pixels, art)
        with torch.no_grad():
            ref = serving(torch.from_numpy(x))[0].float()
        got = torch.from_numpy(np.asarray(run_fn(x), dtype=np.float32))
        err = (got - ref).abs().amax(1)  # (B,)
        diffs.append(float(err.max()))
        rels.append(float((err / ref.abs().amax(1).clamp_min(1e-12)).max()))
        d_ref, d_got = decide(ref), decide(got)
        agree += int(_rows_equal(d_got, d_ref).sum())
        known = (y >= 0).reshape(len(y), -1).all(1)  # generated pictures are unlabelled (-1)
        if known.any():
            correct_ref += int(_rows_equal(d_ref[known], y[known]).sum())
            correct += int(_rows_equal(d_got[known], y[known]).sum())
        n, known_n = n + len(y), known_n + int(known.sum())
    k = max(known_n, 1)
    return {
        "decision": "label set" if art.multi_label else "top-1",
        "images": n,
        "max_abs_logit_diff": max(diffs),
        "max_rel_logit_diff": max(rels),
        "top1_agreement": agree / n,
        "labelled": known_n,
        "top1_torch": correct_ref / k,
        "top1_exported": correct / k,
        "top1_drop_points": round(100 * (correct_ref - correct) / k, 3),
    }


def _rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) whether each row's decision (a class, or a (K,) label set) is the same in ``a`` and ``b``."""
    a, b = a.long(), b.long()
    return (a == b).reshape(len(a), -1).all(1)


def parity_ok(v: dict[str, Any]) -> bool:
    """An fp32 export's verification (``verify``) within ``PARITY_REL_TOL`` and ``PARITY_MIN_AGREEMENT``."""
    rel = v.get("max_rel_logit_diff", 0.0)
    return v["top1_agreement"] >= PARITY_MIN_AGREEMENT and rel <= PARITY_REL_TOL


@dataclass
class _Job:
    """What every format's export needs."""

    run_dir: Path
    art: Artifact
    serving: ServingModel
    meta: dict[str, str]
    batches: list  # verification (uint8 NCHW pixels, labels)
    pixels: str
    out_dir: Path
    onnx_path: Path  # the fp32 ONNX graph (model.onnx, or a staged hidden file for the other formats)
    path: Path  # the file this format leaves in out_dir (FILES[fmt])

    def verify(self, run_fn) -> dict[str, Any]:
        return verify(run_fn, self.serving, self.batches, self.art, self.pixels)
