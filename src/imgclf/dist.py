"""Device, rank and precision helpers: the seam where torchrun DDP slots in.

Single process today: ``rank == 0`` and ``world_size == 1``. Under torchrun the same helpers read
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, bind one device per process and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import ImgclfError

log = logging.getLogger("imgclf")


@dataclass(frozen=True)
class Dist:
    """Where this process runs and which share of the work it does."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is checked before use."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ImgclfError(f"train.device: unknown device '{spec}' (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ImgclfError(f"train.device: '{spec}' requested but CUDA is not available here")
    return dev


def setup(device: str = "auto") -> Dist:
    """Read the torchrun environment (if any) and return this process's ``Dist``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(resolve_device(device))
    if "RANK" not in os.environ:
        raise ImgclfError("WORLD_SIZE > 1 but RANK is not set: launch distributed runs with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dev, rank, world, local)


def amp_dtype(amp: str, device: torch.device, model: torch.nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None = full precision).

    ``auto``: bf16 on CUDA when the GPU supports it, else fp16; on CPU bf16 only where it pays (``cpu_bf16_pays``:
    AMX-BF16 tiles and a ``model`` without depthwise convolutions), else fp32.
    """
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cpu":
            if model is None or not cpu_bf16_pays(model):
                return None
            log.info("train.amp auto: bf16 autocast (AMX-BF16 CPU, no depthwise convolutions; --train.amp none: fp32)")
            return torch.bfloat16
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ImgclfError("train.amp: this GPU has no bf16 support; use fp16 or auto")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# Measured (README "Training speed"): CPU ms per image of one training step (forward, backward, AdamW; one thread,
# batch 16 at 224 px unless noted), the faster fp32 layout -> channels_last bf16 autocast, torch 2.14.1 on a Xeon
# with AMX-BF16: ResNet-18 134 -> 49, ResNet-50 342 -> 138, ResNet-18 at 64 px 15 -> 8, RegNetY-008 101 -> 51,
# ViT-Ti/16 99 -> 64. With depthwise convolutions bf16 is no faster or slower: EfficientNet-Lite0 140 -> 148
# (at 64 px 10 -> 24), MobileNetV3-L 79 -> 115, ConvNeXt-atto 74 -> 77.
def cpu_bf16_pays(model: torch.nn.Module) -> bool:
    """True when bf16 autocast trains ``model`` faster than fp32 on this CPU: the CPU has AMX-BF16 tiles
    (oneDNN's bf16 convolutions and matmuls run on them) and ``model`` has no depthwise convolution (a conv
    with one input channel per group: their bf16 kernels are no faster, and the casts around them cost more;
    measurements above). Without AMX (AVX512-BF16 only) fp32 stays the default."""
    return cpu_has_amx_bf16() and not any(
        isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules()
    )


def cpu_has_amx_bf16() -> bool:
    """The CPU has AMX tiles with bf16 (Intel Sapphire Rapids and later): PyTorch's own check, else
    /proc/cpuinfo's ``amx_bf16`` flag."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        try:
            return bool(check()) and bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)())
        except Exception:  # noqa: BLE001 - a private helper; fall back to the kernel's flags
            pass
    try:
        return " amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def compile_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` compiled in place for training (``train.compile``; ``nn.Module.compile``: the object, its
    parameters and its ``state_dict`` keys stay the same, no ``_orig_mod.`` prefix), returned for chaining.

    The graph is traced on the first call (and again when the input shape or the frozen layers change); a small
    function is compiled first so that a platform without a working backend (no C++ compiler for CPU, no
    Triton for CUDA, an unsupported Python) fails here, with one line, instead of inside the first step.

    Raises:
        ImgclfError: torch.compile cannot run here (names the cause and ``--train.compile false``).
    """
    try:
        fn = torch.compile(lambda t: torch.nn.functional.relu(t) * 2 + 1, dynamic=False)
        fn(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - missing compilers, Triton or Python support raise many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ImgclfError(
            f"train.compile: torch.compile does not work on this {device.type} setup ({first}); "
            "install a C++ compiler (CPU) or Triton (CUDA), or pass --train.compile false"
        ) from None
    module.compile()
    return module


def broadcast(obj, dist: Dist):
    """Rank 0's ``obj`` on every rank (identity when not distributed)."""
    if dist.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks skip a step together)."""
    if dist.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``, or a no-op."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
