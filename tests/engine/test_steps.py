"""Each of the engine's three steps alone: compute → decide → apply."""

import torch
from _nets import TinyNet

from mtlens.engine import Decision, GramianWeighting, apply_decision, compute_task_gradients
from mtlens.methods import create


def Net(T=3):
    return TinyNet(T, offsets=[0.1] * T)

def _jacobian(net, x):
    _, losses = net(x)
    shared = list(net.enc.parameters())
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, shared, retain_graph=True)])
                        for L in losses.values()]).double()


def test_step1_alone_writes_nothing_and_holds_the_jacobian():
    net = Net()
    x = torch.randn(4, 5)
    J = _jacobian(net, x)
    for level in ("param", "feature"):
        z, losses = net(x)
        g = compute_task_gradients(losses, level=level, features=z, shared_params=list(net.enc.parameters()))
        assert all(p.grad is None for p in net.parameters())
        assert g.ok and g.task_names == ["t0", "t1", "t2"] and len(g.task_params) == 6
        if level == "param":
            torch.testing.assert_close(g.gramian(), J @ J.T, rtol=1e-5, atol=1e-8)
            assert [tuple(b.shape) for b in g.jacobian_blocks()] == [(3, *p.shape) for p in net.enc.parameters()]
        else:
            S = g.saliencies.reshape(3, -1).double()
            torch.testing.assert_close(g.gramian(), S @ S.T, rtol=1e-5, atol=1e-8)


class OldStyle(GramianWeighting):
    """A method written against the previous API: only weights(G, losses)."""

    name = "_old_style_test"

    def weights(self, gramian, losses):
        d = gramian.diagonal()
        return 1.0 / d.sqrt()


def test_step2_default_decide_is_built_from_weights():
    net = Net()
    z, losses = net(torch.randn(4, 5))
    g = compute_task_gradients(losses, level="param", features=z, shared_params=list(net.enc.parameters()))
    d = OldStyle().decide(g)
    assert isinstance(d, Decision) and d.combined is None and d.objective is None and d.cacheable
    torch.testing.assert_close(d.weights, 1.0 / g.gramian().diagonal().sqrt())
    torch.testing.assert_close(d.head_weights, torch.ones(3, dtype=torch.float64))
    d2 = create("db_mtl").decide(g)  # a Jacobian aggregator: combined blocks, weights to log
    assert d2.combined is not None and d2.weights is not None and not d2.cacheable


def test_step3_applies_a_hand_made_decision():
    net = Net()
    x = torch.randn(4, 5)
    w, h = [0.5, 2.0, 0.0], [1.0, 0.25, 3.0]
    _, losses = net(x)
    shared, heads = list(net.enc.parameters()), list(net.heads.parameters())
    ref_s = torch.autograd.grad(sum(wi * L for wi, L in zip(w, losses.values())), shared, retain_graph=True)
    ref_h = torch.autograd.grad(sum(hi * L for hi, L in zip(h, losses.values())), heads)
    z, losses = net(x)
    g = compute_task_gradients(losses, level="param", features=z, shared_params=shared)
    problem = apply_decision(g, Decision(weights=torch.tensor(w, dtype=torch.float64),
                                         head_weights=torch.tensor(h, dtype=torch.float64)))
    assert problem == ""
    for p, r in zip(shared + heads, list(ref_s) + list(ref_h)):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)


def test_step3_refuses_a_decision_with_neither_weights_nor_combined_blocks():
    """apply_decision is public and used without check_decision (README, gradient accumulation): an
    empty decision is a ConfigurationError naming the method, not a TypeError from inside the engine."""
    import pytest

    from mtlens.errors import ConfigurationError

    net = Net()
    for level in ("param", "feature"):
        z, losses = net(torch.randn(4, 5))
        g = compute_task_gradients(losses, level=level, features=z, shared_params=list(net.enc.parameters()))
        with pytest.raises(ConfigurationError, match="'mine' decided neither weights nor combined blocks"):
            apply_decision(g, Decision(), name="mine")
        assert all(p.grad is None for p in net.parameters())


def test_feature_gramian_of_multi_input_batches_of_different_shapes_is_a_shape_error():
    """Loss level with compute_gramian='feature' and {task: Z_task} of unequal batch sizes: one clear
    ShapeError with the fix (before: an obscure error from stacking None)."""
    import pytest

    from mtlens.errors import ShapeError

    enc, heads = torch.nn.Linear(5, 6), [torch.nn.Linear(6, 1), torch.nn.Linear(6, 1)]
    z = {"a": enc(torch.randn(4, 5)), "b": enc(torch.randn(3, 5))}
    losses = {t: (h(z[t]) ** 2).mean() for t, h in zip(z, heads)}
    with pytest.raises(ShapeError, match="same shape"):
        compute_task_gradients(losses, level="loss", features=z, shared_params=list(enc.parameters()),
                               compute_gramian="feature")
