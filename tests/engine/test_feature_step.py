"""The lean feature-level step (engine/feature_step.py) is the general path's step, bit for bit.

The general path is reached with ``features=[z]`` (one shared map given as a sequence: the same numbers,
through compute_task_gradients → decide → check_decision → apply_decision → step_record)."""

import pytest
import torch
from _nets import TinyNet

import mtlens.engine.backward as backward
from mtlens.engine import mtl_backward
from mtlens.engine.protocols import GramianWeighting
from mtlens.errors import ConfigurationError, NonFiniteError
from mtlens.methods import create

# every default-decide Gramian weighting kind: stateless, stateful (pcgrad, gradvac: RNG / EMA state),
# own head rule (ntkmtl, pivrg), closed form at T = 2 (mgda)
METHODS = ["mgda", "upgrad", "aligned_mtl", "imtl_g", "cagrad", "dualproj", "ntkmtl", "pivrg", "pcgrad", "gradvac"]


def _pair(T, offsets=None):
    torch.manual_seed(0)
    a, b = TinyNet(T, offsets=offsets), TinyNet(T, offsets=offsets)
    b.load_state_dict(a.state_dict())
    return a, b


def _lean_only(monkeypatch):
    """Fail if the general path runs (it starts with compute_task_gradients)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the general path ran")
    monkeypatch.setattr(backward, "compute_task_gradients", refuse)


def _assert_same_record(ra, rb):
    assert ra.task_names == rb.task_names and ra.level == rb.level == "feature"
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
def test_lean_feature_step_equals_the_general_path(name, T, monkeypatch):
    net_a, net_b = _pair(T, offsets=[0.1 * (t + 1) for t in range(T)])
    m_a, m_b = create(name), create(name)
    m_b.load_state_dict(m_a.state_dict())  # the same RNG state (pcgrad)
    assert type(m_a).decide is GramianWeighting.decide
    for step in range(3):
        x = torch.randn(4, 5)
        if step != 2:  # step 2 accumulates into the existing .grad (no zero_grad): both paths add
            net_a.zero_grad()
            net_b.zero_grad()
        z, losses = net_b(x)
        rec_b = mtl_backward(losses, features=[z], shared_params=net_b.enc.parameters(), method=m_b, level="feature")
        z, losses = net_a(x)
        with monkeypatch.context() as mp:
            _lean_only(mp)
            rec_a = mtl_backward(losses if step else list(losses.values()), task_names=None if step else list(losses),
                                 features=z, shared_params=net_a.enc.parameters(), method=m_a, level="feature")
        for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
            assert pa.grad is not None and torch.equal(pa.grad, pb.grad), (name, step, n)
            assert pa.grad.data_ptr() != pb.grad.data_ptr()
        _assert_same_record(rec_a, rec_b)
        sa, sb = m_a.state_dict(), m_b.state_dict()
        assert list(sa) == list(sb)
        torch.testing.assert_close(dict(sa), dict(sb), rtol=0, atol=0, equal_nan=True)


def test_lean_feature_step_routes_only_the_common_case(monkeypatch):
    net = TinyNet(3)
    x = torch.randn(4, 5)
    calls = []
    real = backward.feature_step
    monkeypatch.setattr(backward, "feature_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("mgda"), level="feature")
    assert calls == [1]
    general = [
        {"losses": lambda ls: torch.stack(list(ls.values())), "kw": {}},  # a stacked vector: its own branch logic
        {"losses": None, "kw": {"regularizers": [create("rep_mtl")]}},
        {"losses": None, "kw": {"loss_transform": "log"}},
        {"losses": None, "kw": {"distributed": False, "retain_graph": True, "level": "param"}},
    ]
    for case in general:
        z, losses = net(x)
        given = case["losses"](losses) if case["losses"] else losses
        kw = {"level": "feature", **case["kw"]}
        mtl_backward(given, features=z, shared_params=net.enc.parameters(), method=create("mgda"), **kw)
    assert calls == [1]


def _sqrt_head_net():
    """Task t1's loss is sqrt(mean((0·h(z))²)) = 0, finite, with a NaN saliency (∞·0)."""
    net = TinyNet(3)

    def fwd(x):
        z, losses = net(x)
        losses["t1"] = torch.sqrt((net.heads[1](z) * 0).pow(2).mean())
        return z, losses

    return net, fwd


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_lean_feature_step_fails_as_the_general_path(policy, monkeypatch):
    """Non-finite loss, non-finite saliency: the same message, policy, record; nothing written."""
    x = torch.randn(4, 5)
    net = TinyNet(3)
    msgs = []
    for lean in (True, False):
        z, losses = net(x)
        bad = {**losses, "t2": losses["t2"] * float("inf")}
        f = z if lean else [z]
        with monkeypatch.context() as mp:
            if lean:
                _lean_only(mp)
            if policy == "raise":
                with pytest.raises(NonFiniteError) as e:
                    mtl_backward(bad, features=f, shared_params=net.enc.parameters(), method=create("mgda"),
                                 level="feature")
                msgs.append(str(e.value))
            else:
                with pytest.warns(RuntimeWarning, match="step skipped") as rec_w:
                    rec = mtl_backward(bad, features=f, shared_params=net.enc.parameters(), method=create("mgda"),
                                       level="feature", nonfinite="skip")
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
                                 method=create("mgda"), level="feature")
                msgs.append(str(e.value))
            else:
                with pytest.warns(RuntimeWarning, match="step skipped"):
                    rec = mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(),
                                       method=create("mgda"), level="feature", nonfinite="skip")
                assert rec.skipped and rec.weights is None and rec.gramian is None
                assert rec.saliencies is not None and rec.saliencies.shape == (3, 4, 6)
                msgs.append(rec.reason)
        assert all(p.grad is None for p in net.parameters())
    assert msgs[0] == msgs[1] and "non-finite gradient of task(s) ['t1'] at level 'feature'" in msgs[0]


class _Broken(GramianWeighting):
    name = "broken_gw"
    stateful = True

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.register_buffer("calls", torch.zeros(()))

    def weights(self, gramian, losses):
        self.calls += 1  # state changed by the step: must be restored when it fails
        if self.mode == "raise":
            raise ValueError("singular")
        if self.mode == "nan":
            return torch.full((gramian.shape[0],), float("nan"), dtype=torch.float64)
        if self.mode == "short":
            return torch.ones(gramian.shape[0] - 1, dtype=torch.float64)
        return torch.ones(gramian.shape[0], dtype=torch.float32) / gramian.shape[0]  # float32: converted


@pytest.mark.parametrize("mode", ["raise", "nan", "short", "ok"])
def test_lean_feature_step_checks_the_decision_as_the_general_path(mode, monkeypatch):
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
                                   level="feature")
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


def test_lean_feature_step_refuses_what_the_engine_refuses():
    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ConfigurationError, match="needs shared_params"):
        mtl_backward(losses, features=z, shared_params=[], method=create("mgda"), level="feature")
    with pytest.raises(ConfigurationError, match="detached copy"):
        mtl_backward(losses, features=z.detach(), shared_params=net.enc.parameters(), method=create("mgda"),
                     level="feature")
    with pytest.raises(ConfigurationError, match="does not require grad"):
        mtl_backward({**losses, "t0": losses["t0"].detach()}, features=z, shared_params=net.enc.parameters(),
                     method=create("mgda"), level="feature")
