"""The one-pass Rep-MTL penalty (penalty_terms: one hand-written backward) equals the plain-autograd
implementation it replaced (tests/methods/_rep_mtl_reference.py), values and gradients, in float64."""

from __future__ import annotations

import _rep_mtl_reference as ref  # tests/methods/ is on sys.path (pytest's rootdir-relative import)
import pytest
import torch
import torch.nn.functional as F

from mtlens.methods import create
from mtlens.methods.rep_mtl import RepMTL, csa_loss, penalty_terms, tsr_loss

TIGHT = {"rtol": 1e-11, "atol": 1e-12}

# (T, B, C, *spatial): T ≤ L (anchors expanded over tasks) and T > L (einsum route, vectors), L ≤ C and L > C,
# B = 1 (no negatives), T = 1, many tasks on narrow features (anchor_gram's outer form)
SHAPES = [(2, 8, 16, 4, 4), (3, 4, 5, 2, 3), (5, 3, 4, 2, 2), (3, 5, 7), (2, 4, 3, 3, 3), (3, 1, 6, 2, 2),
          (1, 3, 4, 2, 2), (12, 6, 16), (4, 2, 6, 3)]


def _inputs(shape, seed=0, zeros=False):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(shape, generator=g, dtype=torch.float64)
    if zeros:
        S[:, 0] = 0.0  # a sample silent for every task
        if S.shape[0] > 1:
            S[1, -1] = 0.0  # one task silent on one sample
    return S


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_equal_the_previous_implementation(shape, zeros):
    S = _inputs(shape, zeros=zeros)
    for new, old in ((tsr_loss, ref.tsr_loss), (csa_loss, ref.csa_loss),
                     (lambda s: RepMTL().loss([s], None)[0], ref.rep_mtl)):
        a, b = S.clone().requires_grad_(True), S.clone().requires_grad_(True)
        va, vb = new(a), old(b)
        torch.testing.assert_close(va, vb, **TIGHT)
        (ga,), (gb,) = torch.autograd.grad(va, a), torch.autograd.grad(vb, b)
        torch.testing.assert_close(ga, gb, **TIGHT)


@pytest.mark.parametrize("form", ["printed", "infonce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("switches", [(True, True), (True, False), (False, True)])
def test_every_option_equals_the_previous_implementation(form, reduction, switches):
    tsr, csa = switches
    kw = {"lambda_tsr": 0.7, "lambda_csa": 1.3, "tau": 0.4, "tsr": tsr, "csa": csa}
    for shape in ((3, 4, 6, 2, 2), (4, 5, 3)):
        S = _inputs(shape, seed=3)
        a, b = S.clone().requires_grad_(True), S.clone().requires_grad_(True)
        new, logged = create("rep_mtl", csa_form=form, csa_task_reduction=reduction, **kw).loss([a], None)
        old = ref.rep_mtl(b, form=form, task_reduction=reduction, **kw)
        torch.testing.assert_close(new, old, **TIGHT)
        assert set(logged) == {k for k, on in (("tsr", tsr), ("csa", csa)) if on}
        torch.testing.assert_close(torch.autograd.grad(new, a)[0], torch.autograd.grad(old, b)[0], **TIGHT)


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1e8])
def test_scale_invariance_is_kept(scale):
    S = _inputs((3, 4, 6, 2, 3), seed=5)
    torch.testing.assert_close(csa_loss(S * scale), ref.csa_loss(S), **TIGHT)
    torch.testing.assert_close(RepMTL().loss([S * scale], None)[0], ref.rep_mtl(S), **TIGHT)
    Sf = S.float()
    torch.testing.assert_close(csa_loss(Sf * scale), ref.csa_loss(Sf), rtol=2e-5, atol=2e-5)


def test_through_the_second_order_path_equals_the_previous_implementation():
    """Gradients w.r.t. the heads and Z of the penalty on S = ∂L/∂Z (create_graph), as the engine uses it."""
    torch.manual_seed(0)
    z0 = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    heads = [torch.randn(2, 6, 1, 1, dtype=torch.float64) for _ in range(3)]
    y = torch.randn(3, 4, 2, 3, 3, dtype=torch.float64)

    def grads(penalty):
        z = z0.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in heads]
        losses = [F.mse_loss(torch.tanh(F.conv2d(z, w)), y[t]) for t, w in enumerate(ws)]
        S = torch.stack([torch.autograd.grad(L, z, create_graph=True)[0] for L in losses])
        return torch.autograd.grad(sum(losses) + penalty(S), [z, *ws])

    for new, old in zip(grads(lambda S: RepMTL(tau=0.3).loss([S], None)[0]),
                        grads(lambda S: ref.rep_mtl(S, tau=0.3))):
        torch.testing.assert_close(new, old, **TIGHT)


def test_gradcheck_and_second_derivatives():
    """The one-pass penalty passes gradcheck on both routes (T ≤ L and T > L) and gradgradcheck: under
    create_graph the backward is autograd's, and the second derivatives equal the previous implementation's."""
    X = torch.randn(3, 2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)  # T > L = 1
    for inp in (X, V):
        for reg in (RepMTL(tau=0.5), RepMTL(tau=0.5, csa_form="infonce", csa_task_reduction="sum")):
            assert torch.autograd.gradcheck(lambda s, r=reg: r.loss([s], None)[0], (inp,))
        assert torch.autograd.gradgradcheck(lambda s: RepMTL(tau=0.5).loss([s], None)[0], (inp,))
        (g,) = torch.autograd.grad(csa_loss(inp), inp, create_graph=True)
        (g_ref,) = torch.autograd.grad(ref.csa_loss(inp), inp, create_graph=True)
        u = torch.randn_like(inp)
        torch.testing.assert_close(torch.autograd.grad((g * u).sum(), inp)[0],
                                   torch.autograd.grad((g_ref * u).sum(), inp)[0], **TIGHT)
    tsr, csa = penalty_terms(X.reshape(3, 2, 4, 6), tau=0.5)
    torch.testing.assert_close(tsr, ref.tsr_loss(X), **TIGHT)
    torch.testing.assert_close(csa, ref.csa_loss(X, tau=0.5), **TIGHT)
    assert float(penalty_terms(X.reshape(3, 2, 4, 6), tsr=False)[0].detach()) == 0.0


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    """The hand-written backward reads its saved tensors without changing them (gradient levels differentiate the
    penalty with retain_graph=True)."""
    for shape in ((3, 4, 5, 2, 3), (4, 3, 6)):
        S = _inputs(shape, seed=7).requires_grad_(True)
        total = RepMTL().loss([S], None)[0]
        (g1,) = torch.autograd.grad(total, S, retain_graph=True)
        (g2,) = torch.autograd.grad(total, S)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
