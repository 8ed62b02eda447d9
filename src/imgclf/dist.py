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
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .errors import ImgclfError

log = logging.getLogger("imgclf")
#: commands that run under torchrun (every rank runs the command; rank 0 writes); the others refuse
DISTRIBUTED_COMMANDS = ("train", "pretrain", "predict", "eval", "calibrate", "knn", "audit", "rebalance")


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


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``, or a no-op."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
