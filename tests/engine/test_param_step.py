"""The lean parameter-level step (engine/param_step.py): what only it does. Its equality with the general path, bit
for bit, is tested with the lean feature step's, both levels, in test_feature_step.py.

The general path is reached with ``features=[z]`` (one shared map given as a sequence: the same numbers,
through compute_task_gradients → decide → check_decision → apply_decision → step_record)."""

import pytest
import torch
from _nets import TinyNet
from test_feature_step import _assert_same_record, _lean_only, _pair

import mtlens.engine.backward as backward
import mtlens.engine.param_step as param_step_module
from mtlens.engine import mtl_backward
from mtlens.methods import create


def test_lean_param_step_declines_where_the_workspace_does_not_apply(monkeypatch):
    """No (T, P) workspace (not the CPU, encoder parameters in several dtypes or devices): the lean step declines
    before computing anything and the general path gives the step."""
    torch.manual_seed(0)
    net_a, net_b = _pair(3)
    declined = []
    real = param_step_module.param_step

    def spy(*a, **k):
        out = real(*a, **k)
        declined.append(out is None)
        return out

    monkeypatch.setattr(backward, "param_step", spy)
    monkeypatch.setattr(param_step_module, "jacobian_workspace", lambda T, like: None)
    x = torch.randn(4, 5)
    z, losses = net_a(x)
    rec_a = mtl_backward(losses, features=z, shared_params=net_a.enc.parameters(), method=create("upgrad"),
                         level="param")
    z, losses = net_b(x)
    rec_b = mtl_backward(losses, features=[z], shared_params=net_b.enc.parameters(), method=create("upgrad"),
                         level="param")
    assert declined == [True]
    _assert_same_record(rec_a, rec_b, level="param")
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.parametrize("form", ["stack", "stack_reshaped"])
@pytest.mark.parametrize("given_heads", [False, True])
def test_lean_steps_take_a_stacked_loss_vector_as_the_general_path(level, form, given_heads, monkeypatch):
    """``torch.stack(losses)`` (TorchJD's and LibMTL's examples): the lean steps start each task's backward at the
    stack's input t, as the general path does — the same ``.grad``, record and method state, bit for bit. (A
    ``torch.cat`` vector has no such split, engine/stacked.py: the general path prunes its zero gradients.)"""
    T = 4
    net_a, net_b = _pair(T, offsets=[0.1 * (t + 1) for t in range(T)])
    m_a, m_b = create("upgrad"), create("upgrad")
    x = torch.randn(4, 5)

    def vector(losses):
        ls = list(losses.values())
        if form == "stack":
            return torch.stack(ls)
        return torch.stack([L.reshape(1) for L in ls]).reshape(2, 2)

    for step in range(2):
        recs = []
        for lean, net, m in ((True, net_a, m_a), (False, net_b, m_b)):
            z, losses = net(x)
            kw = {"task_params": list(net.heads.parameters())} if given_heads else {}
            with monkeypatch.context() as mp:
                if lean:
                    _lean_only(mp)
                recs.append(mtl_backward(vector(losses), features=z if lean else [z],
                                         shared_params=net.enc.parameters(), method=m, level=level, **kw))
        ra, rb = recs
        assert ra.level == rb.level == level and ra.task_names == rb.task_names == [f"task{t}" for t in range(T)]
        for key in ("losses", "weights", "head_weights", "gramian", "saliencies"):
            assert torch.equal(getattr(ra, key), getattr(rb, key)), key
        for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad), (step, n)


@pytest.mark.parametrize("level", ["feature", "param"])
def test_lean_steps_run_each_head_once_per_task_on_a_stacked_vector(level):
    """Each task's backward starts at the stack's input t: no other task's head node runs, not even on zeros."""
    calls: list[int] = []

    class Count(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, t):
            ctx.t = t
            return z.view_as(z)

        @staticmethod
        def backward(ctx, g):
            calls.append(ctx.t)
            return g, None

    T = 3
    net = TinyNet(T)
    z = net.enc(torch.randn(4, 5))
    losses = torch.stack([(h(Count.apply(z, t)) ** 2).mean() for t, h in enumerate(net.heads)])
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("upgrad"), level=level)
    assert sorted(calls) == list(range(T))
