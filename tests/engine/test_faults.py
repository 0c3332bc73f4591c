"""The engine's fault classes (issue: second engine design): head gradients, graph freeing,
several shared maps vs multi-input, permutation invariance at feature level."""

import warnings

import pytest
import torch
from _nets import TinyNet
from torch import nn

from mtlens.engine import mtl_backward
from mtlens.errors import ConfigurationError
from mtlens.methods import available, create, get

GRADIENT_METHODS = available("gradient")


def _kwargs(name):
    return {"seed": 0} if "seed" in create(name).hparams() else {}


# ---- 1. heads receive their own task's gradient, scaled by the method's declared head weight ----
def test_issue_example_pcgrad_heads_get_their_own_gradient():
    W = nn.Parameter(torch.eye(2))
    ha = nn.Parameter(torch.tensor([1.0, 0.0]))
    hb = nn.Parameter(torch.tensor([-1.0, 1.0]))
    z = W @ torch.tensor([1.0, 1.0])
    losses = {"a": ha @ z, "b": hb @ z}
    mtl_backward(losses, features=z, shared_params=[W], method=create("pcgrad", seed=0), level="param")
    torch.testing.assert_close(ha.grad, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(hb.grad, torch.tensor([1.0, 1.0]))


def _Net(T=3):
    return TinyNet(T, offsets=[0.05 * (i + 1) for i in range(T)])

@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_every_gradient_method_follows_its_head_rule(name):
    cls = get(name)
    assert cls.head_rule, f"{name} declares no head rule"
    for level in cls.levels:
        torch.manual_seed(0)
        net = _Net()
        x = torch.randn(6, 5)
        _, losses = net(x)
        tf = torch.log if cls.loss_transform == "log" else (lambda v: v)  # DB-MTL: heads get ∇ log L_t
        own = [torch.autograd.grad(tf(L + (1e-8 if cls.loss_transform else 0.0)), list(h.parameters()),
                                   retain_graph=True) for L, h in zip(losses.values(), net.heads)]
        net.zero_grad(set_to_none=True)
        z, losses = net(x)
        rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create(name, **_kwargs(name)),
                           level=level)
        hw = rec.head_weights
        assert hw is not None and hw.shape == (3,)
        if cls.head_rule.startswith("own gradient"):
            torch.testing.assert_close(hw, torch.ones(3, dtype=torch.float64))
        if cls.adds_gradients:  # a term of its own on top (ConsMTL: tests/methods/test_consmtl_forum.py)
            continue
        for t, h in enumerate(net.heads):
            for p, g in zip(h.parameters(), own[t]):
                torch.testing.assert_close(p.grad, float(hw[t]) * g, rtol=1e-5, atol=1e-7)


# ---- 2. retain_graph=False frees the graph at every level and family ----------------------------
@pytest.mark.parametrize("name,level", [("ew", None), ("mgda", "param"), ("mgda", "feature"),
                                        ("pcgrad", "param"), ("db_mtl", "param"), ("graddrop", "feature")])
@pytest.mark.parametrize("with_features", [True, False])
def test_graph_is_freed_after_the_step(name, level, with_features):
    if level == "feature" and not with_features:
        pytest.skip("feature level needs features")
    net = _Net()
    z, losses = net(torch.randn(4, 5))
    mtl_backward(losses, features=z if with_features else None, shared_params=net.enc.parameters(),
                 method=create(name, **_kwargs(name)), level=level)
    for t, L in enumerate(losses.values()):
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            torch.autograd.grad(L, list(net.heads[t].parameters()))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(z.sum(), list(net.enc.parameters()))


@pytest.mark.parametrize("level", ["param", "feature"])
def test_retain_graph_true_keeps_it(level):
    net = _Net()
    z, losses = net(torch.randn(4, 5))
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("mgda"), level=level,
                 retain_graph=True)
    torch.autograd.grad(sum(losses.values()), list(net.parameters()))  # still there


# ---- 3. several shared maps of one input vs multi-input ----------------------------------------
class _TwoMaps(nn.Module):
    """One input, two shared maps from parallel branches; both heads read both."""

    def __init__(self):
        super().__init__()
        self.low = nn.Linear(4, 3)
        self.high = nn.Linear(4, 3)
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])

    def forward(self, x):
        zl, zh = torch.tanh(self.low(x)), torch.tanh(self.high(x))
        zz = torch.cat([zl, zh], 1)
        return [zl, zh], {f"t{i}": (h(zz) ** 2).mean() for i, h in enumerate(self.heads)}


@pytest.mark.parametrize("level", ["param", "feature"])
def test_several_shared_maps_of_one_input_give_the_exact_update(level):
    torch.manual_seed(1)
    net = _TwoMaps()
    x = torch.randn(5, 4)
    shared = list(net.low.parameters()) + list(net.high.parameters())
    _, losses = net(x)
    # reference: per-task gradients on the shared parameters (param level) or on (zl, zh) (feature level)
    maps, losses = net(x)
    if level == "param":
        J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, shared, retain_graph=True)])
                         for L in losses.values()])
    else:
        J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, maps, retain_graph=True)])
                         for L in losses.values()])
    G = (J.double() @ J.double().T)
    w = create("mgda").weights(G, torch.ones(2))
    ref = torch.autograd.grad(sum(float(wi) * L for wi, L in zip(w, losses.values())), shared)
    maps, losses = net(x)
    rec = mtl_backward(losses, features=maps, shared_params=shared, method=create("mgda"), level=level)
    torch.testing.assert_close(rec.gramian, G, rtol=1e-5, atol=1e-8)
    for p, r in zip(shared, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_dependent_maps_exact_at_param_level_refused_at_feature_level():
    enc1, enc2 = nn.Linear(4, 3), nn.Linear(3, 3)
    heads = [nn.Linear(6, 1), nn.Linear(6, 1)]
    x = torch.randn(5, 4)
    shared = list(enc1.parameters()) + list(enc2.parameters())

    def fwd():
        zl = torch.tanh(enc1(x))
        zh = torch.tanh(enc2(zl))
        zz = torch.cat([zl, zh], 1)
        return [zl, zh], {f"t{i}": (h(zz) ** 2).mean() for i, h in enumerate(heads)}

    maps, losses = fwd()
    ref = torch.autograd.grad(sum(losses.values()), shared)
    maps, losses = fwd()
    mtl_backward(losses, features=maps, shared_params=shared, method=create("upgrad"), level="param")
    maps, losses = fwd()
    J = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, shared, retain_graph=True)])
         for L in losses.values()]
    assert all(p.grad is not None for p in shared)
    del ref, J
    maps, losses = fwd()
    with pytest.raises(ConfigurationError, match="computed from another"):
        mtl_backward(losses, features=maps, shared_params=shared, method=create("mgda"), level="feature")


def test_multi_input_raises_when_a_task_reaches_another_tasks_map():
    enc = nn.Linear(4, 3)
    head = nn.Linear(3, 1)
    za, zb = enc(torch.randn(2, 4)), enc(torch.randn(2, 4))
    losses = {"a": head(za).pow(2).mean(), "b": head(zb + za).pow(2).mean()}
    with pytest.raises(ConfigurationError, match="reaches the representation of task"):
        mtl_backward(losses, features={"a": za, "b": zb}, shared_params=enc.parameters(), method=create("mgda"))


# ---- 4. multi-input at feature level: invariant to permuting a task's batch ----------------------
@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad", "nash_mtl", "aligned_mtl", "imtl_g"])
def test_multi_input_feature_level_is_permutation_invariant(name):
    torch.manual_seed(3)
    enc = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    heads = [nn.Linear(5, 1), nn.Linear(5, 1)]
    xa, xb = torch.randn(6, 4), torch.randn(6, 4)
    ya, yb = torch.randn(6, 1), torch.randn(6, 1)
    out = []
    for perm in (torch.arange(6), torch.randperm(6)):
        for p in enc.parameters():
            p.grad = None
        za, zb = enc(xa), enc(xb[perm])
        losses = {"a": (heads[0](za) - ya).pow(2).mean(), "b": (heads[1](zb) - yb[perm]).pow(2).mean()}
        rec = mtl_backward(losses, features={"a": za, "b": zb}, shared_params=enc.parameters(), method=create(name),
                           level="feature")
        out.append((rec.weights.clone(), [p.grad.clone() for p in enc.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- zero shared gradient: warn once, naming the task; heads keep training ----------------------
def test_task_not_reaching_the_encoder_warns_once_and_its_head_trains():
    import mtlens.engine.gradients as g

    g._warned_zero.discard("skip_enc")
    enc = nn.Linear(4, 3)
    ha, hb = nn.Linear(3, 1), nn.Linear(4, 1)
    x = torch.randn(5, 4)
    for step in range(2):
        z = enc(x)
        losses = {"uses_enc": ha(z).pow(2).mean(), "skip_enc": hb(x).pow(2).mean() + 0 * z.sum()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = mtl_backward(losses, features=z, shared_params=enc.parameters(), method=create("mgda"))
        msgs = [str(w.message) for w in caught if "exactly zero" in str(w.message)]
        assert len(msgs) == (1 if step == 0 else 0)
        if msgs:
            assert "'skip_enc'" in msgs[0]
        assert hb.weight.grad is not None and bool(hb.weight.grad.abs().sum() > 0)
        assert float(rec.weights[1]) == 1.0  # MGDA's minimum norm point is the zero gradient
        hb.zero_grad()
