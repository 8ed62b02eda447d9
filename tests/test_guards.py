"""The oneDNN channels_last weight-gradient bug (issue 12): a 1x1 stride-2 convolution on few input channels
crashes the process (heap corruption) when trained channels_last on CPU; imgclf keeps those layers contiguous."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from imgclf.models.guards import affected_by_onednn_cl_bug, guard_channels_last

_SINGLE_LAYER = """
import torch, torch.nn as nn
from imgclf.models.guards import guard_channels_last
torch.manual_seed(0)
ref = nn.Conv2d(3, 48, 1, stride=2)
conv = nn.Conv2d(3, 48, 1, stride=2)
conv.load_state_dict(ref.state_dict())
conv = conv.to(memory_format=torch.channels_last)
assert guard_channels_last(conv, torch.device("cpu")) == [""]
x = torch.randn(2, 3, 224, 224)
conv(x.to(memory_format=torch.channels_last)).square().sum().backward()
ref(x).square().sum().backward()
err = ((conv.weight.grad - ref.weight.grad).norm() / ref.weight.grad.norm()).item()
print(err)
"""


@pytest.mark.unit
def test_guarded_single_layer_trains_channels_last_and_matches_contiguous_gradients():
    """The one layer that aborts the process unguarded (``Conv2d(3, 48, 1, stride=2)``, 224 px, channels_last,
    measured exit 139 here) runs in a subprocess with the guard: no crash, the same weight gradient."""
    r = subprocess.run([sys.executable, "-c", _SINGLE_LAYER], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert float(r.stdout.strip()) < 1e-5


@pytest.mark.unit
def test_only_the_affected_convolutions_are_guarded_and_only_on_cpu():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1, stride=2),  # affected
        nn.Conv2d(8, 8, 1, stride=2, groups=8),  # depthwise: 1 channel per group, affected
        nn.Conv2d(8, 16, 3, stride=2),  # 3x3: fine
        nn.Conv2d(16, 16, 1, stride=2),  # 16 channels: fine
        nn.Conv2d(16, 4, 1),  # stride 1: fine
    ).to(memory_format=torch.channels_last)
    assert [affected_by_onednn_cl_bug(m) for m in net] == [True, True, False, False, False]
    assert guard_channels_last(net, torch.device("meta")) == []
    assert guard_channels_last(net, torch.device("cpu")) == ["0", "1"]
    assert net[0].weight.stride() == (3, 1, 1, 1)  # plain at once: before an EMA copy or DDP sees the layout
    assert guard_channels_last(net, torch.device("cpu")) == []  # once per layer
    out = net(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    assert out.shape == (2, 4, 2, 2)
    assert net[0].weight.stride() == (3, 1, 1, 1)  # the weight itself is plain now, the rest stays channels_last
    assert net[2].weight.is_contiguous(memory_format=torch.channels_last)
    frozen = nn.Conv2d(3, 8, 1, stride=2).requires_grad_(False)
    assert not affected_by_onednn_cl_bug(frozen)  # no weight gradient, no bug
