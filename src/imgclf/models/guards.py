"""Work-arounds for backend kernel bugs that would crash training or silently corrupt it.

``guard_channels_last``: oneDNN's channels_last *weight-gradient* kernel for a 1x1 convolution with stride > 1
and fewer than 16 input channels per group corrupts the heap on CPU (glibc "free(): invalid size" /
"corrupted double-linked list", or a segfault: exit 134/139 without a Python message); the upstream report
says other CPUs may get wrong weight gradients instead. Measured here (torch 2.14.1, Zen 5):
``Conv2d(3, 48, 1, stride=2)`` on 96x96 inputs and larger crashes for 1-15 input channels and strides 2 and 4;
16 channels, kernel 2/3, or stride 1 are fine. MobileOne and FastViT have such a layer in their stem (the
1x1 branch of the reparameterizable stem block on the RGB input). Those layers run in the contiguous format
(their input and weight), the rest of the model stays channels_last.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("imgclf")

#: input channels per group below which the oneDNN channels_last 1x1 strided weight gradient is broken
MIN_SAFE_CHANNELS = 16


def affected_by_onednn_cl_bug(m: nn.Module) -> bool:
    """``m`` is a trainable 1x1 ``Conv2d`` with stride > 1 and < 16 input channels per group."""
    return (
        isinstance(m, nn.Conv2d)
        and tuple(m.kernel_size) == (1, 1)
        and max(m.stride) > 1
        and m.in_channels // m.groups < MIN_SAFE_CHANNELS
        and m.weight.requires_grad
    )


def _plain_strides(t: torch.Tensor) -> bool:
    """``t`` has the row-major strides of its shape. ``is_contiguous()`` is not enough: a 1x1 kernel's
    channels_last weight (48, 3, 1, 1) with strides (3, 1, 3, 3) counts as contiguous, yet PyTorch's
    ``suggest_memory_format`` reads it as channels_last and picks the broken kernel."""
    expected, step = [], 1
    for n in reversed(t.shape):  # row-major strides, computed here: this runs on every forward of the layer
        expected.append(step)
        step *= n
    return t.stride() == tuple(reversed(expected))


def _contiguous(module: nn.Conv2d, args: tuple) -> tuple:
    # PyTorch picks the channels_last kernel when the input *or* the weight is channels_last: make both plain.
    # ``.data`` keeps the Parameter (optimizer state, EMA and DDP keep referring to the same object).
    if not _plain_strides(module.weight):
        module.weight.data = module.weight.data.clone(memory_format=torch.contiguous_format)
    x = args[0]
    if not _plain_strides(x):
        x = x.clone(memory_format=torch.contiguous_format)
    return (x, *args[1:])


def guard_channels_last(model: nn.Module, device: torch.device) -> list[str]:
    """On CPU, run the layers ``affected_by_onednn_cl_bug`` in the contiguous format (a forward pre-hook, so
    later ``.to(memory_format=...)`` calls cannot undo it); returns their names. No-op on other devices.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2), nn.Conv2d(8, 8, 3))
        >>> guard_channels_last(net.to(memory_format=torch.channels_last), torch.device("cpu"))
        ['0']
    """
    if device.type != "cpu":
        return []
    names = []
    for name, m in model.named_modules():
        if affected_by_onednn_cl_bug(m) and not getattr(m, "_imgclf_cl_guard", False):
            # the weight now, before EMA copies and DDP buckets see its layout; the hook keeps it so after
            # later ``.to(memory_format=...)`` calls and makes the input plain
            if not _plain_strides(m.weight):
                m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
            m.register_forward_pre_hook(_contiguous)
            m._imgclf_cl_guard = True
            names.append(name)
    if names:
        log.info("channels_last: %d layer(s) kept contiguous on CPU (oneDNN 1x1 strided weight-gradient bug): %s",
                 len(names), ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))  # fmt: skip
    return names
