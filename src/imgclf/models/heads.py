"""Fine-grained heads: the global pooling of a CNN backbone replaced by GeM, bilinear or compact bilinear pooling.

The model stays a timm model: ``forward_features`` gives the (N, C, H, W) map, ``forward_head(x, pre_logits=True)``
the pooled (N, D') features, ``get_classifier()`` an ``nn.Linear(D', K)`` and ``num_features`` is D'. Only the
pooling module (timm's ``SelectAdaptivePool2d``, wherever the family keeps it: ``global_pool`` of EfficientNet,
MobileNet and ResNet, ``head.global_pool`` of ConvNeXt, RegNet, NFNet) and, when the width changes, the classifier
are swapped; the pooling's parameters count as head parameters (``models.transfer.head_names``).

- ``gem``: generalized mean ``(mean x^p)^(1/p)`` per channel with a learnable ``p`` (Radenović et al. 2018,
  "Fine-tuning CNN image retrieval with no human annotation"); D' = C. p = 1 is average pooling, large p
  approaches max pooling.
- ``bilinear``: a 1x1 conv reduces C to ``dim`` channels, then the average outer product of the local features
  over the H x W locations, signed square root and L2 normalisation (Lin et al. 2015, "Bilinear CNN models for
  fine-grained visual recognition"); D' = dim^2 (65536 for dim 256).
- ``compact_bilinear``: the same bilinear matrix mapped to ``sketch_dim`` values by a Tensor Sketch (Gao et al.
  2016, "Compact bilinear pooling"; Pham & Pagh 2013): entry (i, j) adds ``s1[i] s2[j] B[i, j]`` to bin
  ``(h1[i] + h2[j]) mod sketch_dim``, which is exactly the count-sketch convolution Gao et al. compute with FFTs
  (the sketch is linear, so sketching the pooled matrix equals pooling the per-location sketches). The hashes come
  from a fixed seed and live in the module's buffers, so a saved model reloads identically; D' = ``sketch_dim``.

Example:
    >>> import timm
    >>> m = timm.create_model("test_efficientnet", num_classes=3)
    >>> set_head(m, {"kind": "bilinear", "dim": 8}, "test_efficientnet")
    True
    >>> m.forward_head(m.forward_features(torch.zeros(2, 3, 64, 64)), pre_logits=True).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import NormMlpClassifierHead, SelectAdaptivePool2d

from ..errors import ImgclfError, first_line

HEADS = ("linear", "gem", "bilinear", "compact_bilinear")
#: the Tensor Sketch hashes' seed (stored in every compact bilinear module's buffers with the hashes themselves)
SKETCH_SEED = 0
#: widest pooled features the OOD feature statistics (Ledoit-Wolf covariance, k-NN bank) are fitted for
FEATURE_STATS_MAX_DIM = 4096


class GeM(nn.Module):
    """Generalized-mean pooling (Radenović et al. 2018): (N, C, H, W) -> (N, C), or (N, C, 1, 1) without ``flatten``.

    ``p`` is learnable (initialised to ``p``); activations are clamped at ``eps`` so fractional powers stay real.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, flatten: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps, self.flatten = eps, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp(min=self.eps).pow(self.p).mean((2, 3), keepdim=not self.flatten)  # (N, C[, 1, 1])
        return y.pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.3g}, eps={self.eps}, flatten={self.flatten}"


def signed_sqrt_l2(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, D) -> (N, D): ``sign(z) sqrt(|z| + eps)``, then unit L2 norm per row (Lin et al. 2015)."""
    z = z.sign() * (z.abs() + eps).sqrt()
    return F.normalize(z, dim=1)


class BilinearPool(nn.Module):
    """Bilinear pooling (Lin et al. 2015): (N, C, H, W) -> 1x1 conv to ``dim`` channels -> the mean outer product
    over the H*W locations (N, dim, dim) -> flattened, signed square root, L2 -> (N, dim^2) (or (N, dim^2, 1, 1)
    without ``flatten``). The normalisation runs in float32 (under autocast the outer products may not)."""

    def __init__(self, in_chs: int, dim: int = 256, flatten: bool = True):
        super().__init__()
        self.reduce = nn.Conv2d(in_chs, dim, kernel_size=1, bias=False)
        self.dim, self.flatten = dim, flatten

    @property
    def out_features(self) -> int:
        return self.dim * self.dim

    def bilinear(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, dim, dim): the mean over locations of the reduced features' outer products."""
        f = self.reduce(x).flatten(2)  # (N, dim, H*W)
        return torch.bmm(f, f.transpose(1, 2)).float() / f.shape[2]

    def pooled(self, b: torch.Tensor) -> torch.Tensor:
        """(N, dim, dim) -> (N, D') before normalisation."""
        return b.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = signed_sqrt_l2(self.pooled(self.bilinear(x)))  # (N, D')
        return z if self.flatten else z[:, :, None, None]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_features={self.out_features}, flatten={self.flatten}"


class CompactBilinearPool(BilinearPool):
    """Compact bilinear pooling by Tensor Sketch (Gao et al. 2016): the bilinear matrix (N, dim, dim) sketched to
    (N, ``sketch_dim``), then signed square root and L2. ``h1``, ``h2`` (bins) and ``s1``, ``s2`` (signs) of the
    two count sketches are drawn from ``seed`` and stored as buffers with it."""

    def __init__(self, in_chs: int, dim: int = 256, sketch_dim: int = 8192, flatten: bool = True,
                 seed: int = SKETCH_SEED):  # fmt: skip
        super().__init__(in_chs, dim, flatten)
        g = torch.Generator().manual_seed(seed)
        self.sketch_dim = sketch_dim
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        for i in (1, 2):
            self.register_buffer(f"h{i}", torch.randint(0, sketch_dim, (dim,), generator=g))
            self.register_buffer(f"s{i}", torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1)

    @property
    def out_features(self) -> int:
        return self.sketch_dim

    def pooled(self, b: torch.Tensor) -> torch.Tensor:
        """(N, dim, dim) -> (N, sketch_dim): ``out[(h1[i] + h2[j]) mod d] += s1[i] s2[j] b[i, j]``."""
        bins = ((self.h1[:, None] + self.h2[None, :]) % self.sketch_dim).flatten()  # (dim^2,)
        signed = (b * (self.s1[:, None] * self.s2[None, :])).flatten(1)  # (N, dim^2)
        out = signed.new_zeros(signed.shape[0], self.sketch_dim)
        # scatter_add exports as ONNX ScatterElements, which ONNX Runtime sums like PyTorch; index_add exports as
        # ScatterND, whose sums differed by up to 2e-2 of the logits (8192 bins, 65536 entries) and failed parity
        return out.scatter_add(1, bins.expand(signed.shape[0], -1), signed)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sketch_dim={self.sketch_dim}, flatten={self.flatten}"


POOLS = (GeM, BilinearPool)  # CompactBilinearPool is a BilinearPool


def head_spec(cfg: Any) -> dict[str, Any] | None:
    """What ``set_head`` builds for a ``config.ModelConfig`` (JSON-ready, stored as ``Artifact.head``); None
    for timm's own linear head."""
    if cfg.head == "linear":
        return None
    if cfg.head == "gem":
        return {"kind": "gem", "p": cfg.gem_p}
    spec = {"kind": cfg.head, "dim": cfg.bilinear_dim}
    return spec | ({"sketch_dim": cfg.compact_dim, "seed": SKETCH_SEED} if cfg.head == "compact_bilinear" else {})


def head_width(spec: dict[str, Any] | None) -> int | None:
    """D' of ``spec``'s features; None when it is the backbone's own width (linear, gem)."""
    if spec is None or spec["kind"] == "gem":
        return None
    return spec["sketch_dim"] if spec["kind"] == "compact_bilinear" else spec["dim"] ** 2


def _pool(spec: dict[str, Any], in_chs: int, flatten: bool) -> nn.Module:
    kind = spec.get("kind")
    if kind == "gem":
        return GeM(spec.get("p", 3.0), flatten=flatten)
    if kind == "bilinear":
        return BilinearPool(in_chs, spec["dim"], flatten)
    if kind == "compact_bilinear":
        return CompactBilinearPool(in_chs, spec["dim"], spec["sketch_dim"], flatten, spec.get("seed", SKETCH_SEED))
    raise ImgclfError(f"model.head must be one of {', '.join(HEADS)} (got {kind!r})")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def set_head(model: nn.Module, spec: dict[str, Any] | None, arch: str) -> bool:
    """Replace the global pooling of timm CNN ``model`` (``arch`` names it in errors) per ``spec`` (``head_spec``;
    None: nothing to do), in place. Returns True when the classifier was rebuilt for a new width (a new head).

    Raises:
        ImgclfError: ``model`` has no ``SelectAdaptivePool2d`` over an NCHW map (ViTs and other token models), or
            the layers between its pooling and the classifier cannot take the new width (MobileNetV3's
            ``conv_head``, a ConvNeXt head with a hidden layer).
    """
    if spec is None:
        return False
    kind = spec.get("kind")
    pools = [(n, m) for n, m in model.named_modules() if isinstance(m, SelectAdaptivePool2d) and not m.is_identity()]
    if len(pools) != 1 or getattr(model, "output_fmt", "NCHW") != "NCHW":
        raise ImgclfError(f"model.head {kind} needs a CNN backbone with timm's global pooling of an (N, C, H, W) "
                          f"map; {arch} has none (it pools tokens or NHWC maps): use model.head linear")  # fmt: skip
    name, old = pools[0]
    c = int(model.num_features)
    pool = _pool(spec, c, isinstance(old.flatten, nn.Flatten))
    _set_module(model, name, pool)
    if isinstance(pool, GeM):  # same width: the classifier (and any layer between) stays
        return False
    width = pool.out_features
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, NormMlpClassifierHead):  # ConvNeXt & co.: the L2 normalisation replaces the head's norm
        if not isinstance(parent.pre_logits, nn.Identity):
            raise ImgclfError(f"model.head {kind} does not fit {arch}: its head has a hidden layer of {c} inputs; "
                              "use model.head gem")  # fmt: skip
        parent.norm = nn.Identity()
    for owner in {id(m): m for m in (model, parent)}.values():
        for attr in ("num_features", "head_hidden_size", "in_features"):
            if getattr(owner, attr, None) == c:
                setattr(owner, attr, width)
    clf = model.get_classifier()
    if isinstance(clf, nn.Linear):
        clf_name = next(n for n, m in model.named_modules() if m is clf)
        w = clf.weight
        _set_module(model, clf_name, nn.Linear(width, clf.out_features, device=w.device, dtype=w.dtype))
    _check_width(model, c, width, kind, arch)
    return True


def _check_width(model: nn.Module, c: int, width: int, kind: str, arch: str) -> None:
    """ImgclfError unless ``forward_head`` takes a (1, c, 2, 2) map to (1, width) pooled features."""
    was = model.training
    p = next(model.parameters())
    try:
        with torch.no_grad():
            got = tuple(model.eval().forward_head(torch.zeros(1, c, 2, 2, device=p.device), pre_logits=True).shape)
    except Exception as e:  # noqa: BLE001 - shape errors come as RuntimeError, ValueError, AssertionError
        got = first_line(e, 120)
    finally:
        model.train(was)
    if got != (1, width):
        raise ImgclfError(f"model.head {kind} does not fit {arch}: the layers after its pooling expect {c} features, "
                          f"not {width} ({got}); use model.head gem")  # fmt: skip


def pooling_of(model: nn.Module) -> nn.Module | None:
    """The model's imgclf pooling module (GeM, bilinear, compact bilinear), or None."""
    return next((m for m in model.modules() if isinstance(m, POOLS)), None)


def pooling_names(model: nn.Module) -> set[str]:
    """State-dict keys of the imgclf pooling module: head layers that a backbone's weights do not have."""
    pool = pooling_of(model)
    if pool is None:
        return set()
    prefix = next(n for n, m in model.named_modules() if m is pool)
    return {f"{prefix}.{k}" for k in pool.state_dict()}


def head_identity(model: nn.Module) -> str | None:
    """A hash of the imgclf pooling module's type and tensors (None without one): what the features depend on
    beyond the backbone, for feature caches."""
    pool = pooling_of(model)
    if pool is None:
        return None
    h = hashlib.sha256(repr(pool).encode())
    for k, v in sorted(pool.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
