"""A monitored loss weighting (compute_gramian="param") writes Σ_t w_t g_t from the per-task rows it computed for
the Gramian, instead of a second, full backward of its objective — the same gradients, checks and messages."""

import pytest
import torch
from _nets import TinyNet

from mtlens.engine import mtl_backward
from mtlens.engine.protocols import objective_is_weighted_sum
from mtlens.errors import NonFiniteError
from mtlens.methods import available, create

WEIGHTED_SUM = [n for n in available("loss") if objective_is_weighted_sum(create(n))]


def _grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _step(net, x, method, seed=0, stacked=False, **kw):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # RLW draws its weights: the same draw in both steps compared
    if method.needs_second_batch:  # SDMGrad, MoDo: a fixed cross-Gramian (the trainer measures one each step)
        T = len(net.heads)
        method.observe_cross_gramian(torch.eye(T, dtype=torch.float64) + 0.1)
    z, losses = net(x)
    if stacked:
        losses = torch.stack(list(losses.values()))
    rec = mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=method, **kw)
    return rec, _grads(net)


def test_which_methods_have_a_weighted_sum_objective():
    # the default combine, or EW's declared one; learnable / nonlinear objectives (UW, IMTL-L, STCH, ...) are not
    assert {"ew", "dwa", "rlw", "famo"} <= set(WEIGHTED_SUM)
    for name in ("uw", "imtl_l", "stch", "si", "gradnorm", "auto_lambda", "moml", "gls", "forum"):
        assert not objective_is_weighted_sum(create(name)), name
    assert not objective_is_weighted_sum(create("mgda"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", WEIGHTED_SUM)
@pytest.mark.parametrize("stacked", [False, True])
def test_monitored_step_writes_the_objectives_gradient(name, stacked):
    torch.manual_seed(0)
    net, x = TinyNet(4), torch.randn(16, 5)
    torch.manual_seed(1)  # RLW seeds its generator from the global RNG when created: the same draws in both
    rec0, plain = _step(net, x, create(name), stacked=stacked)  # the objective's own backward (no rows)
    torch.manual_seed(1)
    rec1, rows = _step(net, x, create(name), stacked=stacked, compute_gramian="param")
    assert rec0.gramian is None and rec1.gramian is not None and rec1.level == "param"
    torch.testing.assert_close(rec1.weights, rec0.weights)
    for a, b in zip(rows, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _count_encoder_backwards(net):
    calls: list[int] = []  # a leaf's hook runs each time a backward computes its gradient (autograd.grad too)
    net.enc[0].weight.register_hook(lambda g: calls.append(1))
    return calls


def test_no_second_backward_through_the_encoder():
    torch.manual_seed(0)
    T = 3
    net, x = TinyNet(T), torch.randn(8, 5)
    calls = _count_encoder_backwards(net)
    _step(net, x, create("ew"), compute_gramian="param")
    assert len(calls) == T  # the T rows of the Jacobian; the objective's backward would have been one more
    calls.clear()
    _step(net, x, create("uw", num_tasks=T), compute_gramian="param")  # not a weighted sum: its own backward
    assert len(calls) == T + 1


def test_a_leaf_outside_the_shared_parameters_keeps_the_objectives_backward():
    torch.manual_seed(0)
    net, x = TinyNet(3), torch.randn(8, 5)
    first = list(net.enc[0].parameters())

    def step(**kw):
        net.zero_grad(set_to_none=True)
        z, losses = net(x)
        mtl_backward(losses, features=z, shared_params=list(net.enc[2].parameters()), method=create("ew"), **kw)
        return _grads(net)

    plain, monitored = step(), step(compute_gramian="param")
    assert all(p.grad is not None for p in first)  # the first layer (not declared shared) still trained
    for a, b in zip(monitored, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_retain_graph_keeps_the_graph_and_default_frees_it():
    torch.manual_seed(0)
    net, x = TinyNet(2), torch.randn(8, 5)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create("ew"),
                 compute_gramian="param", retain_graph=True)
    sum(losses.values()).backward()  # still there
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create("ew"),
                 compute_gramian="param")
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        sum(losses.values()).backward()


@pytest.mark.filterwarnings("ignore:mtlens. step skipped")
def test_non_finite_gradient_writes_nothing_with_the_objectives_message():
    torch.manual_seed(0)
    net, x = TinyNet(2), torch.randn(8, 5)
    net.zero_grad(set_to_none=True)
    z, losses = net(x)
    # a loss that is finite while its gradient is not: sqrt at 0
    losses["t1"] = (z[:, :1] * 0).abs().sqrt().sum()
    rec = mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create("ew"),
                       compute_gramian="param", nonfinite="skip")
    assert rec.skipped and all(p.grad is None for p in net.parameters())
    z, losses = net(x)
    losses["t1"] = (z[:, :1] * 0).abs().sqrt().sum()
    with pytest.raises(NonFiniteError, match="non-finite gradient in the backward of 'ew'"):
        mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create("ew"),
                     compute_gramian="param")
    assert all(p.grad is None for p in net.parameters())


def test_loss_level_gramian_with_maps_computed_from_one_another_is_the_true_jacobians():
    # features=[z1, z2] with z2 = f(z1): ∂L/∂z1 already holds the path through z2, so pushing both saliencies
    # through the encoder counted that path twice (the Gramian was wrong before, by 19 % on this net)
    torch.manual_seed(0)
    l1, l2 = torch.nn.Linear(5, 6), torch.nn.Linear(6, 6)
    heads = torch.nn.ModuleList([torch.nn.Linear(12, 1) for _ in range(2)])
    shared = list(l1.parameters()) + list(l2.parameters())
    x = torch.randn(8, 5)

    def fwd():
        z1 = torch.tanh(l1(x))
        z2 = torch.tanh(l2(z1))
        return [z1, z2], {f"t{i}": h(torch.cat([z1, z2], 1)).pow(2).mean() for i, h in enumerate(heads)}

    _, losses = fwd()
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, shared, retain_graph=True)])
                     for L in losses.values()]).double()
    for p in [*shared, *heads.parameters()]:
        p.grad = None
    zs, losses = fwd()
    ref = [g.clone() for g in torch.autograd.grad(sum(losses.values()), [*shared, *heads.parameters()])]
    zs, losses = fwd()
    rec = mtl_backward(losses, features=zs, shared_params=shared, method=create("ew"), compute_gramian="param")
    torch.testing.assert_close(rec.gramian, J @ J.T)
    for p, r in zip([*shared, *heads.parameters()], ref):
        torch.testing.assert_close(p.grad, r)
