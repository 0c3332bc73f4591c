"""``engine._autograd.vjp``: autograd's engine called directly in the plain case, torch.autograd.grad otherwise;
the same gradients bit for bit, the same errors."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mtlens.engine import _autograd
from mtlens.engine._autograd import vjp


def _graph():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(4, 3))
    w2 = torch.nn.Parameter(torch.randn(3))
    unused = torch.nn.Parameter(torch.randn(2))
    x = torch.randn(5, 4)
    z = torch.tanh(x @ w1)
    return w1, w2, unused, z


def _no_public(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.autograd.grad was called: the direct path was expected")

    monkeypatch.setattr(torch.autograd, "grad", refuse)


def test_the_pinned_torch_takes_the_direct_path():
    assert _autograd.FAST


def test_scalar_output_matches_autograd_bitwise(monkeypatch):
    w1, w2, unused, z = _graph()
    L = (z @ w2).pow(2).mean()
    ref = torch.autograd.grad(L, [w1, w2, unused], retain_graph=True, allow_unused=True)
    _no_public(monkeypatch)
    got = vjp(L, [w1, w2, unused], retain_graph=True)
    assert got[2] is None and ref[2] is None
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_vector_output_with_grad_outputs_and_several_outputs(monkeypatch):
    w1, w2, _, z = _graph()
    v = torch.randn_like(z)
    ref = torch.autograd.grad([z, (z @ w2).sum()], [w1, w2], grad_outputs=[v, None], retain_graph=True,
                              allow_unused=True)
    _no_public(monkeypatch)
    got = vjp([z, (z @ w2).sum()], [w1, w2], grad_outputs=[v, None], retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_graph_freed_unless_retained_and_create_graph_keeps_one():
    w1, w2, _, z = _graph()
    L = (z @ w2).sum()
    vjp(L, [w1])
    with pytest.raises(RuntimeError, match="second time|freed"):
        vjp(L, [w1])
    _, w2b, _, zb = _graph()
    (g,) = vjp((zb @ w2b).pow(2).sum(), [w2b], create_graph=True)
    assert g.requires_grad  # differentiable: a second-order term can use it
    (h,) = vjp(g.sum(), [w2b])
    assert h is not None and torch.isfinite(h).all()


def test_public_errors_where_the_call_is_not_the_plain_case():
    w1, w2, _, z = _graph()
    with pytest.raises(RuntimeError, match="implicitly created only for scalar outputs"):
        vjp(z, [w1], retain_graph=True)  # no grad_output for a non-scalar output
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        vjp(z, [w1], grad_outputs=torch.ones(2), retain_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        vjp((z @ w2).sum(), [torch.ones(3)], retain_graph=True)


def test_torch_function_overrides_go_through_autograd_grad():
    w1, w2, _, z = _graph()
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    L = (z @ w2).sum()
    ref = torch.autograd.grad(L, [w1], retain_graph=True)
    with Spy():
        got = vjp(L, [w1], retain_graph=True)
    assert "grad" in seen  # the mode saw torch.autograd.grad: it was not bypassed
    assert torch.equal(got[0], ref[0])


def test_gradient_edge_output_with_its_grad_output(monkeypatch):
    """A stacked loss vector's entry point (a GradientEdge) with a given grad_output takes the direct path and gives
    autograd's gradients; a grad_output of the wrong shape gets autograd's own error."""
    from torch.autograd.graph import get_gradient_edge

    w1, w2, _, z = _graph()
    h = z @ w2
    edge = get_gradient_edge(h)
    v = torch.randn_like(h)
    ref = torch.autograd.grad(edge, [w1, w2], grad_outputs=v, retain_graph=True)
    with monkeypatch.context() as m:
        _no_public(m)
        got = vjp(edge, [w1, w2], grad_outputs=v, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        vjp(edge, [w1], grad_outputs=torch.ones(7), retain_graph=True)


@pytest.mark.parametrize("method, level", [("ew", None), ("mgda", "feature"), ("upgrad", "param"),
                                           ("pcgrad", "param"), ("uw", None)])
def test_engine_steps_are_bitwise_the_same_on_the_public_path(monkeypatch, method, level):
    """A whole mtl_backward step with the direct call and with torch.autograd.grad only (FAST off, as on a torch
    without the private function): the same .grad, bit for bit."""
    from mtlens.engine import mtl_backward
    from mtlens.methods import create

    def step():
        torch.manual_seed(1)
        enc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
        x, y = torch.randn(16, 6), torch.randn(3, 16, 1)
        z = enc(x)
        losses = {f"t{t}": torch.nn.functional.mse_loss(h(z), y[t]) for t, h in enumerate(heads)}
        mtl_backward(losses, features=z, shared_params=enc.parameters(), method=create(method, **(
            {"seed": 0} if method == "pcgrad" else {})), level=level)
        return [p.grad.clone() for p in [*enc.parameters(), *heads.parameters()]]

    direct = step()
    monkeypatch.setattr(_autograd, "FAST", False)
    public = step()
    assert len(direct) == len(public) and all(torch.equal(a, b) for a, b in zip(direct, public))
