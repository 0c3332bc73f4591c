"""Bilevel methods (``needs_lookahead``): Auto-Lambda and MOML against exact hypergradients and
the authors' algorithm on a tiny model, the LookAhead interface, state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mtlens.engine import LookAhead
from mtlens.methods import create


class Net(nn.Module):
    def __init__(self, T=3):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])

    def forward(self, x):
        z = self.enc(x)
        return [(h(z) ** 2).mean() + 0.05 * (k + 1) for k, h in enumerate(self.heads)]


def _setup(T=3, seed=1):
    net = Net(T).double()
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(8, 4, generator=g, dtype=torch.float64)
    xv = torch.randn(8, 4, generator=g, dtype=torch.float64)
    params = list(net.parameters())
    la = LookAhead(params, lambda: net(xt), lambda: net(xv), lr=0.05)
    return net, xt, xv, params, la


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def test_lookahead_restores_parameters_and_steps():
    net, xt, xv, params, la = _setup()
    before = [p.detach().clone() for p in params]
    g = la.grads(la.train_losses().sum())
    new = la.sgd_step(g)
    with la.at(new):
        moved = la.train_losses().detach()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert not torch.allclose(moved, la.train_losses().detach())
    for p, v, gg in zip(params, new, g):
        torch.testing.assert_close(v, p.detach() - 0.05 * gg)


def test_auto_lambda_hypergradient_matches_exact():
    """λ's gradient −α (∇_λ ∇_θ Σλ L_tr) d equals −α ⟨∇_θ L_tr,t, d⟩ exactly (Σλ L is linear in λ):
    the authors' central finite difference must agree to O(ε²)."""
    net, xt, xv, params, la = _setup()
    m = create("auto_lambda")
    seen = []
    orig = m._lam.step
    m._lam.step = lambda grad: (seen.append(grad.clone()), orig(grad))
    m.weights(torch.ones(3, dtype=torch.float64))
    lam = m._lam.value.detach().clone()
    m.meta_step(la)
    # exact: θ' = θ − α Σ λ_t ∇L_t ; d = ∇_θ' Σ L_val(θ') ; grad_t = −α ⟨∇_θ L_tr,t(θ), d⟩
    names = [n for n, _ in net.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    Ltr = functional_call(net, theta, (xt,))
    gt = [_grads(Ltr[t], list(theta.values())) for t in range(3)]
    step = {n: theta[n] - 0.05 * sum(float(lam[t]) * gt[t][i] for t in range(3)) for i, n in enumerate(names)}
    step = {n: v.detach().requires_grad_(True) for n, v in step.items()}
    d = torch.autograd.grad(sum(functional_call(net, step, (xv,))), list(step.values()))
    exact = torch.stack([-0.05 * sum((gt[t][i] * d[i]).sum() for i in range(len(names))) for t in range(3)])
    assert float((seen[0].double() - exact).norm()) <= 1e-4 * float(exact.norm())


def _authors_auto_lambda(net, xt, xv, steps, lr=0.05, init=0.1, meta_lr=1e-4):
    """The authors' AutoLambda.unrolled_backward + Adam on meta_weights (auto_lambda.py), transcribed
    for a model whose forward returns the task losses."""
    model, model_ = net, copy.deepcopy(net)
    meta = torch.tensor([init] * 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([meta], lr=meta_lr)
    for _ in range(steps):
        loss = sum(w * v for w, v in zip(meta, model(xt)))
        grads = torch.autograd.grad(loss, model.parameters())
        with torch.no_grad():
            for w, w_, g in zip(model.parameters(), model_.parameters(), grads):
                w_.copy_(w - lr * g)
        d = torch.autograd.grad(sum(model_(xv)), tuple(model_.parameters()), allow_unused=True)
        eps = 0.01 / torch.cat([x.view(-1) for x in d]).norm()
        with torch.no_grad():
            for p, x in zip(model.parameters(), d):
                p += eps * x
        dp = torch.autograd.grad(sum(w * v for w, v in zip(meta, model(xt))), meta)[0]
        with torch.no_grad():
            for p, x in zip(model.parameters(), d):
                p -= 2 * eps * x
        dn = torch.autograd.grad(sum(w * v for w, v in zip(meta, model(xt))), meta)[0]
        with torch.no_grad():
            for p, x in zip(model.parameters(), d):
                p += eps * x
        opt.zero_grad()
        meta.grad = -lr * (dp - dn) / (2 * eps)
        opt.step()
    return meta.detach()


def test_auto_lambda_agrees_with_authors_algorithm():
    net, xt, xv, params, la = _setup()
    ref = _authors_auto_lambda(copy.deepcopy(net), xt, xv, steps=3)
    m = create("auto_lambda")
    for _ in range(3):
        m.meta_step(la)
    torch.testing.assert_close(m.weights(torch.ones(3, dtype=torch.float64)), ref, rtol=1e-6, atol=1e-9)


def test_moml_hypergradient_matches_autograd():
    """LibMTL's α-gradient of each outer loss, −η g_F,t g_fᵀ J_softmax, equals autograd through
    θ'(α) = θ − η Σ softmax(α)_t g_f,t (g_f held fixed, as in LibMTL)."""
    net, xt, xv, params, la = _setup()
    m = create("moml", inner_lr=0.1)
    seen = []
    orig = m._alpha.step
    m._alpha.step = lambda grad: (seen.append(grad.clone()), orig(grad))
    import mtlens.methods.moml as moml_mod
    H_seen = []
    orig_mn = moml_mod.min_norm_simplex
    moml_mod.min_norm_simplex = lambda G: (H_seen.append(G), orig_mn(G))[1]
    try:
        m.meta_step(la)
    finally:
        moml_mod.min_norm_simplex = orig_mn
    names = [n for n, _ in net.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    Ltr = functional_call(net, theta, (xt,))
    gf = [_grads(Ltr[t], list(theta.values())) for t in range(3)]
    alpha = torch.full((3,), 1 / 3, dtype=torch.float64, requires_grad=True)
    s = torch.softmax(alpha, 0)
    step = {n: theta[n] - 0.1 * sum(s[t] * gf[t][i] for t in range(3)) for i, n in enumerate(names)}
    F = functional_call(net, step, (xv,))
    H = torch.stack([torch.autograd.grad(F[t], alpha, retain_graph=True)[0] for t in range(3)])
    Hn = H / H.norm(dim=1, keepdim=True)
    torch.testing.assert_close(torch.as_tensor(H_seen[0]), Hn @ Hn.T, rtol=1e-8, atol=1e-12)
    # the applied direction is a convex combination of the normalised hypergradients with minimal norm
    from mtlens.methods._solvers import min_norm_simplex
    w = torch.as_tensor(min_norm_simplex((Hn @ Hn.T).numpy()).weights)
    torch.testing.assert_close(seen[0], w @ Hn, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["auto_lambda", "moml"])
def test_bilevel_state_round_trip_and_weights(name):
    net, xt, xv, params, la = _setup()
    a = create(name)
    for _ in range(2):
        a.meta_step(la)
    b = create(name)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(2):
        a.meta_step(la)
        b.meta_step(la)
    L = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(a.weights(L), b.weights(L), rtol=1e-12, atol=0)
    if name == "auto_lambda":
        assert not torch.allclose(a.weights(L), create(name).weights(L))
    else:  # here the normalised hypergradients surround 0: MGDA's min-norm point is 0, α stays (LibMTL too)
        assert float(a.weights(L).sum()) == pytest.approx(1.0)
    with pytest.raises(NotImplementedError):
        create("ew").meta_step(la)
