"""Rep-MTL inside a full engine step at C = 2048: CSA never builds B·T·C² (nor any C×C matrix)."""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from mtlens.engine import mtl_backward
from mtlens.methods import create


class _Allocations(TorchDispatchMode):
    """Per op (forward and backward alike): the largest output tensor, and the peak bytes of tensor
    storage created since entering and alive at once (storages followed by weak references)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.peak_bytes = 0, None, 0
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                if o.numel() > self.largest:
                    self.largest, self.op = o.numel(), str(func)
                st = o.untyped_storage()
                if st.data_ptr() not in self.live or self.live[st.data_ptr()][0].expired():
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.live.values()))
        return out


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
    with _Allocations() as mode:
        step()
    assert mode.largest <= s_numel, f"{mode.op} produced {mode.largest} elements (S has {s_numel}, C² = {C * C})"
    # the whole step (forward, saliencies with graph, CSA/TSR, second-order backward) stays within
    # a few copies of S, far below the 4·B·T·C² bytes of the naive form (192 MiB)
    peak = mode.peak_bytes
    assert peak < 16 * s_numel * 4, (
        f"peak {peak / 2**20:.1f} MiB; S is {s_numel * 4 / 2**20:.1f} MiB, the naive CSA {naive * 4 / 2**20:.0f} MiB"
    )
