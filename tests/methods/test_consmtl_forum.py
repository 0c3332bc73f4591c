"""ConsMTL and FORUM against their authors' code, transcribed step by step.

* ConsMTL: ``ConsMTL.get_weighted_loss`` + ``backward`` of ``methods/weight_methods.py`` in
  github.com/jianke0604/MTLlib (identical in github.com/jianke0604/NTKMTL): FairGrad-type shared
  update, the consistency term on the heads and both clippings.
* FORUM: ``train_FORUM`` of ``LibMTL/trainer.py`` in github.com/Baijiong-Lin/FORUM (the same as
  ``bacth_forward_FORUM`` in LibMTL): value-function constraint, the QP (14), the epoch-decayed
  moving average of λ, the joint step of α and ω.

Both transcriptions run on a tiny float64 model and are compared with ``mtl_backward``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import mtlens
from mtlens.engine import LookAhead, mtl_backward
from mtlens.errors import ConfigurationError
from mtlens.methods import available, create, describe, get

F64 = torch.float64


class Net(nn.Module):
    """Shared encoder 4 → 6 (tanh); T heads 6 → 2 → 1 (tanh), so that S_t depends on the head non-linearly."""

    def __init__(self, T: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(6, 2), nn.Tanh(), nn.Linear(2, 1)) for _ in range(T)])
        self.double()

    def forward(self, x, y):
        z = self.enc(x)
        return z, [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]


def _data(seed: int, B: int = 8, T: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, generator=g, dtype=F64)
    y = torch.randn(B, T, generator=g, dtype=F64) * 0.3 + 1.0  # aligned targets: the fair system is solvable
    return x, y


def test_registered_with_their_capabilities():
    assert {"consmtl", "forum"} <= set(available())
    assert len(available()) >= 41
    rows = {r["name"]: r for r in describe()}
    assert rows["consmtl"]["needs_saliency_graph"] and rows["consmtl"]["adds_gradients"]
    assert rows["forum"]["needs_lookahead"] and rows["forum"]["adds_gradients"]
    assert rows["forum"]["user_calls"] == ["on_epoch_end", "meta_step"]
    assert not rows["pivrg"]["adds_gradients"] and not rows["ew"]["needs_saliency_graph"]


# -- ConsMTL ------------------------------------------------------------------------------------
def _consmtl_authors(net: Net, x, y, lambda_=1.0, max_norm=1.0):
    """The authors' ConsMTL step (weight_methods.py), transcribed; leaves the gradients in ``.grad``."""
    from scipy.optimize import least_squares

    z, losses = net(x, y)
    shared = list(net.enc.parameters())
    task_specific = [p for h in net.heads for p in h.parameters()]
    T = len(losses)
    per_task = len(task_specific) // T
    delta_is = [torch.autograd.grad(l_i, z, retain_graph=True, create_graph=True)[0] for l_i in losses]
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l_i, shared, retain_graph=True)])
                         for l_i in losses], dim=1)  # (P, T), their layout
    A = (grads.t() @ grads).numpy()
    res = least_squares(lambda v: A @ v - np.power(1 / v, 0.5), np.ones(T) / T, bounds=(0, np.inf))
    w = res.x
    g = (grads * torch.as_tensor(w).view(1, -1)).sum(1) * T  # overwrite_grad: "to match the sum loss"
    beg = 0
    for p in shared:
        p.grad = g[beg:beg + p.numel()].view_as(p).clone()
        beg += p.numel()
    delta = sum(d * w[i] for i, d in enumerate(delta_is)).detach()
    for i in range(T):
        theta_i = task_specific[i * per_task:(i + 1) * per_task]
        extra = -lambda_ * torch.dot(delta_is[i].view(-1), delta.view(-1))
        g1 = torch.autograd.grad(losses[i], theta_i, retain_graph=True)
        g2 = torch.autograd.grad(extra, theta_i, retain_graph=True)
        norm1 = torch.norm(torch.cat([torch.flatten(v) for v in g1]))
        for p, v in zip(theta_i, g2):
            p.grad = v.clone()
        torch.nn.utils.clip_grad_norm_(theta_i, 0.1 * norm1)
        for p, v in zip(theta_i, g1):
            p.grad += v
    if max_norm > 0:  # their backward(): clip the shared parameters only
        torch.nn.utils.clip_grad_norm_(shared, max_norm)
    return w


@pytest.mark.parametrize("lambda_,max_norm", [(1.0, 1.0), (5.0, 0.0), (0.3, 1e3)])
def test_consmtl_matches_the_authors_code(lambda_, max_norm):
    x, y = _data(1)
    ref = Net()
    _consmtl_authors(ref, x, y, lambda_, max_norm)
    net = Net()
    z, losses = net(x, y)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(),
                       method=create("consmtl", lambda_=lambda_, max_norm=max_norm), level="param")
    assert rec.head_weights.tolist() == [1.0, 1.0, 1.0]
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        # the authors' least_squares stops at its default ftol (x to ~1e-7) and torch's clipping adds 1e-6 to ‖g2‖
        err = float((p.grad - q.grad).norm())
        assert err <= 1e-5 * float(q.grad.norm()) + 1e-12, f"{name}: ‖Δ‖ = {err:.3g}, ‖ref‖ {float(q.grad.norm()):.3g}"


def test_consmtl_head_term_is_there_and_clipped():
    x, y = _data(2)
    net = Net()
    own = []
    z, losses = net(x, y)
    for t, h in enumerate(net.heads):
        own.append(torch.autograd.grad(losses[t], list(h.parameters()), retain_graph=True))
    z, losses = net(x, y)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("consmtl"),
                       level="param")
    moved = 0
    for t, h in enumerate(net.heads):
        diff = torch.cat([(p.grad - g).reshape(-1) for p, g in zip(h.parameters(), own[t])])
        n1 = torch.cat([g.reshape(-1) for g in own[t]]).norm()
        assert float(diff.norm()) <= 0.1 * float(n1) * (1 + 1e-9)
        moved += float(diff.norm()) > 0
    assert moved == 3
    assert "consmtl/heads_clipped" in rec.method_values


def test_consmtl_without_head_term_is_the_fair_update_with_unit_heads():
    """λ = 0: the shared update of PIVRG at equal priorities, heads their own gradients."""
    x, y = _data(3)
    a, b = Net(), Net()
    for net, m in ((a, create("consmtl", lambda_=0.0)), (b, create("pivrg"))):
        z, losses = net(x, y)
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level="param")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("level", ["param", "feature"])
def test_consmtl_multi_input_and_both_levels_write_finite_gradients(level):
    net = Net()
    xs = [_data(10 + t)[0] for t in range(3)]
    ys = [_data(10 + t)[1] for t in range(3)]
    feats, losses = {}, {}
    for t in range(3):
        z = net.enc(xs[t])
        feats[f"t{t}"] = z
        losses[f"t{t}"] = ((net.heads[t](z).squeeze(-1) - ys[t][:, t]) ** 2).mean()
    mtl_backward(losses, features=feats, shared_params=net.enc.parameters(), method=create("consmtl"), level=level)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_consmtl_needs_features_and_refuses_cached_decisions():
    x, y = _data(4)
    net = Net()
    _, losses = net(x, y)
    with pytest.raises(ConfigurationError, match="features=Z"):
        mtl_backward(losses, shared_params=net.enc.parameters(), method=create("consmtl"), level="param")
    z, losses = net(x, y)
    with pytest.raises(ConfigurationError, match="update_every"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("consmtl"),
                     level="param", cache=mtlens.engine.DecisionCache(2))


def test_extra_grads_need_the_declaration():
    from mtlens.engine import Decision
    from mtlens.methods.consmtl import ConsMTL

    class Undeclared(ConsMTL):
        adds_gradients = False

    x, y = _data(5)
    net = Net()
    z, losses = net(x, y)
    with pytest.raises(ConfigurationError, match="adds_gradients"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=Undeclared(), level="param")
    assert not Decision(weights=torch.ones(2), extra_grads=[(torch.zeros(1), torch.zeros(1))]).cacheable


# -- FORUM ---------------------------------------------------------------------------------------
class LossNet(nn.Module):
    """The model as a function of the batch returning the T task losses (LibMTL's forward4loss)."""

    def __init__(self, T: int = 3):
        super().__init__()
        self.net = Net(T)

    def forward(self, batch):
        return self.net(*batch)[1]


def _forum_authors(model, alpha, alpha_opt, opt, lam_buf, epoch, inner_b, outer_b, rho=0.1, eta=0.1, inner_step=5):
    """One iteration of the authors' train_FORUM (LibMTL/trainer.py), transcribed; steps α and the model."""
    import cvxpy as cp

    T = alpha.shape[0]

    def ul(losses):
        return torch.sum(torch.softmax(alpha, dim=0) * torch.stack(losses))

    loss = ul(model(inner_b))
    g_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [alpha] + list(model.parameters()))])
    inner = copy.deepcopy(model)
    inner_opt = torch.optim.SGD(inner.parameters(), lr=eta, weight_decay=0)
    for _ in range(inner_step):
        loss = ul(inner(inner_b))
        if loss.item() > 1e5:
            break
        inner_opt.zero_grad()
        loss.backward()
        inner_opt.step()
        alpha.grad = None
    g_hat_alpha = torch.autograd.grad(ul(inner(inner_b)), alpha)[0]
    g_q = g_f.clone()
    g_q[:T] = g_q[:T] - g_hat_alpha
    losses = model(outer_b)
    params = list(model.parameters())
    # LibMTL stacks the losses into one tensor, so other heads get zero gradients (not "unused")
    gF = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(
        torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True), params)]) for t in range(T)])
    gn = gF.pow(2).sum(-1).sqrt()
    gF = gF / (1e-8 + gn.unsqueeze(1))
    gF = torch.cat([torch.zeros(T, T, dtype=F64), gF], dim=1)
    pi = [rho - float((g_q * gF[t]).sum() / (g_q.norm().pow(2) + 1e-8)) for t in range(T)]
    w_constant = rho * float(g_q.norm().pow(2) + 1e-8)
    A = torch.cat([gF, g_q.unsqueeze(0)], dim=0)
    AAT = (A @ A.t()).numpy()
    c, v = np.linalg.eig(AAT)
    gg_sqrt = np.real(v @ np.diag(np.sqrt(np.maximum(c, 0))) @ np.linalg.inv(v))
    w_cp = cp.Variable(shape=(T + 1), nonneg=True)
    constraints = [cp.sum(w_cp[:-1]) == 1, w_cp[-1] >= cp.sum([w_cp[t] * pi[t] for t in range(T)]), w_cp >= 0]
    cp.Problem(cp.Minimize(cp.quad_over_lin(gg_sqrt @ w_cp, 1) - w_cp[-1] * w_constant), constraints).solve()
    w = w_cp.value
    for t in range(T):
        lam_buf[t] = lam_buf[t] + (1 / (epoch + 1) ** (3 / 4)) * (w[t] - lam_buf[t])
    nu = max(sum(lam_buf[t] * pi[t] for t in range(T)), 0)
    g_final = sum(lam_buf[t] * gF[t] for t in range(T)) + nu * g_q
    alpha.grad = g_final[:T].clone()
    beg = 0
    grads = []
    for p in model.parameters():
        p.grad = g_final[T:][beg:beg + p.numel()].view_as(p).clone()
        grads.append(p.grad.clone())
        beg += p.numel()
    alpha_opt.step()
    opt.step()
    return grads


def test_forum_matches_the_authors_code_over_epochs():
    pytest.importorskip("cvxpy")
    T = 3
    batches = [(_data(20 + k), _data(40 + k)) for k in range(4)]
    ref = LossNet(T)
    alpha = torch.full((T,), 1 / T, dtype=F64, requires_grad=True)
    alpha_opt = torch.optim.Adam([alpha], lr=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    lam_buf = np.zeros(T)
    net = LossNet(T)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    method = create("forum", num_tasks=T, steps_per_epoch=2)
    params = list(net.parameters())
    for k, (inner_b, outer_b) in enumerate(batches):
        epoch = k // 2
        want = _forum_authors(ref, alpha, alpha_opt, ref_opt, lam_buf, epoch, inner_b, outer_b)
        opt.zero_grad()
        method.meta_step(LookAhead(params, lambda b=inner_b: net(b), lambda b=outer_b: net(b), lr=0.05))
        rec = mtl_backward(dict(zip("abc", net(inner_b))), method=method)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)  # cvxpy's QP tolerance
        opt.step()
        torch.testing.assert_close(method.state_dict()["alpha"], alpha.detach(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(method.state_dict()["lam"], torch.as_tensor(lam_buf), rtol=1e-5, atol=1e-7)
        assert rec.method_values["forum/beta"] == pytest.approx((epoch + 1) ** -0.75)
        if k % 2 == 1:
            method.on_epoch_end(torch.ones(T))


def _forum_setup():
    net = LossNet(3)
    inner_b, outer_b = _data(60), _data(61)
    la = LookAhead(list(net.parameters()), lambda: net(inner_b), lambda: net(outer_b), lr=0.05)
    return net, inner_b, la


def test_forum_owns_its_step_and_names_the_missing_call():
    pytest.importorskip("cvxpy")
    net, inner_b, la = _forum_setup()
    method = create("forum", num_tasks=3)
    with pytest.raises(ConfigurationError, match=r"meta_step\(lookahead\) was not called"):
        mtl_backward(dict(zip("abc", net(inner_b))), method=method)
    method.meta_step(la)
    mtl_backward(dict(zip("abc", net(inner_b))), method=method)
    net.zero_grad()
    with pytest.raises(ConfigurationError, match=r"meta_step\(lookahead\) was not called"):
        mtl_backward(dict(zip("abc", net(inner_b))), method=method)  # each look-ahead serves one step
    with pytest.raises(ConfigurationError, match="update_every"):
        method.meta_step(la)
        mtl_backward(dict(zip("abc", net(inner_b))), method=method, cache=mtlens.engine.DecisionCache(2))


def test_forum_qp_solution_is_feasible_and_optimal():
    """Problem (14) on a random instance: feasible, and no better than the cvxpy value of the authors' form."""
    pytest.importorskip("cvxpy")
    rng = np.random.default_rng(0)
    T = 4
    A = rng.normal(size=(T + 1, 7))
    M = A @ A.T
    pi = rng.normal(size=T) * 0.3
    c = 0.1 * M[T, T]
    w = create("forum")._solve(M, pi, c)
    assert w.shape == (T + 1,) and (w >= 0).all()
    assert abs(w[:T].sum() - 1) < 1e-6 and w[T] >= pi @ w[:T] - 1e-7
    obj = w @ M @ w - c * w[T]
    for _ in range(200):  # random feasible points are no better
        u = rng.dirichlet(np.ones(T))
        s = max(pi @ u, 0.0) + abs(rng.normal())
        v = np.append(u, s)
        assert obj <= v @ M @ v - c * s + 1e-7


def test_forum_state_round_trip_and_epoch_calls():
    pytest.importorskip("cvxpy")
    net, inner_b, la = _forum_setup()
    a = create("forum", num_tasks=3)
    for _ in range(2):
        a.meta_step(la)
        mtl_backward(dict(zip("abc", net(inner_b))), method=a)
    a.on_epoch_end(torch.ones(3))
    b = create("forum", num_tasks=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for m in (a, b):
        m.meta_step(la)
        mtl_backward(dict(zip("abc", net(inner_b))), method=m)
    for k in ("alpha", "lam"):
        torch.testing.assert_close(a.state_dict()[k], b.state_dict()[k], rtol=1e-9, atol=1e-12)
    assert a.state_dict()["_extra_state"]["epochs"] == b.state_dict()["_extra_state"]["epochs"] == 1
    c = create("forum", num_tasks=3, steps_per_epoch=1)
    with pytest.raises(ConfigurationError, match="on_epoch_end"):
        for _ in range(3):  # three steps in a one-step epoch without on_epoch_end
            c.meta_step(la)
            mtl_backward(dict(zip("abc", net(inner_b))), method=c)


def test_forum_declares_what_a_loop_must_call():
    cls = get("forum")
    assert cls.user_calls == ("on_epoch_end",) and cls.needs_lookahead and cls.adds_gradients


@pytest.mark.parametrize("level,transform", [("param", None), ("feature", "log"), ("feature", None), ("param", "log")])
def test_consmtl_accumulated_micro_batches_equal_the_concatenated_batch(level, transform):
    from mtlens.engine import TaskGradients, apply_decision, check_decision, compute_task_gradients

    x, y = _data(7, B=8)
    ref = Net()
    z, losses = ref(x, y)
    mtl_backward(losses, features=z, shared_params=ref.enc.parameters(), method=create("consmtl"), level=level,
                 loss_transform=transform)
    acc = Net()
    parts = []
    for k in range(2):
        z, losses = acc(x[4 * k:4 * (k + 1)], y[4 * k:4 * (k + 1)])
        parts.append(compute_task_gradients(losses, level=level, features=z, shared_params=list(acc.enc.parameters()),
                                            loss_transform=transform, saliency_graph=True))
    grads = TaskGradients.accumulate(parts)
    method = create("consmtl")
    apply_decision(grads, check_decision(method.decide(grads), grads, "consmtl"))
    for (name, p), q in zip(acc.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
