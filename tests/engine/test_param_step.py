"""The lean parameter-level step (engine/param_step.py) is the general path's step, bit for bit.

The general path is reached with ``features=[z]`` (one shared map given as a sequence: the same numbers,
through compute_task_gradients → decide → check_decision → apply_decision → step_record)."""

import pytest
import torch
from _nets import TinyNet
from test_feature_step import _AliasNet, _Broken, _pair, _sqrt_head_net

import mtlens.engine.backward as backward
import mtlens.engine.param_step as param_step_module
from mtlens.engine import mtl_backward
from mtlens.engine.protocols import GramianWeighting
from mtlens.errors import ConfigurationError, NonFiniteError
from mtlens.methods import create

# every default-decide Gramian weighting with a parameter level: stateless, stateful (pcgrad, gradvac: RNG / EMA
# state), own head rule (ntkmtl, pivrg), closed form at T = 2 (mgda)
METHODS = ["mgda", "upgrad", "aligned_mtl", "imtl_g", "cagrad", "dualproj", "ntkmtl", "pivrg", "pcgrad", "gradvac"]


def _lean_only(monkeypatch):
    """Fail if the general path runs (it starts with compute_task_gradients), or the lean step declines."""
    def refuse(*args, **kwargs):
        raise AssertionError("the general path ran")
    monkeypatch.setattr(backward, "compute_task_gradients", refuse)


def _assert_same_record(ra, rb):
    assert ra.task_names == rb.task_names and ra.level == rb.level == "param"
    for key in ("losses", "objective_losses", "weights", "head_weights", "gramian", "saliencies"):
        va, vb = getattr(ra, key), getattr(rb, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            assert va.dtype == vb.dtype and va.shape == vb.shape and not va.requires_grad, key
            assert torch.equal(va, vb), key
    assert ra.method_values == rb.method_values and ra.regularizer_values == rb.regularizer_values == {}
    assert ra.skipped == rb.skipped and ra.reason == rb.reason


@pytest.mark.filterwarnings("ignore:mtlens. 'pivrg'")
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("T", [2, 3])
def test_lean_param_step_equals_the_general_path(name, T, monkeypatch):
    net_a, net_b = _pair(T, offsets=[0.1 * (t + 1) for t in range(T)])
    m_a, m_b = create(name), create(name)
    m_b.load_state_dict(m_a.state_dict())  # the same RNG state (pcgrad)
    assert type(m_a).decide is GramianWeighting.decide and "param" in m_a.levels
    for step in range(3):
        x = torch.randn(4, 5)
        if step != 2:  # step 2 accumulates into the existing .grad (no zero_grad): both paths add
            net_a.zero_grad()
            net_b.zero_grad()
        z, losses = net_b(x)
        rec_b = mtl_backward(losses, features=[z], shared_params=net_b.enc.parameters(), method=m_b, level="param")
        z, losses = net_a(x)
        with monkeypatch.context() as mp:
            _lean_only(mp)
            rec_a = mtl_backward(losses if step else list(losses.values()), task_names=None if step else list(losses),
                                 features=z, shared_params=net_a.enc.parameters(), method=m_a, level="param")
        for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
            assert pa.grad is not None and torch.equal(pa.grad, pb.grad), (name, step, n)
            assert pa.grad.data_ptr() != pb.grad.data_ptr()
        _assert_same_record(rec_a, rec_b)
        sa, sb = m_a.state_dict(), m_b.state_dict()
        assert list(sa) == list(sb)
        torch.testing.assert_close(dict(sa), dict(sb), rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:mtlens. the task losses were passed as one tensor")
def test_lean_param_step_routes_only_the_common_case(monkeypatch):
    net = TinyNet(3)
    x = torch.randn(4, 5)
    calls = []
    real = backward.param_step

    def spy(*a, **k):  # counts the steps the lean path gave (None: it declined, the general path ran)
        out = real(*a, **k)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(backward, "param_step", spy)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("upgrad"), level="param")
    assert calls == [1]
    general = [
        {"losses": lambda ls: torch.stack(list(ls.values())) * 2.0, "kw": {}},  # a loss vector without a split
        {"losses": None, "kw": {"jacobian": "batched"}},
        {"losses": None, "kw": {"loss_transform": "log"}},
        {"losses": None, "kw": {"compute_gramian": "param"}},
        {"losses": None, "kw": {"regularizers": [create("rep_mtl")]}},
        {"losses": None, "kw": {"features": None}},
        {"losses": None, "kw": {"level": "feature"}},
    ]
    for case in general:
        z, losses = net(x)
        given = case["losses"](losses) if case["losses"] else losses
        kw = {"level": "param", "features": z, **case["kw"]}
        mtl_backward(given, shared_params=net.enc.parameters(), method=create("upgrad"), **kw)
    assert calls == [1]
    z, losses = net(x)  # a Jacobian aggregator is not a Gramian weighting
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("excess_mtl"), level="param")
    assert calls == [1]


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
    _assert_same_record(rec_a, rec_b)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_lean_param_step_fails_as_the_general_path(policy, monkeypatch):
    """Non-finite loss, non-finite per-task gradient: the same message, policy, record; nothing written."""
    x = torch.randn(4, 5)
    net = TinyNet(3)
    msgs = []
    for lean in (True, False):
        z, losses = net(x)
        bad = {**losses, "t2": losses["t2"] * float("inf")}
        with monkeypatch.context() as mp:
            if lean:
                _lean_only(mp)
            if policy == "raise":
                with pytest.raises(NonFiniteError) as e:
                    mtl_backward(bad, features=z if lean else [z], shared_params=net.enc.parameters(),
                                 method=create("upgrad"), level="param")
                msgs.append(str(e.value))
            else:
                with pytest.warns(RuntimeWarning, match="step skipped") as rec_w:
                    rec = mtl_backward(bad, features=z if lean else [z], shared_params=net.enc.parameters(),
                                       method=create("upgrad"), level="param", nonfinite="skip")
                assert rec.skipped and rec.weights is None and rec.gramian is None and rec.saliencies is None
                msgs.append((rec.reason, str(rec_w[0].message).split("so far): ", 1)[1]))
        assert all(p.grad is None for p in net.parameters())
    assert msgs[0] == msgs[1] and "non-finite task loss: 't2'=inf" in str(msgs[0])
    net, fwd = _sqrt_head_net()
    msgs = []
    for lean in (True, False):
        z, losses = fwd(x)
        with monkeypatch.context() as mp:
            if lean:
                _lean_only(mp)
            if policy == "raise":
                with pytest.raises(NonFiniteError) as e:
                    mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(),
                                 method=create("upgrad"), level="param")
                msgs.append(str(e.value))
            else:
                with pytest.warns(RuntimeWarning, match="step skipped"):
                    rec = mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(),
                                       method=create("upgrad"), level="param", nonfinite="skip")
                assert rec.skipped and rec.weights is None and rec.gramian is None
                assert rec.saliencies is not None and rec.saliencies.shape == (3, 4, 6)
                msgs.append(rec.reason)
        assert all(p.grad is None for p in net.parameters())
    assert msgs[0] == msgs[1] and "non-finite gradient of task(s) ['t1'] at level 'param'" in msgs[0]


@pytest.mark.parametrize("mode", ["raise", "nan", "short", "ok"])
def test_lean_param_step_checks_the_decision_as_the_general_path(mode, monkeypatch):
    x = torch.randn(4, 5)
    net_a, net_b = _pair(3)
    out = []
    for lean, net in ((True, net_a), (False, net_b)):
        m = _Broken(mode)
        z, losses = net(x)
        with monkeypatch.context() as mp:
            if lean:
                _lean_only(mp)
            try:
                rec = mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(), method=m,
                                   level="param")
                out.append((rec, float(m.calls)))
            except NonFiniteError as e:
                out.append((str(e), float(m.calls)))
                assert all(p.grad is None for p in net.parameters())
    (a, ca), (b, cb) = out
    assert ca == cb == (1.0 if mode == "ok" else 0.0)  # committed only when the whole step succeeded
    if mode == "ok":
        _assert_same_record(a, b)
        assert a.weights.dtype == torch.float64
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
    else:
        assert a == b and ("failed on this step's numbers" in a or "returned weights" in a)


def test_lean_param_step_refuses_what_the_engine_refuses():
    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ConfigurationError, match="needs shared_params"):
        mtl_backward(losses, features=z, shared_params=[], method=create("upgrad"), level="param")
    with pytest.raises(ConfigurationError, match="detached copy"):
        mtl_backward(losses, features=z.detach(), shared_params=net.enc.parameters(), method=create("upgrad"),
                     level="param")
    with pytest.raises(ConfigurationError, match="does not require grad"):
        mtl_backward({**losses, "t0": losses["t0"].detach()}, features=z, shared_params=net.enc.parameters(),
                     method=create("upgrad"), level="param")


@pytest.mark.parametrize("shared_head", [False, True])
def test_lean_param_step_never_writes_one_tensor_into_two_grads(shared_head, monkeypatch):
    torch.manual_seed(0)
    net_a, net_b = _AliasNet(), _AliasNet()
    net_b.load_state_dict(net_a.state_dict())
    x = torch.randn(4, 5)
    for net in (net_a, net_b):
        if not shared_head:
            net.common.requires_grad_(False)
    for step in range(2):  # the second step accumulates: a shared .grad would take the other's addition
        z, losses = net_b(x)
        mtl_backward(losses, features=[z], shared_params=[net_b.a, net_b.b], method=create("upgrad"), level="param")
        z, losses = net_a(x)
        with monkeypatch.context() as mp:
            _lean_only(mp)
            mtl_backward(losses, features=z, shared_params=[net_a.a, net_a.b], method=create("upgrad"), level="param")
        ptrs = [p.grad.data_ptr() for p in net_a.parameters() if p.grad is not None]
        assert len(set(ptrs)) == len(ptrs), step
    for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), n


@pytest.mark.parametrize("given_heads", [False, True])
def test_lean_param_step_with_given_heads_or_a_kept_graph_equals_the_general_path(given_heads, monkeypatch):
    net_a, net_b = _pair(3, offsets=[0.1, 0.2, 0.3])
    x = torch.randn(4, 5)
    kw: dict = {}
    for retain in (True, False):
        outs = []
        for lean, net in ((True, net_a), (False, net_b)):
            net.zero_grad()
            z, losses = net(x)
            if given_heads:
                kw = {"task_params": list(net.heads.parameters())}
            with monkeypatch.context() as mp:
                if lean:
                    _lean_only(mp)
                rec = mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(),
                                   method=create("upgrad"), level="param", retain_graph=retain, **kw)
            outs.append(rec)
            if retain:  # the graph is still there: a second backward through it works
                sum(losses.values()).backward()
            else:
                with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                    sum(losses.values()).backward()
        _assert_same_record(*outs)
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
