"""Every ``.grad`` the engine writes obeys autograd's layout contract (``AccumulateGrad``): it has its parameter's
strides and memory of its own, so in-place accumulation (micro-batches) and ``clip_grad_norm_`` work on it as
after ``loss.backward()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlens.engine import mtl_backward
from mtlens.methods import create

ROUTES = [
    ("ew", None, {}),  # the lean loss step
    ("uw", None, {}),
    ("ew", None, {"keep_saliencies": True}),  # the general loss step
    ("mgda", "feature", {}),
    ("upgrad", "param", {}),
    ("upgrad", "param", {"jacobian": "batched"}),
    ("pcgrad", "param", {"regularizers": "rep_mtl"}),
]
IDS = [f"{m}-{lv}-{'-'.join(o)}" for m, lv, o in ROUTES]


def _opts(opts: dict) -> dict:
    opts = dict(opts)
    if "regularizers" in opts:
        opts["regularizers"] = [create(opts["regularizers"])]
    return opts


@pytest.mark.parametrize("name,level,opts", ROUTES[:-1], ids=IDS[:-1])  # Rep-MTL needs a (B, C, ...) map
def test_an_expanded_gradient_becomes_a_grad_of_its_own(name, level, opts):
    """``(z + b).sum()``: the sum's unit gradient reaches ``b`` expanded (stride 0). Written as it is, the second
    micro-batch's accumulation and ``clip_grad_norm_`` raised "more than one element of the written-to tensor
    refers to a single memory location"."""
    torch.manual_seed(0)
    enc = nn.Parameter(torch.randn(3))
    h1, h2 = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    ref = [p.detach().clone().requires_grad_(True) for p in (enc, h1, h2)]
    method = create(name)
    for _ in range(2):  # two micro-batches accumulated into .grad
        z = enc * 2
        losses = {"a": (z * h1).pow(2).sum() + h1.sum(), "b": (z + h2).sum()}
        mtl_backward(losses, features=z, shared_params=[enc], method=method, level=level, **_opts(opts))
    for p in (enc, h1, h2):
        assert p.grad.stride() == p.stride() and p.grad.is_contiguous()
    norm = torch.nn.utils.clip_grad_norm_([enc, h1, h2], 0.1)
    assert torch.isfinite(norm)
    if name == "ew" and level is None:  # EW's gradient is the plain backward's: compare the accumulated values
        for _ in range(2):
            z = ref[0] * 2
            ((z * ref[1]).pow(2).sum() + ref[1].sum() + (z + ref[2]).sum()).backward()
        torch.nn.utils.clip_grad_norm_(ref, 0.1)
        for p, r in zip((enc, h1, h2), ref):
            torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("name,level,opts", ROUTES, ids=IDS)
def test_channels_last_parameters_get_channels_last_grads(name, level, opts):
    """A model in ``channels_last`` (4-D conv weights with NHWC strides): the .grads have the weights' strides,
    as ``loss.backward()`` gives them."""
    torch.manual_seed(1)
    enc = nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
    heads = nn.ModuleList(nn.Conv2d(8, 1, 3, padding=1).to(memory_format=torch.channels_last) for _ in range(3))
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    z = enc(x)
    losses = {f"t{i}": h(z).pow(2).mean() for i, h in enumerate(heads)}
    mtl_backward(losses, features=z, shared_params=list(enc.parameters()), method=create(name), level=level,
                 **_opts(opts))
    for p in [*enc.parameters(), *heads.parameters()]:
        assert p.grad is not None and p.grad.stride() == p.stride(), (p.shape, p.grad.stride(), p.stride())


@pytest.mark.parametrize("name,level,opts", ROUTES[:-1], ids=IDS[:-1])
def test_an_expanded_gradient_of_a_one_element_parameter_gets_the_parameters_strides(name, level, opts):
    """``b.sum()`` for ``b`` of shape (1,): its gradient is the unit gradient expanded, stride (0,) — contiguous
    by ``is_contiguous()`` (one element), yet not autograd's layout (``AccumulateGrad`` copies a size-1 dimension of
    stride 0 too). The lean steps wrote it as the .grad (stride 0) where the general path wrote stride 1."""
    torch.manual_seed(0)
    enc = nn.Parameter(torch.randn(3))
    h1, h2, h3 = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(1)), nn.Parameter(torch.randn(3))
    ref = h2.detach().clone().requires_grad_(True)
    (ref.sum() ** 2).backward()
    assert ref.grad.stride() == (1,)  # autograd's own copy
    z = enc * 2
    losses = {"a": (z * h1).pow(2).sum(), "b": (z * h3).pow(2).sum() + h2.sum() ** 2}
    mtl_backward(losses, features=z, shared_params=[enc], method=create(name), level=level, **_opts(opts))
    for p in (enc, h1, h2, h3):
        assert p.grad.stride() == p.stride(), (p.shape, p.grad.stride())
