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


# ---- reviewer's probes: what the rows must not change against the objective's own backward ---------------------
def _both(build, method="ew", **kw):
    """``.grad`` of every parameter after the unmonitored step and after the monitored one (rows), same inputs."""
    out = []
    for cg in (None, "param"):
        params, losses, feats, shared = build()
        for p in params:
            p.grad = None
        torch.manual_seed(1)
        mtl_backward(losses, features=feats, shared_params=shared, method=create(method), compute_gramian=cg, **kw)
        out.append([p.grad for p in params])
    return out


def test_a_shared_parameter_no_loss_reaches_keeps_no_grad():
    # the objective's backward leaves .grad = None on an encoder parameter the forward did not use (an unused
    # layer in the encoder's parameters); the rows held zeros there and wrote them, so that weight decay and
    # momentum then moved a parameter the plain step leaves alone (SGD/Adam skip a None .grad)
    x = torch.randn(8, 5)

    def build():
        torch.manual_seed(0)
        enc, unused = torch.nn.Linear(5, 6), torch.nn.Linear(3, 3)
        heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
        z = torch.tanh(enc(x))
        losses = {f"t{i}": h(z).pow(2).mean() for i, h in enumerate(heads)}
        shared = [*enc.parameters(), *unused.parameters()]
        return [*shared, *heads.parameters()], losses, z, shared

    plain, rows = _both(build)
    assert plain[2] is None and plain[3] is None
    for a, b in zip(rows, plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _SquaredEW(type(create("ew"))):  # a user's EW variant whose objective is not a weighted sum
    name = "squared_ew"

    def combine(self, losses, grad_norms=None):
        return (losses ** 2).sum(), torch.ones_like(losses).detach()


def test_a_subclass_overriding_combine_does_not_inherit_the_weighted_sum_promise():
    # EW declares weighted_sum_objective; a subclass that overrides combine nonlinearly inherited the flag, and the
    # rows wrote Σ_t g_t instead of the gradient of Σ_t L_t² (wrong by up to 60 % on this net)
    assert not objective_is_weighted_sum(_SquaredEW())

    class Declared(_SquaredEW):
        weighted_sum_objective = True  # a subclass may declare it again (here wrongly, which is its promise)

    assert objective_is_weighted_sum(Declared())
    torch.manual_seed(0)
    net, x = TinyNet(3, offsets=[0.5, 1.0, 2.0]), torch.randn(8, 5)
    out = []
    for cg in (None, "param"):
        net.zero_grad(set_to_none=True)
        z, losses = net(x)
        mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=_SquaredEW(),
                     compute_gramian=cg)
        out.append(_grads(net))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_same_map_twice_in_features_is_a_configuration_error():
    # features=[z, z]: each saliency was pushed through the encoder once per copy, so the rows (and the .grad
    # written from them) were twice the objective's gradient on the encoder
    from mtlens.errors import ConfigurationError

    torch.manual_seed(0)
    net, x = TinyNet(2), torch.randn(8, 5)
    for kw in ({}, {"compute_gramian": "param"}):
        z, losses = net(x)
        with pytest.raises(ConfigurationError, match="same tensor more than once"):
            mtl_backward(losses, features=[z, z], shared_params=list(net.enc.parameters()), method=create("ew"),
                         **kw)
    z, losses = net(x)
    with pytest.raises(ConfigurationError, match="same tensor more than once"):
        mtl_backward(losses, features=[z, z], shared_params=list(net.enc.parameters()), method=create("mgda"),
                     level="param")


@pytest.mark.parametrize("where", ["encoder", "head"])
def test_sparse_gradients_are_written_as_the_objectives_backward_writes_them(where):
    # nn.Embedding(sparse=True): every step that wrote its gradient broke in _accumulate (a sparse tensor has no
    # data pointer: "Cannot access data pointer of Tensor that doesn't have storage"), the plain EW step too;
    # and the monitored step's rows wrote a dense .grad on a sparse encoder embedding (SparseAdam refuses it)
    idx = torch.tensor([1, 2, 3, 3, 4, 4, 0, 9])
    x = torch.randn(8, 5)

    def build():
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 6, sparse=True)
        if where == "encoder":
            lin = torch.nn.Linear(6, 6)
            heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
            z = torch.tanh(lin(emb(idx)))
            losses = {f"t{i}": h(z).pow(2).mean() for i, h in enumerate(heads)}
            shared = [*emb.parameters(), *lin.parameters()]
            return [*shared, *heads.parameters()], losses, z, shared
        enc, head = torch.nn.Linear(5, 6), torch.nn.Linear(6, 1)
        z = torch.tanh(enc(x))
        losses = {"t0": head(z).pow(2).mean(), "t1": (z * emb(idx)).sum(1).pow(2).mean()}
        return [*enc.parameters(), *emb.parameters(), *head.parameters()], losses, z, list(enc.parameters())

    plain, rows = _both(build)
    for a, b in zip(rows, plain):
        assert a.layout == b.layout
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-5, atol=1e-7)
    for method, level in (("mgda", "feature"), ("mgda", "param")):  # the lean feature step, the general path
        params, losses, z, shared = build()
        mtl_backward(losses, features=z, shared_params=shared, method=create(method), level=level)
        assert all(p.grad is not None for p in params)


def test_multi_input_maps_sliced_from_one_encoder_pass():
    # features={task: Z[idx_t]} (one encoder pass, one slice per task): each task's row freed its map's graph,
    # which the next task's row needed ("Trying to backward through the graph a second time"); the objective's
    # backward runs there. Separate passes per task keep the rows (the shared leaves' nodes are no overlap).
    x = torch.randn(16, 5)

    def build(sliced):
        def b():
            torch.manual_seed(0)
            l1, l2 = torch.nn.Linear(5, 8), torch.nn.Linear(8, 8)
            heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(2)])

            def enc(v):  # residual: a node reached twice inside one map's graph is no overlap either
                a = torch.tanh(l1(v))
                return a + torch.tanh(l2(a))

            z = enc(x) if sliced else None
            za, zb = (z[:8], z[8:]) if sliced else (enc(x[:8]), enc(x[8:]))
            losses = {"a": heads[0](za).pow(2).mean(), "b": heads[1](zb).pow(2).mean()}
            shared = [*l1.parameters(), *l2.parameters()]
            b.calls = []
            l1.weight.register_hook(lambda g: b.calls.append(1))
            return [*shared, *heads.parameters()], losses, {"a": za, "b": zb}, shared
        return b

    for sliced, backwards in ((True, 3), (False, 2)):
        b = build(sliced)
        plain, rows = _both(b)
        assert len(b.calls) == backwards  # monitored: two rows (+ the objective's backward where it must run)
        for u, v in zip(rows, plain):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method,kw", [("ew", {"compute_gramian": "param"}), ("mgda", {"level": "param"}),
                                       ("mgda", {"level": "feature"}), ("upgrad", {"level": "param"})])
def test_a_parameter_listed_twice_in_shared_params_gets_its_gradient_once(method, kw):
    # shared_params=[*enc.parameters(), enc[0].weight] (a sub-module's parameters added to its parent's): the rows
    # wrote its gradient twice (2× the objective's backward); the gradient methods did so at every level (and
    # counted its column twice in the Gramian)
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    out = []
    for dup in (False, True):
        torch.manual_seed(0)
        net = TinyNet(2)
        z, losses = net(x)
        shared = list(net.enc.parameters()) + ([net.enc[0].weight] if dup else [])
        rec = mtl_backward(losses, features=z, shared_params=shared, method=create(method), **kw)
        out.append((_grads(net), rec.gramian))
    (g0, G0), (g1, G1) = out
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    if G0 is not None:
        torch.testing.assert_close(G1, G0)


def _freed(loss, params):
    try:
        torch.autograd.grad(loss, params, allow_unused=True)
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("method,kw", [("ew", {"compute_gramian": "param"}), ("mgda", {"level": "param"}),
                                       ("mgda", {"level": "feature"})])
def test_stacked_losses_free_every_tasks_graph(method, kw):
    # torch.stack(losses): the stack/unbind nodes are in every task's node set, so every head backward but the
    # last kept its graph (retain_graph=True), although each starts below them (at the stack's input t), and the
    # heads' graphs outlived the step; loss.backward() frees them (and so did the monitored step when it ran the
    # objective's backward).
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    out = []
    for stacked in (False, True):
        torch.manual_seed(0)
        net = TinyNet(3, offsets=[0.5, 1.0, 2.0])
        z, losses = net(x)
        arg = torch.stack(list(losses.values())) if stacked else losses
        mtl_backward(arg, features=z, shared_params=list(net.enc.parameters()), method=create(method), **kw)
        assert all(_freed(L, list(h.parameters())) for L, h in zip(losses.values(), net.heads))
        out.append(_grads(net))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("shared_head", [False, True])
def test_a_head_layer_two_tasks_share_leaves_no_graph_behind(stacked, shared_head):
    # a layer between Z and the heads that every task reads: each head backward but the last kept its graph for
    # the next task, so the part only that task uses outlived the step (the objective's backward frees it). The
    # monitored step runs the objective's backward there (T + 1 encoder backwards); separate heads keep the rows.
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    T = 3
    out = []
    for cg in (None, "param"):
        torch.manual_seed(0)
        net = TinyNet(T, offsets=[0.5, 1.0, 2.0])
        common = torch.nn.Linear(6, 6)
        calls = _count_encoder_backwards(net)
        z = net.enc(x)
        c = torch.tanh(common(z)) if shared_head else z
        losses = {f"t{i}": (h(c) ** 2).mean() + net.offsets[i] for i, h in enumerate(net.heads)}
        arg = torch.stack(list(losses.values())) if stacked else losses
        mtl_backward(arg, features=z, shared_params=list(net.enc.parameters()), method=create("ew"), compute_gramian=cg)
        assert all(_freed(L, list(h.parameters())) for L, h in zip(losses.values(), net.heads))
        if cg is not None:
            assert len(calls) == (T + 1 if shared_head else T)
        out.append(_grads(net) + [p.grad.clone() for p in common.parameters()] if shared_head else _grads(net))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
