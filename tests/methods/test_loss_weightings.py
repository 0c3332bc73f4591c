"""Loss-level weightings (uw, dwa, rlw, gls, imtl_l, famo, stch, gradnorm) and excess_mtl.

Golden values on fixed losses, behaviour over a few steps, exact resumption from state_dict,
and integration with the engine on a tiny hard-parameter-sharing model.
"""

import io
import math

import pytest
import torch
from torch import nn

import mtlens  # noqa: F401
from mtlens.engine import mtl_backward
from mtlens.errors import CheckpointError, ConfigurationError, NonFiniteError, ShapeError
from mtlens.methods import available, create, get
from mtlens.methods import testing as props

LOSS_METHODS = ["uw", "dwa", "rlw", "gls", "imtl_l", "famo", "stch", "gradnorm"]
STATEFUL = [n for n in LOSS_METHODS + ["excess_mtl"] if get(n).stateful]  # declared on the classes


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


class Net(nn.Module):
    def __init__(self, T=3):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(T)])

    def forward(self, x, ys):
        z = self.enc(x)
        return z, {f"t{i}": ((h(z) - y) ** 2).mean() + 0.1 for i, (h, y) in enumerate(zip(self.heads, ys))}


def _data(T=3, B=8):
    x = torch.randn(B, 5)
    ys = [torch.randn(B, 1) * (i + 1) for i in range(T)]
    return x, ys


def _kwargs(name, T=3):
    return {"uw": {"num_tasks": T}, "imtl_l": {"num_tasks": T}, "rlw": {"seed": 0},
            "stch": {"warmup_epochs": 0}}.get(name, {})


# ---------------------------------------------------------------------------------------------
# registry, configuration errors
# ---------------------------------------------------------------------------------------------
def test_all_registered():
    loss = available("loss")
    for n in LOSS_METHODS:
        assert n in loss
    assert "excess_mtl" in available("gradient")
    assert create("IMTL-L").name == "imtl_l"


@pytest.mark.parametrize("name,kw", [
    ("uw", {"init": float("nan")}), ("uw", {"num_tasks": 0}), ("uw", {"num_tasks": True}),
    ("uw", {"num_tasks": 2, "device": "no-such-device"}), ("uw", {"device": "cpu"}),
    ("imtl_l", {"init": float("inf")}), ("imtl_l", {"num_tasks": 1.5}),
    ("dwa", {"temperature": 0.0}), ("dwa", {"temperature": -2.0}), ("dwa", {"num_tasks": -1}),
    ("rlw", {"seed": -1}), ("rlw", {"seed": 1.5}),
    ("famo", {"lr": 0.0}), ("famo", {"gamma": -1e-3}), ("famo", {"min_losses": float("nan")}),
    ("famo", {"num_tasks": 0}), ("famo", {"min_losses": [0.0, 0.0], "num_tasks": 3}),
    ("stch", {"mu": 0.0}), ("stch", {"warmup_epochs": -1}), ("stch", {"warmup_epochs": 1.5}),
    ("stch", {"nadir": [0.0, 1.0]}),
    ("gradnorm", {"alpha": -1.0}), ("gradnorm", {"lr": 0.0}), ("gradnorm", {"min_weight": 0.0}),
    ("gradnorm", {"min_weight": 1.0}),
    ("excess_mtl", {"robust_step_size": 0.0}), ("excess_mtl", {"baseline_steps": 0}),
    ("excess_mtl", {"eps": -1.0}),
    ("gls", {"anything": 1}),
])
def test_invalid_hyperparameters(name, kw):
    with pytest.raises(ConfigurationError):
        create(name, **kw)


@pytest.mark.parametrize("name", LOSS_METHODS + ["excess_mtl"])
def test_feature_level_is_an_error(name):
    net = Net()
    z, losses = net(*_data())
    with pytest.raises(ConfigurationError, match="feature"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(),
                     method=create(name, **_kwargs(name)), level="feature")


# ---------------------------------------------------------------------------------------------
# golden values and behaviour, method by method
# ---------------------------------------------------------------------------------------------
def test_uw_golden_and_optimum():
    m = create("uw", num_tasks=2)
    m.load_state_dict({"log_vars": torch.tensor([0.0, math.log(2.0)])})
    L = torch.tensor([2.0, 4.0], requires_grad=True)
    obj, w = m.combine(L)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(obj, torch.tensor(0.5 * 2 + 0.25 * 4 + 0.5 * math.log(2.0)))
    obj.backward()
    (s,) = m.parameters()
    torch.testing.assert_close(s.grad, torch.tensor([-0.5 * 2 + 0.5, -0.25 * 4 + 0.5]))
    # minimising over s for fixed losses gives s_t = log L_t (σ² = L)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    Lf = torch.tensor([0.5, 3.0])
    for _ in range(400):
        opt.zero_grad()
        m.combine(Lf)[0].backward()
        opt.step()
    torch.testing.assert_close(s.detach(), Lf.log(), atol=2e-2, rtol=0)


def test_imtl_l_golden_and_optimum():
    m = create("imtl_l", num_tasks=2)
    m.load_state_dict({"log_scales": torch.tensor([0.0, math.log(2.0)])})
    obj, w = m.combine(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(obj, torch.tensor(1.0 + 6.0 - math.log(2.0)))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    Lf = torch.tensor([0.5, 3.0])
    for _ in range(400):
        opt.zero_grad()
        m.combine(Lf)[0].backward()
        opt.step()
    torch.testing.assert_close(m.parameters()[0].detach(), -Lf.log(), atol=2e-2, rtol=0)  # e^s L = 1


def test_learnable_scalars_lazy_creation_warns_and_load_keeps_identity():
    m = create("uw")
    assert m.parameters() == []
    with pytest.warns(UserWarning, match="optimiser"):
        m.weights(torch.ones(3))
    (s,) = m.parameters()
    assert s.requires_grad and s.shape == (3,)
    m.load_state_dict({"log_vars": torch.tensor([1.0, 2.0, 3.0])})
    assert m.parameters()[0] is s  # in place: a user optimiser keeps updating the same tensor
    with pytest.raises(ShapeError):
        m.weights(torch.ones(2))
    with pytest.raises(CheckpointError):
        m.load_state_dict({"log_vars": torch.zeros(2)})
    with pytest.raises(CheckpointError):
        create("imtl_l").load_state_dict({})


def test_dwa_epoch_logic():
    m = create("dwa")
    L = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(m.weights(L), torch.ones(2))
    m.on_epoch_end([1.0, 1.0])
    torch.testing.assert_close(m.weights(L), torch.ones(2))  # still the first two epochs
    m.on_epoch_end(torch.tensor([0.5, 1.0]))
    w = m.weights(L)
    w0 = 2 / (1 + math.exp(0.25))  # 2·softmax([0.5, 1]/2)
    torch.testing.assert_close(w, torch.tensor([w0, 2 - w0]))
    m.on_epoch_end({"a": 0.5, "b": 0.5})  # ratios now [1, 0.5]: the second task learnt faster
    w = m.weights(L)
    assert w[0] > w[1] and abs(float(w.sum()) - 2) < 1e-6
    with pytest.raises(ConfigurationError):
        m.on_epoch_end([0.0, 1.0])
    with pytest.raises(ShapeError):
        m.on_epoch_end([1.0, 1.0, 1.0])


def test_rlw_reproducible_softmax_of_normal():
    a, b = create("rlw", seed=3), create("rlw", seed=3)
    L = torch.ones(4)
    ref = torch.Generator().manual_seed(3)
    draws = []
    for _ in range(3):
        wa, wb = a.weights(L), b.weights(L)
        expected = torch.softmax(torch.randn(4, generator=ref, dtype=torch.float64), 0).float()
        torch.testing.assert_close(wa, expected)
        torch.testing.assert_close(wa, wb)
        assert abs(float(wa.sum()) - 1) < 1e-6 and bool((wa > 0).all())
        draws.append(wa)
    assert not torch.equal(draws[0], draws[1])
    mean = torch.stack([a.weights(L) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_gls_golden_and_errors():
    m = create("gls")
    L = torch.tensor([1.0, 4.0], requires_grad=True)
    obj, w = m.combine(L)
    torch.testing.assert_close(obj, torch.tensor(2.0))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25]))  # G/(T·L_t)
    (g,) = torch.autograd.grad(obj, L)
    torch.testing.assert_close(g, w)
    with pytest.raises(ConfigurationError):
        m.combine(torch.tensor([1.0, -1.0]))
    with pytest.raises(NonFiniteError):
        m.combine(torch.tensor([1.0, 0.0]))


def test_stch_golden_warmup_and_nadir():
    e = math.e
    m = create("stch", nadir=[1.0, 1.0])
    L = torch.tensor([1.0, e], dtype=torch.float64, requires_grad=True)
    obj, w = m.combine(L)
    # f = log L = [0, 1]: objective 2·log(1 + e); ∂/∂L_t = 2·softmax(f)_t / L_t = 2/(1+e) for both
    torch.testing.assert_close(obj, torch.tensor(2 * math.log(1 + e), dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w, torch.full((2,), 2 / (1 + e), dtype=torch.float64), atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(obj, L)
    torch.testing.assert_close(g, w)

    m = create("stch", warmup_epochs=1, mu=0.5)
    L = _t(2.0, 8.0)
    for _ in range(2):  # epochs 0 and 1 are warm-up: objective Σ log L, weights 1/L
        torch.testing.assert_close(m.weights(L), 1 / (L + 1e-8))
        assert m.log_values() == {"warmup": 1.0}
        m.on_epoch_end(_t(2.0, 4.0))
    assert m.log_values() == {"warmup": 0.0}
    f = torch.log(L / _t(2.0, 4.0) + 1e-8)  # nadir from epoch 1
    expected = 2 * torch.softmax(f / 0.5, 0) / (L + 1e-8 * _t(2.0, 4.0))
    torch.testing.assert_close(m.weights(L), expected)
    # smaller μ concentrates the weight on the worst normalised loss
    w_sharp = create("stch", nadir=[1.0, 1.0], mu=0.05).weights(_t(1.0, 2.0)) * _t(1.0, 2.0)
    assert w_sharp[1] / w_sharp[0] > 1e5


def test_famo_golden_and_logit_direction():
    m = create("famo")
    w = m.weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]))  # c = 1.5, w = c·z/L
    # task 0 halves, task 1 barely moves: the logit of task 1 must grow
    m.after_step(torch.tensor([0.5, 2.7]))
    xi = m.state_dict()["logits"]
    torch.testing.assert_close(xi, torch.tensor([-0.025, 0.025]), atol=1e-5, rtol=0)  # first Adam step
    w2 = m.weights(torch.tensor([1.0, 3.0]))
    assert w2[1] > 0.25 and abs(float(w2.sum()) - 1) < 1e-6
    with pytest.raises(ConfigurationError, match="min_losses"):
        create("famo", min_losses=[0.0, 2.0]).weights(torch.tensor([1.0, 1.0]))
    with pytest.raises(ConfigurationError, match="after_step"):
        create("famo").after_step(torch.tensor([1.0, 1.0]))
    m.after_step([0.9, 2.9])
    with pytest.raises(ConfigurationError, match="after_step"):
        m.after_step([0.9, 2.9])  # once per weighting call


def test_famo_min_losses_shift():
    m = create("famo", min_losses=[0.5, 1.0])
    w = m.weights(torch.tensor([1.0, 2.0]))  # shifted losses [0.5, 1]: c = 1/(0.5/0.5 + 0.5/1)
    torch.testing.assert_close(w, torch.tensor([2 / 3, 1 / 3]), atol=1e-6, rtol=0)


def test_gradnorm_golden_first_steps():
    m = create("gradnorm")
    L, n = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])
    w0 = m.weights(L, grad_norms=n)
    torch.testing.assert_close(w0, torch.ones(2))  # w(0) is used for the first update
    # r = 1, target = mean(G) = 2; ∂L_grad/∂w = sign(G - 2)·n = [-1, 3]; one Adam step of 0.025
    torch.testing.assert_close(m.weights(L, grad_norms=n), torch.tensor([1.025, 0.975]), atol=1e-6, rtol=0)
    assert m.log_values()["l_grad"] > 0
    with pytest.raises(ConfigurationError, match="grad_norms"):
        m.weights(L)
    with pytest.raises(ShapeError):
        m.weights(L, grad_norms=torch.ones(3))


@pytest.mark.parametrize("alpha,decrease,ratio", [(1.5, [1.0, 1.0], 1.0), (1.5, [1.0, 0.5], 2 ** 1.5),
                                                   (0.0, [1.0, 0.5], 1.0)])
def test_gradnorm_balances_gradient_norms(alpha, decrease, ratio):
    m = create("gradnorm", alpha=alpha, lr=0.01)
    n = torch.tensor([1.0, 4.0])
    L0 = torch.tensor([2.0, 3.0])
    m.weights(L0, grad_norms=n)  # records L(0)
    L = L0 * torch.tensor(decrease)
    for _ in range(400):
        w = m.weights(L, grad_norms=n)
    # equilibrium: w_t n_t ∝ r_t^α, r = inverse training rates
    got = float(w[0] * n[0] / (w[1] * n[1]))
    assert abs(got / ratio - 1) < 0.1, (got, ratio)
    assert abs(float(w.sum()) - 2) < 1e-5 and bool((w > 0).all())


def test_excess_mtl_golden():
    m = create("excess_mtl")
    J1 = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    out, head_w = m.aggregate(J1, torch.ones(2))
    torch.testing.assert_close(head_w, torch.ones(2, dtype=torch.float64))  # head rule: unit weights
    w = m.last_weights
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))  # baseline step: weights 1
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(m.log_values()["excess_risk/1"], 4 / math.sqrt(4 + 1e-7))
    J2 = [torch.tensor([[2.0, 0.0], [0.0, 2.0]])]
    out, _ = m.aggregate(J2, torch.ones(2))
    w = m.last_weights
    er = torch.tensor([4 / math.sqrt(5 + 1e-7), 4 / math.sqrt(8 + 1e-7)], dtype=torch.float64)
    base = torch.tensor([1 / math.sqrt(1 + 1e-7), 4 / math.sqrt(4 + 1e-7)], dtype=torch.float64)
    expected = 2 * torch.softmax(0.01 * er / base, 0)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(out[0], (expected.float()[:, None] * J2[0]).sum(0))
    assert w[0] > 1 > w[1]  # task 0 is further from convergence


def test_excess_mtl_errors():
    m = create("excess_mtl")
    with pytest.raises(NonFiniteError, match="baseline"):
        m.aggregate([torch.tensor([[1.0, 0.0], [0.0, 0.0]])], torch.ones(2))
    m = create("excess_mtl")
    m.aggregate([torch.ones(2, 3)], torch.ones(2))
    with pytest.raises(ShapeError):
        m.aggregate([torch.ones(2, 4)], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# state_dict round trip: resuming gives the same subsequent weights
# ---------------------------------------------------------------------------------------------
def _losses_at(k, T=3):
    return torch.tensor([1.0 + 0.3 * math.sin(k + t) + 0.2 * t for t in range(T)])


def _run(m, name, k0, k1, T=3):
    """A scripted sequence of calls (epoch ends, extra forwards, optimiser steps); returns the weights."""
    out = []
    opt = torch.optim.SGD(m.parameters(), lr=0.1) if m.parameters() else None
    for k in range(k0, k1):
        L = _losses_at(k, T)
        if name == "excess_mtl":
            g = torch.Generator().manual_seed(k)
            m.aggregate([torch.randn(T, 3, 2, generator=g), torch.randn(T, 2, generator=g)], L)
            w = m.last_weights
        else:
            Lg = L.clone().requires_grad_(True)
            obj, w = m.combine(Lg, grad_norms=torch.tensor([1.0, 2.0, 0.5]) * (1 + 0.1 * k))
            if opt is not None:
                opt.zero_grad()
                obj.backward()
                opt.step()
        if name == "famo":
            m.after_step(L * torch.tensor([0.9, 0.97, 0.95]))
        if k % 2 == 1:
            m.on_epoch_end(L)
        out.append(w.detach().clone())
    return out


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip(name):
    kw = {"stch": {"warmup_epochs": 1}, "rlw": {"seed": 1}}.get(name, {})
    if name in ("uw", "imtl_l"):
        kw = {"num_tasks": 3}
    m1 = create(name, **kw)
    _run(m1, name, 0, 5)
    buf = io.BytesIO()
    torch.save(m1.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    after1 = _run(m1, name, 5, 10)
    m2 = create(name, **kw)
    m2.load_state_dict(state)
    after2 = _run(m2, name, 5, 10)
    for a, b in zip(after1, after2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    fresh = _run(create(name, **kw), name, 5, 10)  # the state matters: without it the weights differ
    assert any(not torch.allclose(a, b) for a, b in zip(after1, fresh))


# ---------------------------------------------------------------------------------------------
# properties claimed on the classes (Method.claims), checked with mtlens.methods.testing
# ---------------------------------------------------------------------------------------------
def _loss_claiming(prop):
    return [n for n in available("loss") if prop in get(n).claims]


_LOSS_SEQUENCE = [_t(0.7, 1.9, 0.4), _t(0.6, 1.5, 0.45), _t(0.5, 1.2, 0.41)]


@pytest.mark.parametrize("name", _loss_claiming("permutation_invariant"))
def test_loss_weights_permute_with_the_tasks(name):
    perm = torch.tensor([2, 0, 1])
    props.assert_weights_permute(lambda: create(name, **_kwargs(name)), _LOSS_SEQUENCE, perm)


@pytest.mark.parametrize("name", _loss_claiming("weights_total"))
def test_loss_weights_total(name):
    m = create(name, **_kwargs(name))
    total = type(m).claims["weights_total"].total
    for k, L in enumerate(_LOSS_SEQUENCE):
        props.assert_weights_total(m, L, total)
        if "on_epoch_end" in m.user_calls:  # DWA: past the first two epochs, the weights move
            m.on_epoch_end(L * (1.0 + 0.1 * k))


@pytest.mark.parametrize("name", _loss_claiming("rescaling_invariant"))
def test_loss_update_direction_invariant_to_loss_rescaling(name):
    scales = _t(0.1, 1.0, 250.0)  # losses ≥ 0.04: FAMO's and STCH's ε = 1e-8 stays below the tolerance
    for L in _LOSS_SEQUENCE:
        props.assert_loss_rescaling_invariant(lambda: create(name, **_kwargs(name)), L, scales)


def test_stateless_gls_has_empty_state():
    m = create("gls")
    assert m.state_dict() == {}
    with pytest.raises(ValueError):
        m.load_state_dict({"x": 1})


# ---------------------------------------------------------------------------------------------
# integration with the engine
# ---------------------------------------------------------------------------------------------
def _engine_step(net, method, x, ys, **kw):
    net.zero_grad(set_to_none=True)
    for p in method.parameters():
        p.grad = None
    z, losses = net(x, ys)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=method, **kw)
    return rec, losses


@pytest.mark.parametrize("name", LOSS_METHODS + ["excess_mtl"])
def test_engine_integration(name):
    net = Net()
    x, ys = _data()
    m = create(name, **_kwargs(name))
    opt = torch.optim.SGD(list(net.parameters()) + m.parameters(), lr=0.01)
    for step in range(3):
        rec, losses = _engine_step(net, m, x, ys)
        w = rec.weights
        assert w is not None and w.shape == (3,) and bool(torch.isfinite(w).all())
        got = [p.grad.clone() for p in net.parameters()]
        for g in got:
            assert g is not None and bool(torch.isfinite(g).all())
        # every objective here has ∂objective/∂L_t = logged weight, so the update is Σ_t w_t ∇L_t
        _, ref_losses = net(x, ys)
        weighted = sum(float(wi) * L for wi, L in zip(w, ref_losses.values()))
        ref = list(torch.autograd.grad(weighted, list(net.parameters()), retain_graph=True))
        if m.family == "gradient":  # the head rule: each head gets its own task's gradient (unit weights)
            n_enc = len(list(net.enc.parameters()))
            ref[n_enc:] = torch.autograd.grad(sum(ref_losses.values()), list(net.heads.parameters()))
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        for p in m.parameters():  # learnable weightings: their scalars are trained too
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).any())
        opt.step()
        if m.needs_extra_forward:
            with torch.no_grad():
                m.after_step(torch.stack(list(net(x, ys)[1].values())))
        if step == 1:
            m.on_epoch_end(torch.stack([L.detach() for L in losses.values()]))
    if name == "stch":
        assert m.log_values() == {"warmup": 0.0}  # nadir taken from epoch 0, STCH from epoch 1 on


def test_engine_gradnorm_measures_last_shared_layer():
    net = Net(T=2)
    x, ys = _data(T=2)
    m = create("gradnorm", num_tasks=2)
    _engine_step(net, m, x, ys)
    # first call: r = 1, so the task with the larger gradient norm on the last shared weight loses weight
    _, losses = net(x, ys)
    W = net.enc[2].weight
    norms = [torch.autograd.grad(L, W, retain_graph=True)[0].norm() for L in losses.values()]
    w = m.state_dict()["task_weights"]
    big = int(torch.stack(norms).argmax())
    assert w[big] < 1 < w[1 - big]


def test_engine_uw_lazy_parameters_get_gradients():
    net = Net()
    x, ys = _data()
    m = create("uw")
    with pytest.warns(UserWarning):
        rec, losses = _engine_step(net, m, x, ys)
    (s,) = m.parameters()
    L = torch.stack([v.detach() for v in losses.values()])
    torch.testing.assert_close(s.grad, -0.5 * L + 0.5)  # at s = 0
