"""Device, rank and precision helpers: the seam where torchrun DDP slots in.

Single process today: ``rank == 0`` and ``world_size == 1``. Under torchrun the same helpers read
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, bind one device per process and only rank 0 writes files.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import ImgclfError


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


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None = full precision)."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None  # measured: fp32 + channels_last beats bf16 autocast for small convnets on CPU
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ImgclfError("train.amp: this GPU has no bf16 support; use fp16 or auto")
    return torch.bfloat16 if amp == "bf16" else torch.float16


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
