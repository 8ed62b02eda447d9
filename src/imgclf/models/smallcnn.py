"""A small, fast CNN for tiny images at native resolution (28-64 px), registered with timm.

Four conv+BN+GELU stages (the first conv of each later stage is followed by 2x2 max pooling), global
max pooling and a linear head: a VGG-style net in the spirit of airbench. Dense 3x3 convolutions run
well on CPUs (bf16 autocast on AVX512-BF16 CPUs roughly doubles training speed) and need no
upsampling of 28 px inputs. It follows timm's model contract (``forward_features``,
``forward_head(pre_logits=True)``, ``reset_classifier``, ``group_matcher``, ``num_features``), so every
imgclf strategy works on it; ``timm.create_model("simplecnn_s")`` works once this module is imported.

Example:
    >>> import timm, imgclf.models.smallcnn
    >>> timm.create_model("simplecnn_s", num_classes=10).num_features
    256
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["SimpleCNN"]


class ConvBN(nn.Sequential):
    """3x3 conv (no bias) [-> 2x2 max pool] -> BatchNorm -> GELU."""

    def __init__(self, cin: int, cout: int, pool: bool = False):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(cout), nn.GELU()]
        super().__init__(*layers)


class SimpleCNN(nn.Module):
    """stem ConvBN, then stages of ``depth`` ConvBN blocks; each stage after the first halves the resolution."""

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depth: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "max",
        **_: object,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = ConvBN(in_chans, widths[0])
        stages, prev = [], widths[0]
        for w in widths[1:]:
            stages.append(nn.Sequential(ConvBN(prev, w, pool=True), *[ConvBN(w, w) for _ in range(depth - 1)]))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.feature_info = [dict(num_chs=w, reduction=2**i, module=f"stages.{i - 1}" if i else "stem")
                             for i, w in enumerate(widths)]  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.(\d+)", None)])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H/8, W/8)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)  # (B, K) or (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kw: object) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kw,
    }


default_cfgs = generate_default_cfgs(
    {"simplecnn_t.untrained": _cfg(), "simplecnn_s.untrained": _cfg(), "simplecnn_m.untrained": _cfg()}
)


def _create(variant: str, pretrained: bool = False, **kwargs: object) -> SimpleCNN:
    return build_model_with_cfg(SimpleCNN, variant, pretrained, **kwargs)


@register_model
def simplecnn_t(pretrained: bool = False, **kwargs: object) -> SimpleCNN:
    """0.3 M parameters: widths 16-32-64-128 (a distillation student, edge devices)."""
    return _create("simplecnn_t", pretrained, **dict(dict(widths=(16, 32, 64, 128)), **kwargs))


@register_model
def simplecnn_s(pretrained: bool = False, **kwargs: object) -> SimpleCNN:
    """1.2 M parameters: widths 32-64-128-256."""
    return _create("simplecnn_s", pretrained, **dict(dict(widths=(32, 64, 128, 256)), **kwargs))


@register_model
def simplecnn_m(pretrained: bool = False, **kwargs: object) -> SimpleCNN:
    """4.7 M parameters: widths 64-128-256-512."""
    return _create("simplecnn_m", pretrained, **dict(dict(widths=(64, 128, 256, 512)), **kwargs))
