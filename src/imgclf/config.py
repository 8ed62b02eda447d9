"""Typed configuration: dataclasses with help text and validation, YAML files and dotted overrides.

Precedence, lowest first: the defaults below < a recipe (``--recipe`` or the embedded default's)
< ``--config FILE.yaml`` < command-line flags such as ``--optim.lr 3e-4`` or ``--epochs 5``.
Every layer is checked against the schema, so a misspelt key is an error that names it and its source.

Example:
    >>> cfg = build_config([{"optim": {"lr": 0.01}}], ["test"])
    >>> cfg.optim.lr
    0.01
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ImgclfError


def opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A dataclass field with help text (shown by ``--help``) and a default."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    path: str | None = opt(
        None,
        "training data: ImageFolder dir, CSV (path,label; multi-label: path,labels with cells like dog|grass, or"
        " path,<class1>,<class2>,... with 0/1 cells), a folder with labels.csv at its root (either CSV form),"
        " .npz, 'builtin:fashion-mnist', WebDataset shards (shards/, train-{000..009}.tar, https://.../x-{0..9}.tar,"
        " pipe:CMD) or a Hugging Face dataset (hf:PATH or hf:user/name, a save_to_disk folder, .parquet, .arrow)",
    )
    val_path: str | None = opt(None, "validation data; default: a stratified split of the training data")
    test_path: str | None = opt(None, "test data evaluated once at the end with the best checkpoint")
    val_split: float = opt(0.1, "fraction of the training data held out for validation when val_path is unset")
    input_size: int | Literal["auto"] | None = opt(
        "auto",
        "square input size; auto: near the images' native size when they are at most half the model's default"
        " (28 px data -> 32, with crop_pct 1.0), else the model's default; none: the model's default",
    )
    crop_pct: float | None = opt(None, "eval centre-crop fraction; default: the model's pretrained config")
    interpolation: str | None = opt(None, "resize interpolation (bilinear, bicubic, ...); default: the model's")
    batch_size: int = opt(64, "training batch size per device")
    eval_batch_size: int | None = opt(None, "evaluation batch size; default: 2 x batch_size")
    num_workers: int = opt(
        -1,
        "data loader worker processes; -1: one per spare core of this process's share (cores / processes per "
        "node, minus one; at most 8)",
    )
    jpeg_draft: bool = opt(
        True,
        "training: decode JPEGs at least 2x larger than the random crops need at 1/2, 1/4 or 1/8 scale (libjpeg DCT"
        " scaling), never below the size that keeps the smallest crop at full resolution; evaluation always"
        " decodes in full",
    )
    cache: Literal["none", "memory", "disk"] = opt(
        "none",
        "decoded-image cache: none | memory (this process, shared with loader workers) | disk (data.cache_dir,"
        " kept for later runs): every image is decoded once; training pictures are kept at data.cache_side,"
        " evaluation pictures at the eval resize (bit-identical results)",
    )
    cache_side: int | None = opt(
        None,
        "shorter side of cached training pictures (larger ones are resized down); default: the side that keeps"
        " the smallest random crop at full resolution (915 px for 224 px crops at aug.scale 0.08); smaller saves"
        " space and time but small crops then come from fewer pixels",
    )
    cache_dir: str | None = opt(None, "decoded-image cache directory; default $XDG_CACHE_HOME/imgclf/decoded")
    fast_path: Literal["auto", "on", "off"] = opt(
        "auto",
        "training data held decoded in memory as one uint8 tensor and augmented in batches on the device (no"
        " per-image PIL work, no workers); auto: when the augmentation allows it, the images are at most 2x the"
        " input size and they fit data.fast_path_budget; on: insist; off: the PIL loader",
    )
    fast_path_budget: float = opt(2.0, "GiB the fast path may use for the decoded training images (per process)")
    sampler: Literal["instance", "sqrt", "balanced", "progressive"] = opt(
        "instance",
        "training sampler: instance (plain shuffling) | sqrt (class c drawn in proportion to sqrt(n_c)) | balanced "
        "(every class equally often) | progressive (instance to balanced over the epochs; Kang et al. 2020)",
    )
    strict_images: bool = opt(False, "stop on the first corrupt or non-image file instead of skipping it")
    pixel_range: tuple[float, float] | str = opt(
        "auto",
        "how 16-bit, 32-bit and float pixels map to 0-255 (8-bit images are never changed): auto (integers by"
        " their type's range, 16-bit / 257; floats by the data: [0, 1] or [0, 255]) | minmax (each image's own"
        " range) | [lo, hi] (a fixed window, clipped)",
    )
    background: str = opt("white", "colour that transparent pixels are composited over (a name or #rrggbb)")
    max_pixels: int = opt(89_478_485, "refuse images with more pixels, read from the header (0: no limit)")
    max_aspect: float = opt(50.0, "refuse images whose longer side is more than this x the shorter (0: no limit)")
    task: Literal["auto", "single_label", "multi_label"] = opt(
        "auto",
        "auto: multi-label when the data says so (a 'labels' column, 0/1 class columns, a 2-D label matrix) |"
        " single_label | multi_label (a 'label' column is read as a label set; class folders become one-hot)",
    )
    classes: list[str] | None = opt(
        None,
        "the class vocabulary in order (default: inferred from the data, sorted); when given, a label in the data"
        " that is not in it is an error naming the row",
    )
    label_sep: str = opt("|", "separator between the labels of a label-set cell (dog|grass); quote it in YAML")
    image_column: str | None = opt(None, "Hugging Face datasets: the image column (default: the one Image feature)")
    label_column: str | None = opt(
        None, "Hugging Face datasets: the label column (default: 'label' / 'labels', or the one ClassLabel column)"
    )

    def __post_init__(self) -> None:
        import unicodedata

        from PIL import ImageColor

        pr = self.pixel_range
        ok = pr in ("auto", "minmax") if isinstance(pr, str) else math.isfinite(pr[0] + pr[1]) and pr[0] < pr[1]
        _check(ok, "data.pixel_range", "must be auto, minmax or [lo, hi] with finite lo < hi", pr)
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            _check(False, "data.background", "must be a colour name or #rrggbb", self.background)
        _check(self.max_pixels >= 0, "data.max_pixels", "must be >= 0", self.max_pixels)
        _check(self.max_aspect == 0 or self.max_aspect >= 1, "data.max_aspect", "must be 0 or >= 1", self.max_aspect)
        _check(self.task in ("auto", "single_label", "multi_label"), "data.task",
               "must be auto, single_label or multi_label", self.task)  # fmt: skip
        sep = self.label_sep
        _check(bool(sep.strip()) and "\n" not in sep and "\r" not in sep, "data.label_sep",
               "must be non-empty, not only spaces, on one line", sep)  # fmt: skip
        names = [unicodedata.normalize("NFC", str(c).strip()) for c in self.classes or []]
        ok = self.classes is None or bool(names and all(names) and len(set(names)) == len(names))
        _check(ok, "data.classes", "must be distinct, non-empty class names (or unset)", self.classes)
        _check(0.0 <= self.val_split < 1.0, "data.val_split", "must be in [0, 1)", self.val_split)
        size = self.input_size
        _check(size in (None, "auto") or size >= 8, "data.input_size", "must be auto, none or >= 8", size)
        _check(self.fast_path_budget > 0, "data.fast_path_budget", "must be > 0 (GiB)", self.fast_path_budget)
        _check(self.crop_pct is None or 0 < self.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]", self.crop_pct)
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1", self.batch_size)
        _check(self.cache in ("none", "memory", "disk"), "data.cache", "must be none, memory or disk", self.cache)
        _check(self.cache_side is None or self.cache_side >= 8, "data.cache_side", "must be >= 8", self.cache_side)
        ebs = self.eval_batch_size
        _check(ebs is None or ebs >= 1, "data.eval_batch_size", "must be >= 1", ebs)
        interp = self.interpolation
        _check(
            interp is None or interp in INTERPOLATIONS, "data.interpolation", f"must be one of {INTERPOLATIONS}", interp
        )


@dataclass
class AugmentConfig:
    """Training-time augmentation (timm's transform factory); eval and predict never augment."""

    scale: tuple[float, float] = opt((0.08, 1.0), "RandomResizedCrop area range")
    ratio: tuple[float, float] = opt((0.75, 4 / 3), "RandomResizedCrop aspect-ratio range")
    hflip: float = opt(0.5, "horizontal flip probability")
    vflip: float = opt(0.0, "vertical flip probability")
    rotation: float = opt(0.0, "random rotation range in degrees (+/-)")
    translate: float = opt(0.0, "random affine translation, fraction of the size")
    shear: float = opt(0.0, "random affine shear range in degrees (+/-)")
    perspective: float = opt(0.0, "RandomPerspective distortion scale (applied with p=0.5); 0 disables")
    color_jitter: float | None = opt(None, "ColorJitter strength (brightness/contrast/saturation); None disables")
    grayscale: float = opt(0.0, "RandomGrayscale probability")
    auto_augment: str | None = opt(
        None,
        "rand-m9-mstd0.5 (RandAugment N,M), augmix-m5-w4-d2 (AugMix), original (AutoAugment) or trivialaugment",
    )
    oversampled: str | None = opt(
        None,
        "with data.sampler sqrt/balanced/progressive: an auto_augment policy (same forms) for the images of the "
        "classes the sampler repeats (drawn more often than their share), so their repeats differ more",
    )
    re_prob: float = opt(0.0, "RandomErasing probability")
    mixup: float = opt(0.0, "MixUp alpha; 0 disables")
    cutmix: float = opt(0.0, "CutMix alpha; 0 disables")
    mix_prob: float = opt(1.0, "probability of mixing a batch when MixUp or CutMix is on")
    mix_switch_prob: float = opt(0.5, "probability of CutMix instead of MixUp when both are on")
    mix_off_epochs: int = opt(0, "turn MixUp/CutMix off for this many final epochs")
    repeats: int = opt(1, "repeated augmentation: each image appears this many times per epoch, differently augmented")

    def __post_init__(self) -> None:
        lo, hi = self.scale
        _check(0 < lo <= hi <= 1, "aug.scale", "must be 0 < min <= max <= 1", self.scale)
        _check(0 < self.ratio[0] <= self.ratio[1], "aug.ratio", "must be 0 < min <= max", self.ratio)
        for name in ("hflip", "vflip", "re_prob", "grayscale", "mix_prob", "mix_switch_prob"):
            _check(0 <= getattr(self, name) <= 1, f"aug.{name}", "must be a probability in [0, 1]", getattr(self, name))
        for name in ("rotation", "shear", "mixup", "cutmix", "mix_off_epochs"):
            _check(getattr(self, name) >= 0, f"aug.{name}", "must be >= 0", getattr(self, name))
        _check(0 <= self.translate < 1, "aug.translate", "must be in [0, 1)", self.translate)
        _check(0 <= self.perspective <= 1, "aug.perspective", "must be in [0, 1]", self.perspective)
        _check(self.repeats >= 1, "aug.repeats", "must be >= 1", self.repeats)
        for name in ("auto_augment", "oversampled"):
            aa = getattr(self, name)
            ok = aa is None or aa == "trivialaugment" or aa.split("-")[0] in AUTO_AUGMENT_FAMILIES
            _check(ok, f"aug.{name}", "must start with rand, augmix, original, originalr, v0, v0r or be trivialaugment",
                   aa)  # fmt: skip

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class ModelConfig:
    """The network: any timm architecture with a new head for the data's classes."""

    name: str = opt("tf_efficientnet_lite0", "timm architecture name (see `imgclf models`)")
    weights: str = opt(
        "auto",
        "auto | packaged | hub | none | path/to/file.safetensors|.pth | a run directory (a trained, zero-shot or"
        " self-supervised run: its weights, the head kept when its classes are the data's)  (auto: packaged if any,"
        " else hub)",
    )
    drop_rate: float | None = opt(None, "dropout before the classifier; default: the architecture's")
    drop_path_rate: float | None = opt(None, "stochastic depth rate; default: the architecture's")
    channels_last: bool = opt(True, "use channels_last memory format (faster convolutions on CPU and GPU)")
    head: Literal["linear", "gem", "bilinear", "compact_bilinear"] = opt(
        "linear",
        "pooling before the classifier of a CNN backbone: linear (the architecture's own) | gem (generalized mean,"
        " learnable p; Radenovic et al. 2018) | bilinear (1x1 conv to bilinear_dim channels, outer product, signed"
        " sqrt, L2: bilinear_dim^2 features; Lin et al. 2015) | compact_bilinear (its Tensor Sketch to compact_dim"
        " features; Gao et al. 2016)",
    )
    gem_p: float = opt(3.0, "gem: initial pooling exponent p, learned with the head (1 = average, large = max)")
    bilinear_dim: int = opt(256, "bilinear, compact_bilinear: channels after the 1x1 reduction conv")
    compact_dim: int = opt(8192, "compact_bilinear: Tensor Sketch output size (the feature width)")

    def __post_init__(self) -> None:
        _check(self.gem_p > 0, "model.gem_p", "must be > 0", self.gem_p)
        _check(1 <= self.bilinear_dim <= 1024, "model.bilinear_dim", "must be in [1, 1024]", self.bilinear_dim)
        _check(self.compact_dim >= 2, "model.compact_dim", "must be >= 2", self.compact_dim)


@dataclass
class TransferConfig:
    """How the pretrained backbone is used: the strategy and what is frozen or slowed down."""

    strategy: Literal["finetune", "probe", "staged", "scratch"] = opt(
        "finetune",
        "finetune: all layers, backbone at lr x backbone_lr_scale | probe: frozen backbone, head on cached features"
        " | staged: head first, then unfreeze | scratch: random init",
    )
    backbone_lr_scale: float = opt(0.1, "backbone learning rate = optim.lr x this (the head gets optim.lr)")
    layer_decay: float | None = opt(None, "layer-wise LR decay: each layer towards the stem gets x this (e.g. 0.75)")
    freeze_stages: int = opt(0, "freeze the stem and the first K stages (finetune, staged)")
    freeze_bn: bool = opt(False, "keep every BatchNorm in eval mode (running statistics frozen)")
    head_epochs: int = opt(2, "staged: epochs that train only the head (backbone and its BatchNorm frozen)")
    unfreeze_stages: int | None = opt(None, "staged: after the head epochs unfreeze the top K stages (None = all)")

    def __post_init__(self) -> None:
        _check(self.backbone_lr_scale > 0, "transfer.backbone_lr_scale", "must be > 0", self.backbone_lr_scale)
        ld = self.layer_decay
        _check(ld is None or 0 < ld <= 1, "transfer.layer_decay", "must be in (0, 1]", ld)
        _check(self.freeze_stages >= 0, "transfer.freeze_stages", "must be >= 0", self.freeze_stages)
        _check(self.head_epochs >= 1, "transfer.head_epochs", "must be >= 1", self.head_epochs)
        us = self.unfreeze_stages
        _check(us is None or us >= 0, "transfer.unfreeze_stages", "must be >= 0", us)


@dataclass
class ProbeConfig:
    """The linear probe: a head trained on cached backbone features."""

    solver: Literal["lbfgs", "sgd"] = opt(
        "lbfgs",
        "lbfgs: full-batch L-BFGS per weight decay in `wd_grid`, best on val | sgd: mini-batch optim.*, train.epochs",
    )
    wd_grid: list[float] = opt([1e-6, 1e-5, 1e-4, 1e-3, 1e-2], "L2 strengths tried by lbfgs, chosen on the val split")
    max_iter: int = opt(200, "lbfgs iterations per weight decay")
    aug_passes: int = opt(0, "extra augmented passes over the training data added to the cached features")
    cache: bool = opt(True, "cache features on disk; false recomputes the backbone every epoch (for comparison)")
    cache_dir: str | None = opt(None, "feature cache directory; default $XDG_CACHE_HOME/imgclf/features")

    def __post_init__(self) -> None:
        _check(
            all(w >= 0 for w in self.wd_grid) and len(self.wd_grid) > 0,
            "probe.wd_grid",
            "must be >= 0 values",
            self.wd_grid,
        )
        _check(self.max_iter >= 1, "probe.max_iter", "must be >= 1", self.max_iter)
        _check(self.aug_passes >= 0, "probe.aug_passes", "must be >= 0", self.aug_passes)


@dataclass
class OptimConfig:
    """Optimizer (timm factory: no weight decay on norms and biases)."""

    name: Literal["adamw", "sgd"] = opt("adamw", "optimizer")
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.05, "weight decay (skipped for norm and bias parameters)")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "SGD Nesterov momentum")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    clip_grad: float | None = opt(None, "clip the gradient norm to this value; None disables")
    accum_steps: int = opt(1, "gradient accumulation steps per optimizer update")

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.accum_steps >= 1, "optim.accum_steps", "must be >= 1", self.accum_steps)
        _check(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", "must be > 0", self.clip_grad)


@dataclass
class SchedConfig:
    """Learning-rate schedule, stepped every optimizer update."""

    name: Literal["cosine", "cosine_restarts", "onecycle", "constant"] = opt(
        "cosine",
        "cosine (linear warmup, then decay) | cosine_restarts (sched.cycles warm restarts) | onecycle | constant",
    )
    warmup_epochs: float = opt(1.0, "linear warmup length in epochs (fractions allowed; onecycle: its rise)")
    warmup_lr_ratio: float = opt(0.01, "warmup starts at lr x this")
    min_lr_ratio: float = opt(0.01, "cosine ends at lr x this")
    cycles: int = opt(3, "cosine_restarts: number of cycles")
    cycle_mul: float = opt(1.0, "cosine_restarts: each cycle is this many times longer than the previous")
    cycle_decay: float = opt(1.0, "cosine_restarts: peak lr of each cycle is x this of the previous")

    def __post_init__(self) -> None:
        _check(self.warmup_epochs >= 0, "sched.warmup_epochs", "must be >= 0", self.warmup_epochs)
        _check(self.cycles >= 1, "sched.cycles", "must be >= 1", self.cycles)
        _check(self.cycle_mul >= 1, "sched.cycle_mul", "must be >= 1", self.cycle_mul)
        _check(0 < self.cycle_decay <= 1, "sched.cycle_decay", "must be in (0, 1]", self.cycle_decay)
        for name in ("warmup_lr_ratio", "min_lr_ratio"):
            v = getattr(self, name)
            _check(0 <= v <= 1, f"sched.{name}", "must be in [0, 1]", v)


@dataclass
class TrainConfig:
    """The loop: epochs, loss, precision, EMA, model selection and stopping."""

    epochs: int = opt(10, "number of epochs")
    loss: Literal["auto", "ce", "focal", "logit_adjusted", "balanced_softmax", "bce", "asl"] = opt(
        "auto",
        "auto: ce (single-label) or bce (multi-label) | ce: cross-entropy | focal: focal loss (Lin et al. 2017; "
        "sigmoid focal for multi-label) | logit_adjusted: CE on logits + tau log(prior) (Menon et al. 2021) | "
        "balanced_softmax (Ren et al. 2020) | bce: binary cross-entropy | asl: asymmetric loss (Ridnik et al. 2021)",
    )
    class_weights: Literal["none", "inverse", "sqrt_inverse", "effective"] = opt(
        "none",
        "single-label class-weighted loss: inverse frequency, its square root, or the effective number of "
        "samples (Cui et al. 2019, beta train.cb_beta); weights sum to the number of classes",
    )
    cb_beta: float = opt(0.9999, "beta of the effective number of samples (class_weights effective)")
    la_tau: float = opt(1.0, "tau of the logit-adjusted loss")
    label_smoothing: float | None = opt(
        None, "label smoothing; default 0.1 for single-label, 0 for multi-label (each target moves towards 0.5)"
    )
    focal_gamma: float = opt(2.0, "focal loss focusing parameter (0 = cross-entropy)")
    focal_alpha: float | list[float] | None = opt(
        None, "focal loss weight: one for all classes or one per class (multi-label: positive-term weight in (0, 1))"
    )
    pos_weight: Literal["none", "balanced", "sqrt"] = opt(
        "none", "multi-label: weight each class's positive term by negatives / positives (balanced) or its sqrt"
    )
    asl_gamma_neg: float = opt(4.0, "asymmetric loss: focusing on negatives")
    asl_gamma_pos: float = opt(0.0, "asymmetric loss: focusing on positives")
    asl_clip: float = opt(0.05, "asymmetric loss: probability margin shifted onto negatives (0 disables)")
    amp: Literal["auto", "none", "bf16", "fp16"] = opt(
        "auto", "mixed precision: auto = bf16/fp16 on CUDA, none on CPU (fp32 channels_last is faster here)"
    )
    compile: bool = opt(
        False,
        "torch.compile the training forward and loss (inductor; the first steps of each phase compile, then run"
        " faster); state_dict keys, EMA, checkpoints and DDP are unchanged",
    )
    ema: bool = opt(True, "keep an exponential moving average of the weights (timm ModelEmaV3)")
    ema_decay: float = opt(0.998, "EMA decay (with warmup, so early epochs are not dominated by init)")
    metric: Literal["auto", "top1", "top5", "macro_f1", "balanced_accuracy", "loss", "map", "micro_f1"] = opt(
        "auto",
        "validation metric that picks the best checkpoint; auto: top1 (single-label) or map (multi-label: mean "
        "average precision); macro_f1 / micro_f1 of multi-label runs at threshold 0.5",
    )
    patience: int | None = opt(None, "stop after this many epochs without improvement; None disables")
    seed: int = opt(0, "random seed for split, init, shuffling and augmentation")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    sync_bn: bool = opt(False, "torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)")
    fsdp: bool = opt(
        False,
        "torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2 "
        "fully_shard per block) instead of replicating them (DDP); for backbones too large for one device",
    )
    dist_timeout: float = opt(
        600.0,
        "torchrun: seconds a rank waits for the others in a collective before the job "
        "stops with an error (a rank that died or hangs)",
    )

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.dist_timeout > 0, "train.dist_timeout", "must be > 0 seconds", self.dist_timeout)
        s = self.label_smoothing
        _check(s is None or 0 <= s < 1, "train.label_smoothing", "must be in [0, 1)", s)
        _check(self.asl_gamma_neg >= 0 and self.asl_gamma_pos >= 0, "train.asl_gamma_neg/asl_gamma_pos",
               "must be >= 0", (self.asl_gamma_neg, self.asl_gamma_pos))  # fmt: skip
        _check(0 <= self.asl_clip < 1, "train.asl_clip", "must be in [0, 1)", self.asl_clip)
        _check(0 <= self.cb_beta < 1, "train.cb_beta", "must be in [0, 1)", self.cb_beta)
        _check(self.la_tau >= 0, "train.la_tau", "must be >= 0", self.la_tau)
        _check(self.focal_gamma >= 0, "train.focal_gamma", "must be >= 0", self.focal_gamma)
        alpha = (
            self.focal_alpha
            if isinstance(self.focal_alpha, list)
            else [1.0 if self.focal_alpha is None else self.focal_alpha]
        )
        _check(all(a > 0 for a in alpha), "train.focal_alpha", "must be > 0 (one value or one per class)", alpha)
        _check(self.focal_alpha is None or self.loss == "focal", "train.focal_alpha", "applies to train.loss focal "
               "only (set --train.loss focal)", self.focal_alpha)  # fmt: skip
        _check(0 < self.ema_decay < 1, "train.ema_decay", "must be in (0, 1)", self.ema_decay)
        _check(self.patience is None or self.patience >= 1, "train.patience", "must be >= 1", self.patience)


#: distillation terms ``distill.methods`` may join with "+"
DISTILL_METHODS = ("logit", "hard", "feature", "attention")


@dataclass
class DistillConfig:
    """Knowledge distillation from trained runs: which teachers, which terms, their weights."""

    teachers: list[str] = opt([], "run directories whose models teach this one (imgclf train --teacher RUN [RUN ...])")
    methods: str = opt(
        "logit",
        "terms joined with +: logit (KL at temperature T, x T^2; Hinton et al. 2015) | hard (cross-entropy on the"
        " teacher's top-1; DeiT, Touvron et al. 2021) | feature (a learned projector from the student's pooled"
        " features to the teacher's; FitNets-style, Romero et al. 2015) | attention (stage attention maps;"
        " Zagoruyko & Komodakis 2017); e.g. logit+feature",
    )
    temperature: float = opt(4.0, "softmax (multi-label: sigmoid) temperature T of the logit term")
    alpha: float = opt(0.5, "weight of the logit or hard term; the task loss gets 1 - alpha")
    feature_weight: float = opt(1.0, "weight of the feature term")
    feature_loss: Literal["cosine", "mse"] = opt("cosine", "feature term: 1 - cosine similarity, or mean squared error")
    attention_weight: float = opt(1000.0, "beta of the attention term: beta / 2 x sum over stage pairs (their 1e3)")
    teacher_task: Literal["same", "any"] = opt(
        "same",
        "same: every teacher has the student's task; any: read a teacher of the other task as the student's (a"
        " multi-label teacher's logits through softmax for single-label data, a single-label one's through sigmoid)",
    )

    cache: Literal["auto", "on", "off"] = opt(
        "auto",
        "keep the teachers' outputs per training image (keyed by the exact input pixels) and reuse them instead of "
        "running the teachers again; auto: on while it pays, off by itself when after two passes over the training "
        "images under half of the lookups hit (random augmentation or MixUp make every view new); never with the "
        "attention term",
    )
    cache_max_mb: float = opt(2048.0, "most memory (MiB) the teacher-output cache may hold")

    def __post_init__(self) -> None:
        terms = self.terms
        bad = [t for t in terms if t not in DISTILL_METHODS]
        _check(not bad and len(set(terms)) == len(terms) and bool(terms), "distill.methods",
               f"must be terms of {', '.join(DISTILL_METHODS)} joined with +, each once", self.methods)  # fmt: skip
        _check(not {"logit", "hard"} <= set(terms), "distill.methods", "takes logit or hard, not both", self.methods)
        _check(self.temperature > 0, "distill.temperature", "must be > 0", self.temperature)
        _check(0 <= self.alpha <= 1, "distill.alpha", "must be in [0, 1]", self.alpha)
        _check(self.feature_weight >= 0, "distill.feature_weight", "must be >= 0", self.feature_weight)
        _check(self.attention_weight >= 0, "distill.attention_weight", "must be >= 0", self.attention_weight)
        _check(self.cache_max_mb >= 0, "distill.cache_max_mb", "must be >= 0", self.cache_max_mb)
        _check(all(isinstance(t, str) and t.strip() for t in self.teachers), "distill.teachers",
               "must be run directories", self.teachers)  # fmt: skip

    @property
    def terms(self) -> list[str]:
        """The ``methods`` terms, in order."""
        return [t.strip() for t in str(self.methods).split("+") if t.strip()]


#: self-supervised methods of ``imgclf pretrain``
SSL_METHODS = ("simclr", "byol", "dino", "mae")


@dataclass
class SSLConfig:
    """Self-supervised pretraining (``imgclf pretrain``): the method, its heads and views, and the monitor."""

    method: Literal["simclr", "byol", "dino", "mae"] = opt(
        "simclr",
        "simclr (NT-Xent, Chen et al. 2020) | byol (momentum encoder + predictor, Grill et al. 2020) | dino"
        " (self-distillation with centering and sharpening, multi-crop; Caron et al. 2021) | mae (masked"
        " autoencoder, ViTs only; He et al. 2022)",
    )
    proj_dim: int | None = opt(None, "projection output size (default: simclr 128, byol 256, dino 2048)")
    hidden_dim: int = opt(512, "hidden width of the projection (and BYOL prediction) head")
    temperature: float = opt(0.2, "simclr: NT-Xent temperature")
    momentum: float = opt(0.99, "byol, dino: start of the target/teacher EMA momentum (cosine schedule to 1)")
    min_scale: float = opt(0.2, "smallest crop area fraction of the random resized crops (dino: of the global ones)")
    color_jitter: float = opt(0.5, "colour-jitter strength (applied with p=0.8; 0 disables)")
    blur: float = opt(0.0, "Gaussian-blur probability (SimCLR uses 0.5 at 224 px; small images lose too much)")
    gray: float = opt(0.2, "random-grayscale probability")
    local_views: int = opt(6, "dino: small local crops per image next to the two global ones")
    local_size: int | None = opt(None, "dino: side of the local crops (default: input size x 3/7, DINO's 96/224)")
    mask_ratio: float = opt(0.75, "mae: fraction of patches masked")
    knn_data: str | None = opt(
        None,
        "labelled images for the per-epoch k-NN monitor (a stratified half is the support, the other half is"
        " classified); default: no k-NN monitor",
    )
    knn_max: int = opt(2000, "k-NN monitor: at most this many images (stratified)")
    knn_k: int = opt(20, "k-NN monitor: neighbours that vote")
    collapse_std: float = opt(
        0.1,
        "collapse check: warn when the mean per-dimension std of the L2-normalised embeddings, x sqrt(D), falls"
        " below this (about 1 for spread embeddings, 0 for collapsed ones)",
    )

    def __post_init__(self) -> None:
        _check(self.method in SSL_METHODS, "ssl.method", f"must be one of {', '.join(SSL_METHODS)}", self.method)
        _check(self.proj_dim is None or self.proj_dim >= 1, "ssl.proj_dim", "must be >= 1", self.proj_dim)
        _check(self.hidden_dim >= 1, "ssl.hidden_dim", "must be >= 1", self.hidden_dim)
        _check(self.temperature > 0, "ssl.temperature", "must be > 0", self.temperature)
        _check(0 <= self.momentum < 1, "ssl.momentum", "must be in [0, 1)", self.momentum)
        _check(0 < self.min_scale <= 1, "ssl.min_scale", "must be in (0, 1]", self.min_scale)
        for name in ("blur", "gray"):
            _check(0 <= getattr(self, name) <= 1, f"ssl.{name}", "must be a probability in [0, 1]", getattr(self, name))
        _check(self.color_jitter >= 0, "ssl.color_jitter", "must be >= 0", self.color_jitter)
        _check(self.local_views >= 0, "ssl.local_views", "must be >= 0", self.local_views)
        _check(self.local_size is None or self.local_size >= 8, "ssl.local_size", "must be >= 8", self.local_size)
        _check(0 < self.mask_ratio < 1, "ssl.mask_ratio", "must be in (0, 1)", self.mask_ratio)
        _check(self.knn_max >= 2 and self.knn_k >= 1, "ssl.knn_max/knn_k", "must be >= 2 and >= 1",
               (self.knn_max, self.knn_k))  # fmt: skip
        _check(self.collapse_std >= 0, "ssl.collapse_std", "must be >= 0", self.collapse_std)


@dataclass
class TrustConfig:
    """What runs after training: calibration, out-of-distribution statistics and the HTML report."""

    calibrate: bool = opt(True, "fit a temperature on the validation split (minimum NLL); eval/predict apply it")
    calibration_method: Literal["auto", "temperature", "platt"] = opt(
        "auto",
        "multi-label: a temperature per class, or Platt scaling per class (auto: platt); single-label "
        "runs fit one temperature",
    )
    threshold: Literal["f1", "precision", "recall", "fixed", "top_k"] = opt(
        "f1",
        "multi-label decision rule: per-class thresholds tuned on validation for the best F1 (f1) or to reach "
        "threshold_target precision / recall, one fixed threshold (threshold_value), or the top_k labels",
    )
    threshold_target: float = opt(0.9, "precision or recall each class's tuned threshold must reach")
    threshold_value: float = opt(0.5, "the threshold of every class for threshold fixed")
    threshold_top_k: int = opt(1, "labels per image for threshold top_k")
    ood: bool = opt(True, "fit OOD statistics (Mahalanobis, k-NN) on training features and thresholds on val")
    ood_score: Literal["auto", "msp", "max_logit", "energy", "mahalanobis", "knn"] = opt(
        "auto",
        "the score predict uses to answer 'unknown'; auto: energy (single-label) or knn (multi-label: logit scores "
        "read an image with no label as having little evidence, so they would reject empty label sets)",
    )
    ood_tpr: float = opt(0.95, "thresholds keep this fraction of in-distribution validation images")
    ood_max_train: int = opt(20000, "at most this many training images (stratified) for the OOD statistics")
    knn_k: int = opt(10, "k of the k-NN OOD score")
    report: bool = opt(True, "write runs/<name>/report.html at the end of training")
    top_losses: int = opt(12, "most confidently wrong validation images shown (with CAM overlays) in the report")

    def __post_init__(self) -> None:
        _check(0 < self.ood_tpr < 1, "trust.ood_tpr", "must be in (0, 1)", self.ood_tpr)
        _check(self.ood_max_train >= 10, "trust.ood_max_train", "must be >= 10", self.ood_max_train)
        _check(self.knn_k >= 1, "trust.knn_k", "must be >= 1", self.knn_k)
        _check(self.top_losses >= 0, "trust.top_losses", "must be >= 0", self.top_losses)
        _check(0 < self.threshold_target <= 1, "trust.threshold_target", "must be in (0, 1]", self.threshold_target)
        _check(0 < self.threshold_value < 1, "trust.threshold_value", "must be in (0, 1)", self.threshold_value)
        _check(self.threshold_top_k >= 1, "trust.threshold_top_k", "must be >= 1", self.threshold_top_k)


@dataclass
class RunConfig:
    """Where results go."""

    output: str = opt("runs", "directory that holds run directories")
    name: str | None = opt(None, "run directory name; default: <model>-<timestamp>")
    progress: bool = opt(True, "show progress bars")


@dataclass
class Config:
    """Everything `imgclf train` needs; saved resolved in the run directory and the artifact."""

    data: DataConfig = field(default_factory=DataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class InferConfig:
    """How a saved run goes over data in ``eval``, ``predict`` and ``calibrate``; those verbs' flags are generated
    from these fields (``--batch-size``, ``--no-progress``, ...), and ``kwargs()`` is what ``infer_run`` takes."""

    batch_size: int = opt(64, "images per forward pass")
    workers: int = opt(-1, "loader worker processes (-1: automatic, 0: load in the main process)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    strict_images: bool = opt(False, "stop at the first unreadable image instead of skipping it")
    progress: bool = opt(True, "progress bars")
    max_pixels: int = opt(89_478_485, "skip images with more pixels, read from the header (0: no limit)")
    max_aspect: float = opt(50.0, "skip images whose longer side exceeds this x the shorter (0: no limit)")
    tta: Literal["flip", "five_crop", "ten_crop", "multiscale", "flip_multiscale"] | None = opt(
        None, "test-time augmentation views (imgclf.eval.tta)"
    )
    tta_merge: Literal["mean_logits", "mean_probs"] = opt("mean_logits", "how test-time views are merged")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.workers >= -1, "workers", "must be >= -1", self.workers)
        _check(self.max_pixels >= 0, "max_pixels", "must be >= 0", self.max_pixels)
        _check(self.max_aspect == 0 or self.max_aspect >= 1, "max_aspect", "must be 0 or >= 1", self.max_aspect)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``eval.inference.infer_run`` (0 limits mean none)."""
        out = {"batch_size": self.batch_size, "num_workers": self.workers, "device": self.device,
               "strict_images": self.strict_images, "progress": self.progress,
               "max_pixels": self.max_pixels or None, "max_aspect": self.max_aspect or None}  # fmt: skip
        if self.tta:
            out.update(tta=self.tta, tta_merge=self.tta_merge)
        return out


@dataclass(frozen=True)
class EmbedConfig:
    """What the few-shot verbs embed and how: the backbone, which labelled images, and the preprocessing
    overrides. ``imgclf knn``'s flags are generated from these fields; ``models.embedding.embed``,
    ``train.knn_index.build_index`` and ``eval.fewshot.few_shot_report`` take it (with an ``InferConfig``
    for the loader, device and image limits)."""

    model: str = opt("tf_efficientnet_lite0", "any timm backbone")
    weights: str = opt("auto", "auto | packaged | hub | none | FILE.safetensors/.pth | RUN directory")
    split: str = opt("train", "split of a multi-split .npz / builtin data")
    per_class: int | None = opt(None, "embed at most this many images per class (seeded choice; default all)")
    seed: int = opt(0, "seed of the per-class choice (and of the episodes)")
    input_size: int | None = opt(None, "square input size (default: the model's)")
    crop_pct: float | None = opt(None, "eval centre-crop fraction (default: the model's)")
    interpolation: str | None = opt(None, "resize interpolation (bilinear, bicubic, ...; default: the model's)")
    pixel_range: tuple[float, float] | str = opt(
        "auto", "how 16-bit and float pixels map to 0-255 (see data.pixel_range)"
    )
    background: str = opt("white", "colour that transparent pixels are composited over")

    def __post_init__(self) -> None:
        _check(self.per_class is None or self.per_class >= 1, "per_class", "must be >= 1", self.per_class)
        try:
            self.data_config()
        except ConfigFieldError as e:  # DataConfig names its own section; these fields have none
            raise ConfigFieldError(e.key.removeprefix("data."), str(e).replace("'data.", "'")) from None

    def data_config(self, infer: InferConfig | None = None) -> DataConfig:
        """The ``DataConfig`` whose overrides and decode policy ``Preprocess.from_model`` applies (image
        limits from ``infer``)."""
        limits = {"max_pixels": infer.max_pixels, "max_aspect": infer.max_aspect} if infer is not None else {}
        return DataConfig(input_size=self.input_size, crop_pct=self.crop_pct, interpolation=self.interpolation,
                          pixel_range=self.pixel_range, background=self.background, **limits)  # fmt: skip


@dataclass(frozen=True)
class KNNConfig:
    """The k-NN / nearest-prototype rule of a few-shot index (``models.knn``; ``imgclf knn`` flags)."""

    k: int = opt(10, "neighbours that vote")
    temperature: float = opt(0.07, "vote / prototype softmax temperature")
    mode: Literal["knn", "prototype"] = opt("knn", "k-NN vote or nearest class mean (SimpleShot)")

    def __post_init__(self) -> None:
        _check(self.k >= 1, "k", "must be >= 1", self.k)
        _check(self.temperature > 0, "temperature", "must be > 0", self.temperature)


@dataclass(frozen=True)
class EpisodeConfig:
    """N-way K-shot episodes (``eval.fewshot.few_shot_report``; ``imgclf knn episodes`` flags)."""

    shots: list[int] = opt([1, 5, 10], "support images per class (K), one report per value")
    ways: int | None = opt(None, "classes per episode (default: all)")
    queries: int = opt(15, "query images per class and episode")
    episodes: int = opt(200, "random episodes per K")
    modes: list[Literal["knn", "prototype"]] = opt(["prototype", "knn"], "the rules to measure")

    def __post_init__(self) -> None:
        _check(bool(self.shots) and min(self.shots) >= 1, "shots", "must be >= 1", self.shots)
        _check(self.ways is None or self.ways >= 2, "ways", "must be >= 2", self.ways)
        _check(self.queries >= 1, "queries", "must be >= 1", self.queries)
        _check(self.episodes >= 1, "episodes", "must be >= 1", self.episodes)


@dataclass(frozen=True)
class ExportConfig:
    """How ``deploy.export.export_run`` writes and verifies an exported graph (``imgclf export`` flags)."""

    output: str | None = opt(None, "directory to write (default <run>/export)", short="-o")
    pixels: Literal["nhwc", "nchw", "none"] = opt(
        "nhwc", "graph input: uint8 pixels at the input size (nhwc/nchw, preprocessing inside) or normalised "
        "float NCHW (none)"
    )  # fmt: skip
    opset: int | None = opt(None, "ONNX opset (default: the exporter's current one)")
    data: str | None = opt(None, "labelled images to verify on (default: generated pictures, agreement only)")
    verify_n: int = opt(500, "verification images")
    calib_data: str | None = opt(None, "int8 calibration images (default: the run's training split)")
    calib_n: int = opt(256, "int8 calibration images")
    int8_tolerance: float = opt(1.0, "max top-1 points an int8 model may lose (negative: it must gain)")
    force: bool = opt(False, "keep an int8 model beyond the tolerance (with a warning)")
    triton_max_batch: int = opt(64, "Triton dynamic batching: largest batch")
    triton_delay_us: int = opt(2000, "Triton dynamic batching: max queue delay in microseconds")

    def __post_init__(self) -> None:
        for key in ("verify_n", "calib_n", "triton_max_batch"):
            _check(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        _check(self.opset is None or self.opset >= 7, "opset", "must be >= 7", self.opset)
        _check(self.triton_delay_us >= 0, "triton_delay_us", "must be >= 0", self.triton_delay_us)


@dataclass(frozen=True)
class BenchConfig:
    """What ``deploy.bench.bench_run`` measures (``imgclf bench`` flags)."""

    runtimes: list[str] | None = opt(None, "runtimes to measure (default: every one available, torch first)")
    batch_sizes: list[int] = opt([1, 8, 32], "batch sizes")
    warmup: int = opt(3, "untimed calls first")
    repeats: int = opt(10, "timed calls per runtime and batch size")
    progress: bool = opt(True, "progress bars")

    def __post_init__(self) -> None:
        _check(bool(self.batch_sizes) and min(self.batch_sizes) >= 1, "batch_sizes", "must be >= 1", self.batch_sizes)
        _check(self.warmup >= 0, "warmup", "must be >= 0", self.warmup)
        _check(self.repeats >= 1, "repeats", "must be >= 1", self.repeats)


@dataclass(frozen=True)
class AuditConfig:
    """What ``imgclf audit`` checks and how ``--fix`` cleans (``eval.audit.run_audit``; the verb's flags). The
    backbone and preprocessing come from an ``EmbedConfig``, the loader and image limits from an ``InferConfig``."""

    embeddings: bool = opt(
        True, "embed the images with the backbone: near-duplicates by cosine, label issues and outliers"
    )
    companions: bool = opt(True, "also audit the val/test splits stored with DATA (multi-split .npz, builtin)")
    phash_distance: int = opt(2, "near-duplicates: perceptual hashes (64 bits) at most this many bits apart")
    cosine: float = opt(0.97, "near-duplicates: embedding cosine similarity at least this (1.1: off)")
    joint_phash: int = opt(10, "near-duplicates: or both hashes at most this many bits apart ...")
    joint_cosine: float = opt(0.90, "... and embeddings at least this cosine-similar (1.1: off)")
    neighbours: int = opt(10, "k of the k-NN search (near-duplicate partners per image, outlier distance)")
    outlier_z: float = opt(5.0, "outliers: k-th neighbour distance over median + z x 1.4826 x MAD")
    folds: int = opt(5, "label issues: folds of the cross-validated probe (out-of-fold probabilities)")
    probe_wd: float = opt(1e-3, "label issues: L2 strength of the logistic-regression probe")
    probe_iter: int = opt(100, "label issues: L-BFGS iterations per fold")
    min_side: int = opt(16, "files: images whose shorter side is under this many pixels are tiny")
    max_ratio: float = opt(5.0, "files: images longer than this x their shorter side have an extreme aspect")
    min_count: int = opt(10, "balance: classes with fewer images are reported")
    fix_duplicates: Literal["drop", "keep"] = opt("drop", "--fix: keep one image of each duplicate pair; drop "
                                                          "both images of a label conflict")  # fmt: skip
    fix_leaks: Literal["drop", "keep"] = opt("drop", "--fix: drop training images that also appear in val/test")
    fix_labels: Literal["relabel", "drop", "keep"] = opt("drop", "--fix: what to do with suspected label errors")
    fix_max_labels: int | None = opt(None, "--fix: act on the top N label issues only (default all)")
    seed: int = opt(0, "seed of the folds")
    cache_dir: str | None = opt(None, "hash and feature cache; default $XDG_CACHE_HOME/imgclf/features")
    max_listed: int = opt(200, "HTML page: rows shown per section (the JSON lists everything)")

    def __post_init__(self) -> None:
        _check(0 <= self.phash_distance <= 64, "phash_distance", "must be in [0, 64]", self.phash_distance)
        _check(0 <= self.joint_phash <= 64, "joint_phash", "must be in [0, 64]", self.joint_phash)
        for key in ("cosine", "joint_cosine"):
            _check(-1 <= getattr(self, key) <= 1.1, key, "must be in [-1, 1.1]", getattr(self, key))
        for key in ("neighbours", "min_side", "min_count", "probe_iter", "max_listed"):
            _check(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        _check(self.folds >= 2, "folds", "must be >= 2", self.folds)
        _check(self.probe_wd >= 0, "probe_wd", "must be >= 0", self.probe_wd)
        _check(self.max_ratio >= 1, "max_ratio", "must be >= 1", self.max_ratio)
        _check(self.outlier_z > 0, "outlier_z", "must be > 0", self.outlier_z)
        n = self.fix_max_labels
        _check(n is None or n >= 0, "fix_max_labels", "must be >= 0", n)


def split_fields(fields: dict[str, Any], *configs: Any) -> list[Any]:
    """``configs`` with ``fields`` applied, each name to the config that has it (``dataclasses.replace``);
    TypeError for a name none of them has. Lets the Python API take ``embed(data, per_class=5, workers=0)``
    as well as typed configs."""
    names = [{f.name for f in dataclasses.fields(c)} for c in configs]
    unknown = set(fields) - set().union(*names)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    return [dataclasses.replace(c, **{k: v for k, v in fields.items() if k in n}) for c, n in zip(configs, names)]


AUTO_AUGMENT_FAMILIES = ("rand", "augmix", "original", "originalr", "v0", "v0r")
#: resize filters both timm and torchvision implement for eval and training (timm's ``str_to_interp_mode``)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")


class ConfigFieldError(ImgclfError):
    """A field failed validation; ``key`` lets the caller name the file or flag that set it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class ConvertConfig:
    """How ``imgclf convert DATA --to wds`` writes WebDataset shards (``data.convert.convert_to_wds``; the verb's
    flags). The source is read as ``imgclf train --data`` reads it (task, classes, label separator, columns)."""

    to: Literal["wds"] = opt("wds", "output format: wds (WebDataset tar shards + dataset.json + classes.txt)")
    split: str = opt("train", "split of a multi-split source (.npz, builtin, Hugging Face DatasetDict)")
    shard_size: int = opt(10_000, "samples per shard (the last shard holds the rest)")
    shard_bytes: int = opt(1_000_000_000, "bytes per shard at most (a new shard starts past it)")
    shuffle: bool = opt(True, "seeded random order (so every shard mixes the classes): keep the source order")
    seed: int = opt(0, "seed of the order")
    overwrite: bool = opt(False, "replace an existing output folder (after the new one is complete)")
    progress: bool = opt(True, "progress bar")
    task: Literal["auto", "single_label", "multi_label"] = opt("auto", "as data.task")
    classes: list[str] | None = opt(None, "as data.classes")
    label_sep: str = opt("|", "as data.label_sep")
    image_column: str | None = opt(None, "as data.image_column (Hugging Face datasets)")
    label_column: str | None = opt(None, "as data.label_column (Hugging Face datasets)")

    def __post_init__(self) -> None:
        _check(self.to == "wds", "to", "must be wds", self.to)
        _check(self.shard_size >= 1, "shard_size", "must be >= 1", self.shard_size)
        _check(self.shard_bytes >= 1, "shard_bytes", "must be >= 1", self.shard_bytes)


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigFieldError(key, f"config field '{key}' {rule} (got {value!r})")


# --------------------------------------------------------------------------- schema walking


def section_fields(cls: type = Config) -> dict[str, dict[str, dataclasses.Field]]:
    """``{section: {field_name: Field}}`` for every section of ``Config``."""
    hints = typing.get_type_hints(cls)
    return {f.name: {g.name: g for g in dataclasses.fields(hints[f.name])} for f in dataclasses.fields(cls)}


def field_types(cls: type = Config) -> dict[str, Any]:
    """``{"section.field": type}`` with resolved annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for sec in dataclasses.fields(cls):
        sub = typing.get_type_hints(hints[sec.name])
        for name in section_fields(cls)[sec.name]:
            out[f"{sec.name}.{name}"] = sub[name]
    return out


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to ``tp`` or raise a one-line error."""

    def fail() -> ImgclfError:
        return ImgclfError(f"{where}: field '{key}' expects {_type_name(tp)}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, where)
            except ImgclfError:
                pass
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        raise ImgclfError(f"{where}: field '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _yaml_scalar(value)
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail()
            return tuple(coerce(v, a, key, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(coerce(v, inner, key, where) for v in value)
    if tp is Any:
        return value
    if isinstance(value, str) and tp is not str:
        value = _yaml_scalar(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except (TypeError, ValueError):
            raise fail() from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise fail()


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (tuple, list):
        return f"a list [{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- layering


def check_layer(layer: dict, where: str) -> dict[str, Any]:
    """Validate one layer's keys and types against the schema; return it flattened to dotted keys."""
    if not isinstance(layer, dict):
        raise ImgclfError(
            f"{where}: expected a mapping of sections (data, model, optim, ...), got {type(layer).__name__}"
        )
    types_ = field_types()
    sections = section_fields()
    flat: dict[str, Any] = {}
    for sec, body in layer.items():
        if sec not in sections:
            raise ImgclfError(f"{where}: unknown config key '{sec}' (sections: {', '.join(sections)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ImgclfError(f"{where}: config key '{sec}' must be a mapping of fields, got {body!r}")
        for name, value in body.items():
            key = f"{sec}.{name}"
            if key not in types_:
                raise ImgclfError(f"{where}: unknown config key '{key}' (fields of {sec}: {', '.join(sections[sec])})")
            flat[key] = coerce(value, types_[key], key, where)
    return flat


def build_config(layers: list[dict], sources: list[str]) -> Config:
    """Merge layers (lowest precedence first) over the defaults into a validated ``Config``."""
    merged: dict[str, Any] = {}
    where_set: dict[str, str] = {}
    for layer, where in zip(layers, sources):
        flat = check_layer(layer, where)
        merged.update(flat)
        where_set.update(dict.fromkeys(flat, where))
    nested: dict[str, dict[str, Any]] = {}
    for key, value in merged.items():
        sec, name = key.split(".", 1)
        nested.setdefault(sec, {})[name] = value
    hints = typing.get_type_hints(Config)
    try:
        return Config(**{sec: hints[sec](**nested.get(sec, {})) for sec in section_fields()})
    except ConfigFieldError as e:
        raise ImgclfError(f"{where_set.get(e.key, 'default config')}: {e}") from None


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples become lists) suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {sec: {k: plain(v) for k, v in vars(getattr(cfg, sec)).items()} for sec in section_fields()}


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping or raise a one-line error naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImgclfError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImgclfError(f"cannot read config file {p}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ImgclfError(f"config file {p} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ImgclfError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (what `--config` accepts back)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped in the package (``imgclf/recipes/NAME.yaml``)."""
    here = Path(__file__).parent / "recipes"
    p = here / f"{name}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in here.glob("*.yaml"))
        raise ImgclfError(f"unknown recipe '{name}' (known: {', '.join(known)})")
    return p
