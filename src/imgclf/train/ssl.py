"""Self-supervised methods for ``imgclf pretrain``: SimCLR, BYOL, DINO and MAE around any timm backbone.

Losses, projection/prediction heads, momentum updates and the multi-view transforms come from ``lightly``
(Susmelj et al.; the library the issue names): we only wire them to a timm backbone, the run's preprocessing and
the training loop (``train.pretrain``). Each method is an ``nn.Module`` whose ``backbone`` is the timm model that
``--weights RUN`` later loads (``num_classes=0``: pooled features), with

- ``forward(views, epoch) -> loss``: ``views`` a list of (B, C, H, W) batches, one per view;
- ``after_backward(epoch)`` (DINO freezes its last layer early) and ``after_update(progress)`` (the momentum
  encoders of BYOL and DINO follow the online network with a cosine schedule from ``ssl.momentum`` to 1).

Methods:
- SimCLR (Chen et al. 2020): projection head + NT-Xent over the two views' 2B embeddings.
- BYOL (Grill et al. 2020): online projection + prediction, a momentum target; symmetric negative cosine.
- DINO (Caron et al. 2021): student and momentum teacher with DINO heads; two global + ``local_views`` local
  crops; the teacher sees the global ones; cross-entropy with centering and sharpening (``lightly.loss.DINOLoss``).
- MAE (He et al. 2022): a timm ViT encodes the visible patches, a light decoder predicts the masked ones (MSE).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SSLConfig
from ..data.preprocess import Preprocess
from ..errors import ImgclfError

#: default projection output size per method (SimCLR's 128, BYOL's 256, a small DINO head's 2048)
PROJ_DIM = {"simclr": 128, "byol": 256, "dino": 2048}


def _lightly():
    try:
        import lightly  # noqa: F401
    except ImportError:
        raise ImgclfError("imgclf pretrain needs lightly: pip install 'imgclf[foundation]'") from None


def _momentum(progress: float, start: float) -> float:
    """Cosine schedule from ``start`` at ``progress`` 0 to 1 at 1 (BYOL, DINO)."""
    return 1.0 - (1.0 - start) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _follow(online: nn.Module, target: nn.Module, m: float) -> None:
    """target = m * target + (1 - m) * online (parameters; buffers copied)."""
    from lightly.models.utils import update_momentum

    update_momentum(online, target, m)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


class SimCLR(nn.Module):
    """SimCLR: both views through backbone + projection in one batch, NT-Xent (``lightly.loss.NTXentLoss``)."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, distributed: bool = False):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.head = SimCLRProjectionHead(backbone.num_features, cfg.hidden_dim, cfg.proj_dim or PROJ_DIM["simclr"])
        self.criterion = NTXentLoss(cfg.temperature, gather_distributed=distributed)

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        z0, z1 = self.head(self.backbone(torch.cat(views[:2]))).float().chunk(2)
        with full_precision(z0):
            return self.criterion(z0, z1)

    def after_backward(self, epoch: int) -> None:
        pass

    def after_update(self, progress: float) -> None:
        pass


class BYOL(nn.Module):
    """BYOL: online backbone + projection + prediction against a momentum target (no negatives)."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, distributed: bool = False):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        super().__init__()
        dim = cfg.proj_dim or PROJ_DIM["byol"]
        self.backbone = backbone
        self.projection = BYOLProjectionHead(backbone.num_features, cfg.hidden_dim, dim)
        self.prediction = BYOLPredictionHead(dim, cfg.hidden_dim, dim)
        self.target_backbone, self.target_projection = _frozen_copy(backbone), _frozen_copy(self.projection)
        self.criterion = NegativeCosineSimilarity()
        self.start = cfg.momentum

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        x = torch.cat(views[:2])
        p0, p1 = self.prediction(self.projection(self.backbone(x))).float().chunk(2)
        with torch.no_grad():
            z0, z1 = self.target_projection(self.target_backbone(x)).float().chunk(2)
        with full_precision(p0):
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def after_backward(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def after_update(self, progress: float) -> None:
        m = _momentum(progress, self.start)
        _follow(self.backbone, self.target_backbone, m)
        _follow(self.projection, self.target_projection, m)


class DINO(nn.Module):
    """DINO: a student and its momentum teacher with DINO heads; multi-crop (the teacher sees the global crops)."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, distributed: bool = False):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        super().__init__()
        dim = cfg.proj_dim or PROJ_DIM["dino"]
        self.backbone = backbone
        self.head = DINOProjectionHead(backbone.num_features, cfg.hidden_dim, 64, dim, freeze_last_layer=1)
        teacher_head = DINOProjectionHead(backbone.num_features, cfg.hidden_dim, 64, dim)  # weight norm: no deepcopy
        teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_backbone, self.teacher_head = _frozen_copy(backbone), teacher_head.requires_grad_(False)
        self.criterion = DINOLoss(output_dim=dim)
        self.start = cfg.momentum

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:2]))).float().chunk(2)
        student = list(self.head(self.backbone(torch.cat(views[:2]))).float().chunk(2))
        if len(views) > 2:  # the local crops share one size: one batch
            student += self.head(self.backbone(torch.cat(views[2:]))).float().chunk(len(views) - 2)
        with full_precision(teacher[0]):  # the teacher's sharpening (1 / 0.04) in float32
            return self.criterion(list(teacher), student, epoch=epoch)

    def after_backward(self, epoch: int) -> None:
        self.head.cancel_last_layer_gradients(current_epoch=epoch)

    @property
    def result(self) -> nn.Module:
        """The momentum teacher: what DINO evaluates and keeps (Caron et al. 2021, section 5.1; it probes better)."""
        return self.teacher_backbone

    @torch.no_grad()
    def after_update(self, progress: float) -> None:
        m = _momentum(progress, self.start)
        _follow(self.backbone, self.teacher_backbone, m)
        _follow(self.head, self.teacher_head, m)


class MAE(nn.Module):
    """MAE: the ViT encodes a random ``1 - mask_ratio`` of the patches; a 1-block decoder predicts the rest."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, distributed: bool = False):
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ImgclfError(f"ssl.method mae needs a timm VisionTransformer (e.g. vit_tiny_patch16_224); "
                              f"{type(backbone).__name__} is not one")  # fmt: skip
        if backbone.num_prefix_tokens != 1 or not backbone.has_class_token:  # lightly's mask keeps token 0 only
            raise ImgclfError(f"ssl.method mae needs a ViT with one class token and no register tokens; this one has "
                              f"{backbone.num_prefix_tokens} prefix token(s)")  # fmt: skip
        self.backbone = backbone
        self.encoder = MaskedVisionTransformerTIMM(vit=backbone)
        self.patch = backbone.patch_embed.patch_size[0]
        width = min(cfg.hidden_dim, 512)  # a light decoder: one block (MAE's ablation: depth 1 probes nearly as well)
        self.decoder = MAEDecoderTIMM(
            num_patches=backbone.patch_embed.num_patches, patch_size=self.patch, embed_dim=backbone.embed_dim,
            decoder_embed_dim=width, decoder_depth=1, decoder_num_heads=max(1, min(16, width // 32)),
            num_prefix_tokens=backbone.num_prefix_tokens,
        )  # fmt: skip
        self.mask_ratio = cfg.mask_ratio

    def forward(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        from lightly.models import utils

        images = views[0]
        b, seq = images.shape[0], self.encoder.sequence_length
        keep, mask = utils.random_token_mask(size=(b, seq), mask_ratio=self.mask_ratio, device=images.device)
        encoded = self.encoder.encode(images=images, idx_keep=keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (b, seq))
        tokens = utils.set_at_index(tokens, keep, self.decoder.embed(encoded).type_as(tokens))
        pred = self.decoder.predict(utils.get_at_index(self.decoder.decode(tokens), mask))
        target = utils.get_at_index(utils.patchify(images, self.patch), mask - 1)  # token 0: the class token
        return F.mse_loss(pred.float(), target.float())

    def after_backward(self, epoch: int) -> None:
        pass

    def after_update(self, progress: float) -> None:
        pass


METHODS = {"simclr": SimCLR, "byol": BYOL, "dino": DINO, "mae": MAE}


def full_precision(like: torch.Tensor):
    """Autocast off on ``like``'s device: the losses' similarity matmuls and exponentials in float32."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def kept_backbone(method: nn.Module) -> nn.Module:
    """The backbone a method's run keeps (and the monitor measures): DINO's teacher, else the online network."""
    return getattr(method, "result", method.backbone)


def dino_vit_kwargs(cfg: SSLConfig, backbone: nn.Module) -> dict:
    """Build arguments a ViT needs for DINO's smaller local crops (``dynamic_img_size``: position embeddings
    interpolated per input size); {} for other methods and backbones."""
    from timm.models.vision_transformer import VisionTransformer

    if cfg.method != "dino" or cfg.local_views == 0 or not isinstance(backbone, VisionTransformer):
        return {}
    return {"dynamic_img_size": True}


def build_method(cfg: SSLConfig, backbone: nn.Module, distributed: bool = False) -> nn.Module:
    """The ``cfg.method`` module around ``backbone`` (a timm model built with ``num_classes=0``)."""
    _lightly()
    return METHODS[cfg.method](backbone, cfg, distributed)


def view_transform(cfg: SSLConfig, pre: Preprocess, multiple: int = 1):
    """PIL image -> list of normalised (C, H, W) views: lightly's transform of ``cfg.method`` at ``pre``'s input
    size and normalisation (SimCLR/BYOL: 2 views; DINO: 2 global + ``local_views`` local, their side a multiple of
    ``multiple``, a ViT's patch size; MAE: 1)."""
    _lightly()
    import lightly.transforms as T

    if pre.channels != 3:
        raise ImgclfError(f"imgclf pretrain takes RGB models; this preprocessing has {pre.channels} channels")
    size, norm = pre.size[0], {"mean": list(pre.mean), "std": list(pre.std)}
    look = {"cj_prob": 0.8 if cfg.color_jitter > 0 else 0.0, "cj_strength": cfg.color_jitter,
            "random_gray_scale": cfg.gray, "normalize": norm}  # fmt: skip
    if cfg.method == "simclr":
        return T.SimCLRTransform(input_size=size, min_scale=cfg.min_scale, gaussian_blur=cfg.blur, **look)
    if cfg.method == "byol":  # BYOL's asymmetric views: blur always / rarely, solarize the second (their Table 6)
        one = T.BYOLView1Transform(input_size=size, min_scale=cfg.min_scale, gaussian_blur=cfg.blur, **look)
        two = T.BYOLView2Transform(input_size=size, min_scale=cfg.min_scale, gaussian_blur=cfg.blur / 10, **look)
        return T.BYOLTransform(one, two)
    if cfg.method == "dino":
        local = cfg.local_size or max(8, round(size * 3 / 7))
        local = max(multiple, local // multiple * multiple)  # a ViT takes whole patches
        return T.DINOTransform(global_crop_size=size, global_crop_scale=(cfg.min_scale, 1.0), local_crop_size=local,
                               local_crop_scale=(min(0.05, cfg.min_scale / 2), cfg.min_scale),
                               n_local_views=cfg.local_views,
                               gaussian_blur=(cfg.blur, cfg.blur / 5, cfg.blur), **look)  # fmt: skip
    return T.MAETransform(input_size=size, min_scale=cfg.min_scale, normalize=norm)


def embedding_spread(features: torch.Tensor) -> float:
    """Collapse check: mean over dimensions of the std of the L2-normalised embeddings, times sqrt(D).

    Args:
        features: (N, D) embeddings, N >= 2.

    Returns:
        About 1 for embeddings spread over the sphere (each dimension's std of unit vectors is ~1/sqrt(D)),
        0 for a collapsed representation (every image the same vector); the check of BYOL/SimSiam (Chen & He 2021).

    Example:
        >>> round(embedding_spread(torch.ones(8, 4)), 3)
        0.0
    """
    z = F.normalize(features.float(), dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))
