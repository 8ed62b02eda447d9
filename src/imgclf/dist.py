"""Device, rank and precision helpers, and the collectives imgclf uses under torchrun.

A plain run is one process: ``rank == 0`` and ``world_size == 1`` and every helper here is a no-op. Under
``torchrun`` (PyTorch's own launcher: one process per device, rendezvous over c10d) ``setup`` reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, binds one device per process, joins the process group (nccl on CUDA,
gloo on CPU) with ``train.dist_timeout`` and remembers the result as the process's ``current()``. Then:

- evaluation loaders shard their inputs over the ranks without padding (``shard``; ``data.loader.ShardSampler``)
  and ``models.inference.infer`` gathers the outputs back in input order (``gather_cat``), so validation, test
  metrics, prediction and feature extraction are exact and every rank holds the whole result;
- only rank 0 writes files; code that runs on rank 0 alone wraps itself in ``rank_zero_only()`` so the loaders
  inside it do not shard (a shard gathered by one rank would wait for the others forever).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .errors import ImgclfError

#: commands that run under torchrun (every rank runs the command; rank 0 writes); the others refuse
DISTRIBUTED_COMMANDS = ("train", "predict", "eval", "calibrate", "knn", "audit", "rebalance")


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


class _Process:
    current: Dist | None = None  # set by ``setup``
    local_depth = 0  # > 0 inside ``rank_zero_only``


def world_size_env() -> int:
    """``WORLD_SIZE`` of the torchrun environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto", timeout: float = 600.0) -> Dist:
    """Read the torchrun environment (if any), join the process group and return this process's ``Dist`` (also
    ``current()`` from now on). ``timeout``: seconds a collective waits for the other ranks before failing.

    Raises:
        ImgclfError: ``WORLD_SIZE`` > 1 without ``RANK`` (started by hand, not by torchrun); an unknown device.
    """
    world = world_size_env()
    if world <= 1:
        _Process.current = Dist(resolve_device(device))
        return _Process.current
    if "RANK" not in os.environ:
        raise ImgclfError("WORLD_SIZE > 1 but RANK is not set: launch distributed runs with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))  # fmt: skip
    _Process.current = Dist(dev, rank, world, local)
    return _Process.current


def current() -> Dist | None:
    """The ``Dist`` of the last ``setup`` in this process (None before any)."""
    return _Process.current


def shard() -> tuple[int, int]:
    """(rank, world_size) over which evaluation inputs are split now: (0, 1) outside torchrun and inside
    ``rank_zero_only``."""
    d = _Process.current
    if d is None or d.world_size == 1 or _Process.local_depth:
        return 0, 1
    return d.rank, d.world_size


@contextmanager
def rank_zero_only():
    """A section only rank 0 runs (writing the report, ...): loaders created inside it read all their inputs."""
    _Process.local_depth += 1
    try:
        yield
    finally:
        _Process.local_depth -= 1


def gather_cat(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Every rank's ``t`` (lengths may differ along dim 0) concatenated in rank order, on every rank, on ``t``'s
    device. Sent through ``dist.device`` (nccl needs CUDA tensors); shapes beyond dim 0 must agree."""
    if dist.world_size == 1:
        return t
    n = torch.tensor([len(t)], device=dist.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size)]
    torch.distributed.all_gather(sizes, n)
    lens = [int(s.item()) for s in sizes]
    send = t.to(dist.device)
    if len(t) < max(lens):
        send = torch.cat([send, send.new_zeros((max(lens) - len(t), *t.shape[1:]))])
    parts = [torch.empty_like(send) for _ in lens]
    torch.distributed.all_gather(parts, send.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, lens)]).to(t.device)


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's picklable ``obj`` in rank order (imgclf's own values only: skip lists, counts)."""
    if dist.world_size == 1:
        return [obj]
    out = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, dist: Dist) -> None:
    """Rank 0's parameters and buffers into ``module`` on every rank (BatchNorm statistics and the EMA drift apart
    per rank between DDP's broadcasts); once per epoch, before validation and checkpoints."""
    if dist.world_size == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


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


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``, or a no-op."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
