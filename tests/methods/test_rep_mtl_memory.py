"""Rep-MTL inside a full engine step at C = 2048: CSA never builds B·T·C² (nor any C×C matrix)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mtlens.engine import mtl_backward
from mtlens.methods import create


class _LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op produces (forward and backward ops alike)."""

    def __init__(self):
        super().__init__()
        self.peak, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.numel() > self.peak:
                self.peak, self.op = o.numel(), str(func)
        return out


def _peak_bytes(fn) -> int:
    """Peak CPU bytes allocated during ``fn()`` above what was live before (torch.profiler timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        timeline = prof._memory_profile().timeline
    live = peak = 0
    for t, action, _key, size in sorted(timeline, key=lambda e: e[0]):
        if t < 0:
            continue
        live += size if action == Action.CREATE else (-size if action == Action.DESTROY else 0)
        peak = max(peak, live)
    return peak


def test_rep_mtl_step_at_2048_channels_stays_linear_in_C():
    torch.manual_seed(0)
    T, B, C, H = 3, 4, 2048, 4  # HW = 16 < C: the naive CSA would build B·T C×C matrices
    enc = nn.Conv2d(8, C, 1)  # wide feature map, as a dilated ResNet-50's 2048 channels
    heads = nn.ModuleList(nn.Conv2d(C, 1, 1) for _ in range(T))
    x, y = torch.randn(B, 8, H, H), torch.randn(T, B, 1, H, H)
    ew, rep = create("ew"), create("rep_mtl")

    def step():
        z = enc(x)
        losses = {f"t{t}": ((h(z) - y[t]) ** 2).mean() for t, h in enumerate(heads)}
        rec = mtl_backward(losses, features=z, shared_params=enc.parameters(), method=ew, regularizers=[rep])
        assert rec.regularizer_values["rep_mtl/csa"] == rec.regularizer_values["rep_mtl/csa"]  # computed

    s_numel = T * B * C * H * H  # the stacked saliencies S
    naive = B * T * C * C  # what Eq. 7 computed literally would hold
    with _LargestTensor() as mode:
        step()
    assert mode.peak <= s_numel, f"{mode.op} produced {mode.peak} elements (S has {s_numel}, C² = {C * C})"
    for p in list(enc.parameters()) + list(heads.parameters()):
        p.grad = None
    peak = _peak_bytes(step)
    # the whole step (forward, saliencies with graph, CSA/TSR, second-order backward) stays within
    # a few copies of S (≈ 6.5 measured), far below the 4·B·T·C² bytes of the naive form (192 MiB)
    assert peak < 16 * s_numel * 4, (
        f"peak {peak / 2**20:.1f} MiB; S is {s_numel * 4 / 2**20:.1f} MiB, the naive CSA {naive * 4 / 2**20:.0f} MiB"
    )
