"""Robustness to distribution shift before deployment: common corruptions at five severities
(``imgclf eval RUN --data D --shift corruptions``).

The corruptions are the noise, blur, photometric and digital families of Hendrycks & Dietterich 2019
("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ImageNet-C / CIFAR-10-C), without
the weather ones (snow, frost, fog, spatter need their texture files and suit photos only). Their severity
parameters are those of CIFAR-10-C (``make_cifar_c.py`` of github.com/hendrycks/robustness), made for ~32 px images;
blur and pixel-grid sizes scale with the image's shorter side / 32, so a 224 px image gets blurs of the same
relative extent. They act on the decoded image at its own resolution (what a worse camera or channel delivers),
before the run's eval preprocessing. Each image's corruption is seeded by (seed, corruption, severity, index): a
re-run corrupts exactly the same way.

We write the corruption functions ourselves (numpy / PIL / torch ops, ~80 lines): ``imagecorruptions`` (the
reference port) needs images of at least 32 px (Fashion-MNIST has 28), pins ImageNet parameters, imports
``pkg_resources`` and the removed ``scipy.ndimage.interpolation``, and pulls a second OpenCV build next to the
headless one; torchvision has noise, blur and JPEG but not the shot / impulse noise, defocus, motion blur or the
severity tables.

Reported per corruption and severity: top-1 (or the task's headline metric), ECE after the run's calibration and
the OOD rejection rate at the run's threshold (the share of shifted images the server would answer "unknown");
then per corruption the mean over severities, the mean corruption accuracy (mCA) over all, and the relative drop
``1 - mCA / clean accuracy``.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ..data.sources import Samples
from ..errors import ImgclfError
from .trust import calibration_report

SEVERITIES = (1, 2, 3, 4, 5)

# --------------------------------------------------------------------------- the corruptions (CIFAR-10-C parameters)


def _f(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]


def _img(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255 + 0.5))


def _scale(img: Image.Image) -> float:
    return min(img.size) / 32.0  # blur sizes relative to CIFAR's 32 px


def gaussian_noise(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    x = _f(img)
    return _img(x + rng.normal(size=x.shape, scale=c))


def shot_noise(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    return _img(rng.poisson(_f(img) * c) / c)


def impulse_noise(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    x = _f(img).copy()
    hit = rng.random(x.shape) < c  # salt and pepper on that share of the values (skimage's "s&p", amount c)
    x[hit] = rng.random(int(hit.sum())) < 0.5
    return _img(x)


def _convolve(img: Image.Image, kernel: torch.Tensor) -> Image.Image:
    """Each channel convolved with the 2-D ``kernel`` (sums to 1), edges reflected."""
    x = torch.from_numpy(_f(img)).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    kh, kw = kernel.shape
    x = F.pad(x, (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2), mode="replicate")
    return _img(F.conv2d(x, kernel[None, None]).squeeze(1).permute(1, 2, 0).numpy())


def defocus_blur(img: Image.Image, c: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    radius, alias = c[0] * _scale(img), c[1] * _scale(img)
    r = max(1, math.ceil(radius))
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    disk = ((xx**2 + yy**2) <= max(radius, 0.5) ** 2).float()  # a disk of the radius (the lens's circle of confusion)
    out = _convolve(img, disk / disk.sum())
    return out.filter(ImageFilter.GaussianBlur(alias))  # its anti-aliasing blur


def motion_blur(img: Image.Image, c: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """A one-sided Gaussian-weighted line at a random angle (ImageMagick's motion blur, which CIFAR-10-C uses)."""
    sigma = c[1] * _scale(img)
    n = max(2, math.ceil(3 * sigma) + 1)
    angle = rng.uniform(-45, 45) * math.pi / 180
    w = torch.exp(-(torch.arange(n, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = torch.zeros(2 * n - 1, 2 * n - 1)
    for d, weight in enumerate(w):
        k[n - 1 + round(d * math.sin(angle)), n - 1 + round(d * math.cos(angle))] += weight
    return _convolve(img, k / k.sum())


def gaussian_blur(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(c * _scale(img)))  # PIL's radius is the standard deviation


def brightness(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255.0
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return Image.fromarray(np.uint8(hsv * 255 + 0.5), "HSV").convert("RGB")


def contrast(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    x = _f(img)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _img((x - mean) * c + mean)


def jpeg_compression(img: Image.Image, c: int, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(c))
    return Image.open(buf).convert("RGB")


def pixelate(img: Image.Image, c: float, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    small = img.resize((max(1, round(w * c)), max(1, round(h * c))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.BOX)


#: name -> (function, the five severity parameters of CIFAR-10-C), grouped as Hendrycks & Dietterich do
CORRUPTIONS: dict[str, tuple[Callable, Sequence[Any]]] = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    "motion_blur": (motion_blur, ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))),
    "gaussian_blur": (gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "brightness": (brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "contrast": (contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "jpeg_compression": (jpeg_compression, (80, 65, 58, 50, 40)),
    "pixelate": (pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
}


def corrupt(img: Image.Image, name: str, severity: int, seed: int = 0, index: int = 0) -> Image.Image:
    """``img`` (RGB) under corruption ``name`` at ``severity`` 1-5, seeded by (seed, corruption, severity, index).

    Raises:
        ImgclfError: an unknown corruption or a severity outside 1-5.

    Example:
        >>> im = Image.new("RGB", (28, 28), (120, 60, 200))
        >>> corrupt(im, "contrast", 5).getpixel((3, 3)) == im.getpixel((3, 3))  # a flat image keeps its mean
        True
    """
    if name not in CORRUPTIONS:
        raise ImgclfError(f"unknown corruption {name!r} (known: {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ImgclfError(f"corruption severity must be 1-5 (got {severity})")
    fn, params = CORRUPTIONS[name]
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity, index])
    return fn(img.convert("RGB"), params[severity - 1], rng)


@dataclasses.dataclass
class CorruptedSamples(Samples):
    """``Samples`` whose images load corrupted (``corrupt``; item ``i`` seeded by its position in the full set)."""

    corruption: str = ""
    severity: int = 1
    seed: int = 0
    positions: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def load(self, i: int) -> Image.Image:
        pos = int(self.positions[i]) if self.positions is not None else i
        return corrupt(super().load(i), self.corruption, self.severity, self.seed, pos)

    def subset(self, idx: np.ndarray | list[int]) -> CorruptedSamples:
        out = super().subset(idx)
        out.positions = (self.positions if self.positions is not None else np.arange(len(self)))[np.asarray(idx)]
        return out


def corrupted(samples: Samples, name: str, severity: int, seed: int = 0) -> CorruptedSamples:
    """``samples`` loading under corruption ``name`` at ``severity``."""
    fields = {f.name: getattr(samples, f.name) for f in dataclasses.fields(Samples)}
    return CorruptedSamples(**fields, corruption=name, severity=severity, seed=seed,
                            positions=np.arange(len(samples)))  # fmt: skip


def parse_corruptions(spec: str | Sequence[str] | None) -> list[str]:
    """``corruptions`` / None (all), or names joined with commas; ImgclfError naming an unknown one."""
    if spec is None or spec == "corruptions" or spec == ["corruptions"]:
        return list(CORRUPTIONS)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad or not names:
        raise ImgclfError(f"--shift: unknown corruption {bad[0] if bad else spec!r} (known: corruptions = "
                          f"{', '.join(CORRUPTIONS)})")  # fmt: skip
    return names


def summarise(clean: dict[str, float], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-corruption means over severities, mCA and the relative drop from the per-(corruption, severity) rows
    (each with ``corruption``, ``severity``, ``top1``, ``ece``, ``rejected``)."""
    per: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["corruption"] for r in rows):
        mine = [r for r in rows if r["corruption"] == name]
        per[name] = {k: float(np.mean([r[k] for r in mine if r.get(k) is not None]))
                     for k in ("top1", "ece", "rejected") if any(r.get(k) is not None for r in mine)}  # fmt: skip
    mca = float(np.mean([p["top1"] for p in per.values()]))
    return {"clean": clean, "per_corruption": per, "mca": mca,
            "relative_drop": 1 - mca / clean["top1"] if clean["top1"] else None,
            "mean_ece": float(np.mean([p["ece"] for p in per.values() if "ece" in p])) if per else None}  # fmt: skip


def evaluate_shift(
    run_dir: str | Path,
    data: str,
    *,
    split: str = "test",
    corruptions: str | Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    max_images: int | None = None,
    seed: int = 0,
    **run_opts: Any,
) -> dict[str, Any]:
    """The run on ``data`` clean and under each corruption x severity (``corrupt``); see the module docstring.

    Args:
        run_dir: a run directory.
        data: labelled images (folder, CSV, .npz, builtin); ``split`` of a multi-split source.
        corruptions: names (a list or comma-separated) or None / ``corruptions``: all of ``CORRUPTIONS``.
        severities: which of 1-5.
        max_images: at most this many images (a stratified, seeded choice), for large test sets.
        seed: the seed of the choice and of every corruption's randomness.
        **run_opts: ``infer_run``'s batch_size, num_workers, device, strict_images, progress, max_pixels, ...

    Returns:
        ``{"data", "n", "seed", "rows": [{"corruption", "severity", "top1", "ece", "rejected"}, ...], "clean",
        "per_corruption", "mca", "relative_drop", "mean_ece", "ood_score"}``; ``rejected`` is None for runs
        without OOD thresholds.

    Raises:
        ImgclfError: unknown corruption, bad severity, multi-label or unlabelled data, no readable image.
    """
    from ..artifact import load_artifact
    from ..data.sources import open_source, stratified_split
    from ..dist import resolve_device
    from .inference import infer_run, run_label_format
    from .trust import Trust

    names = parse_corruptions(corruptions)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ImgclfError(f"corruption severities must be 1-5 (got {bad[0]})")
    loaded = load_artifact(run_dir, resolve_device(run_opts.get("device", "auto")))
    art = loaded[1]
    if art.multi_label:
        raise ImgclfError(f"{run_dir}: --shift measures single-label runs (top-1); this run is multi-label")
    trust = Trust.load(run_dir, art)

    def base(a, decode) -> Samples:
        s = open_source(data, split, decode, run_label_format(a)).remap_to(a.class_names)
        if max_images and len(s) > max_images:
            keep, _ = stratified_split(s.labels, 1 - max_images / len(s), seed)
            s = s.subset(np.sort(keep))
        return s

    def measure(open_fn) -> dict[str, Any]:
        out, _, samples, _ = infer_run(run_dir, open_fn, features=trust.needs_features, loaded=loaded, desc="shift",
                                       **run_opts)  # fmt: skip
        if len(out.labels) == 0:
            raise ImgclfError(f"{samples.name}: no readable labelled images")
        top1 = float((out.logits.argmax(1) == out.labels).float().mean())
        ece = calibration_report(trust, out.logits, out.labels)["after"]["ece"]
        t = trust.thresholds.get(trust.ood_score)
        rejected = None
        if t is not None:
            rejected = float((trust.scores(out.ood_logits, out.features)[trust.ood_score] < t).float().mean())
        return {"top1": top1, "ece": float(ece), "rejected": rejected, "n": len(out.labels), "data": samples.name}

    clean = measure(base)
    rows = []
    for name in names:
        for sev in severities:
            m = measure(lambda a, d, name=name, sev=sev: corrupted(base(a, d), name, sev, seed))
            rows.append({"corruption": name, "severity": sev, **{k: m[k] for k in ("top1", "ece", "rejected")}})
    return {"data": clean.pop("data"), "n": clean.pop("n"), "seed": seed, "ood_score": trust.ood_score,
            "rows": rows, **summarise(clean, rows)}  # fmt: skip


def save_shift(run_dir: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``robustness.json`` into the run directory (the report's robustness section reads it)."""
    from ..io import write_json

    path = Path(run_dir) / ROBUSTNESS_FILE
    write_json(path, doc)
    return path


ROBUSTNESS_FILE = "robustness.json"
