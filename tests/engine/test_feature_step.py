"""The lean feature- and parameter-level steps (engine/feature_step.py, engine/param_step.py) are the general
path's steps, bit for bit.

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


def _assert_same_record(ra, rb, level="feature"):
    assert ra.task_names == rb.task_names and ra.level == rb.level == level
    for key in ("losses", "objective_losses", "weights", "head_weights", "gramian", "saliencies"):
        va, vb = getattr(ra, key), getattr(rb, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            assert va.dtype == vb.dtype and va.shape == vb.shape and not va.requires_grad, key
            assert torch.equal(va, vb), key
    assert ra.method_values == rb.method_values and ra.regularizer_values == rb.regularizer_values == {}
    assert ra.skipped == rb.skipped and ra.reason == rb.reason


@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.filterwarnings("ignore:mtlens. 'pivrg'")
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("T", [2, 3])
def test_lean_step_equals_the_general_path(level, name, T, monkeypatch):
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
        rec_b = mtl_backward(losses, features=[z], shared_params=net_b.enc.parameters(), method=m_b, level=level)
        z, losses = net_a(x)
        with monkeypatch.context() as mp:
            _lean_only(mp)
            rec_a = mtl_backward(losses if step else list(losses.values()), task_names=None if step else list(losses),
                                 features=z, shared_params=net_a.enc.parameters(), method=m_a, level=level)
        for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
            assert pa.grad is not None and torch.equal(pa.grad, pb.grad), (name, step, n)
            assert pa.grad.data_ptr() != pb.grad.data_ptr()
        _assert_same_record(rec_a, rec_b, level=level)
        sa, sb = m_a.state_dict(), m_b.state_dict()
        assert list(sa) == list(sb)
        torch.testing.assert_close(dict(sa), dict(sb), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("T", [9, 17])  # beyond feature_step.GROUP: S_t written into the block during the heads pass
@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.parametrize("device_like", ["cpu", "other"])
def test_lean_step_writing_the_saliencies_as_it_goes_equals_the_general_path(T, level, device_like, monkeypatch):
    """The saliency block written in groups of GROUP maps (CPU) or one map at a time (``other``: the rule for every
    device but the CPU, forced here), with a task whose loss does not reach Z in the middle of a group: the same
    record, .grad and state as the general path, bit for bit."""
    import mtlens.engine.feature_step as fs

    if device_like == "other":
        monkeypatch.setattr(fs, "GROUP", 1)
    net_a, net_b = _pair(T, offsets=[0.1 * (t + 1) for t in range(T)])
    m_a, m_b = create("upgrad"), create("upgrad")
    x = torch.randn(4, 5)
    outs = []
    for net, lean in ((net_b, False), (net_a, True)):
        z, losses = net(x)
        losses = dict(losses)
        losses["t3"] = net.heads[3].bias.sum() ** 2 + 0.5  # reaches no map: S_3 = 0
        with monkeypatch.context() as mp:
            if lean:
                _lean_only(mp)
            outs.append(mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(),
                                     method=m_a if lean else m_b, level=level))
    rec_b, rec_a = outs
    _assert_same_record(rec_a, rec_b, level=level)
    assert rec_a.saliencies[3].abs().sum() == 0 and rec_a.saliencies[4].abs().sum() > 0
    for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        assert (pa.grad is None) == (pb.grad is None), n
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), n


# per level: the lean step's name in engine/backward.py, a method it takes, a Jacobian aggregator (never lean) and
# calls that need the general path (each must not reach the lean step)
ROUTES = {
    "feature": ("feature_step", "mgda", "graddrop", [
        {"losses": lambda ls: torch.stack(list(ls.values())) * 2.0, "kw": {}},  # a loss vector without a split
        {"losses": None, "kw": {"regularizers": [create("rep_mtl")]}},
        {"losses": None, "kw": {"loss_transform": "log"}},
        {"losses": None, "kw": {"distributed": False, "retain_graph": True, "level": "param"}},
    ]),
    "param": ("param_step", "upgrad", "excess_mtl", [
        {"losses": lambda ls: torch.stack(list(ls.values())) * 2.0, "kw": {}},
        {"losses": None, "kw": {"jacobian": "batched"}},
        {"losses": None, "kw": {"loss_transform": "log"}},
        {"losses": None, "kw": {"compute_gramian": "param"}},
        {"losses": None, "kw": {"regularizers": [create("rep_mtl")]}},
        {"losses": None, "kw": {"features": None}},
        {"losses": None, "kw": {"level": "feature"}},
    ]),
}


@pytest.mark.filterwarnings("ignore:mtlens. the task losses were passed as one tensor")
@pytest.mark.parametrize("level", ["feature", "param"])
def test_lean_step_routes_only_the_common_case(level, monkeypatch):
    step, method, aggregator, general = ROUTES[level]
    net = TinyNet(3)
    x = torch.randn(4, 5)
    calls = []
    real = getattr(backward, step)

    def spy(*a, **k):  # counts the steps the lean path gave (None: it declined, the general path ran)
        out = real(*a, **k)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(backward, step, spy)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create(method), level=level)
    assert calls == [1]
    for case in general:
        z, losses = net(x)
        given = case["losses"](losses) if case["losses"] else losses
        kw = {"level": level, "features": z, **case["kw"]}
        mtl_backward(given, shared_params=net.enc.parameters(), method=create(method), **kw)
    assert calls == [1]
    z, losses = net(x)  # a Jacobian aggregator is not a Gramian weighting
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create(aggregator), level=level)
    assert calls == [1]


def _sqrt_head_net():
    """Task t1's loss is sqrt(mean((0·h(z))²)) = 0, finite, with a NaN saliency (∞·0)."""
    net = TinyNet(3)

    def fwd(x):
        z, losses = net(x)
        losses["t1"] = torch.sqrt((net.heads[1](z) * 0).pow(2).mean())
        return z, losses

    return net, fwd


@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_lean_step_fails_as_the_general_path(level, policy, monkeypatch):
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
                                 level=level)
                msgs.append(str(e.value))
            else:
                with pytest.warns(RuntimeWarning, match="step skipped") as rec_w:
                    rec = mtl_backward(bad, features=f, shared_params=net.enc.parameters(), method=create("mgda"),
                                       level=level, nonfinite="skip")
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
                                 method=create("mgda"), level=level)
                msgs.append(str(e.value))
            else:
                with pytest.warns(RuntimeWarning, match="step skipped"):
                    rec = mtl_backward(losses, features=z if lean else [z], shared_params=net.enc.parameters(),
                                       method=create("mgda"), level=level, nonfinite="skip")
                assert rec.skipped and rec.weights is None and rec.gramian is None
                assert rec.saliencies is not None and rec.saliencies.shape == (3, 4, 6)
                msgs.append(rec.reason)
        assert all(p.grad is None for p in net.parameters())
    assert msgs[0] == msgs[1] and f"non-finite gradient of task(s) ['t1'] at level '{level}'" in msgs[0]


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


@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.parametrize("mode", ["raise", "nan", "short", "ok"])
def test_lean_step_checks_the_decision_as_the_general_path(level, mode, monkeypatch):
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
                                   level=level)
                out.append((rec, float(m.calls)))
            except NonFiniteError as e:
                out.append((str(e), float(m.calls)))
                assert all(p.grad is None for p in net.parameters())
    (a, ca), (b, cb) = out
    assert ca == cb == (1.0 if mode == "ok" else 0.0)  # committed only when the whole step succeeded
    if mode == "ok":
        _assert_same_record(a, b, level=level)
        assert a.weights.dtype == torch.float64
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
    else:
        assert a == b and ("failed on this step's numbers" in a or "returned weights" in a)


@pytest.mark.parametrize("level", ["feature", "param"])
def test_lean_step_refuses_what_the_engine_refuses(level):
    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ConfigurationError, match="needs shared_params"):
        mtl_backward(losses, features=z, shared_params=[], method=create("mgda"), level=level)
    with pytest.raises(ConfigurationError, match="detached copy"):
        mtl_backward(losses, features=z.detach(), shared_params=net.enc.parameters(), method=create("mgda"),
                     level=level)
    with pytest.raises(ConfigurationError, match="does not require grad"):
        mtl_backward({**losses, "t0": losses["t0"].detach()}, features=z, shared_params=net.enc.parameters(),
                     method=create("mgda"), level=level)


def _walk_reference(loss_list, feats, shared, method_params):
    from mtlens.engine.gradients import _find_heads, _node_sets

    heads = _find_heads(loss_list, feats, shared, None, method_params)
    sets = _node_sets(loss_list, feats.maps)
    index = {id(p): i for i, p in enumerate(heads)}
    own = [sorted({index[id(v)] for v in (getattr(n, "variable", None) for n in st) if id(v) in index}) for st in sets]
    return heads, sets, own


def test_walk_heads_is_find_heads_node_sets_and_the_index_in_one_walk():
    from mtlens.engine.gradients import _walk_heads, normalise_features

    torch.manual_seed(0)
    enc = torch.nn.Linear(5, 6)
    shared = list(enc.parameters())
    h = [torch.nn.Linear(6, 1) for _ in range(3)]
    common = torch.nn.Parameter(torch.randn(6))  # a head parameter two tasks share
    temp = torch.nn.Parameter(torch.ones(()))  # a method's own learnable tensor (never a head)
    x = torch.randn(4, 5)
    z = enc(x)
    z2 = torch.tanh(torch.randn(4, 6, requires_grad=True))  # a second map, computed from a leaf of its own
    leaf_map = torch.randn(4, 6, requires_grad=True)  # a map that is a leaf itself
    cases = {
        "disjoint heads": ([(h[t](z) ** 2).mean() for t in range(3)], [z], []),
        "a shared head parameter, a method parameter": (
            [(h[0](z) ** 2).mean() * temp, ((z * common).sum(1) ** 2).mean() + (h[1](z) ** 2).mean(),
             (h[2](z * common) ** 2).mean()], [z], [temp]),
        "two maps": ([(h[0](z) + h[1](z2)).pow(2).mean(), (h[2](z2) ** 2).mean()], [z, z2], []),
        "a leaf map": ([(h[0](leaf_map) ** 2).mean(), (h[1](leaf_map) * h[2](z)).mean()], [leaf_map, z], []),
    }
    for label, (losses, maps, mp) in cases.items():
        feats = normalise_features(maps if len(maps) > 1 else maps[0], [f"t{i}" for i in range(len(losses))])
        heads, sets, own = _walk_heads(losses, feats.maps, shared, mp)
        ref_heads, ref_sets, ref_own = _walk_reference(losses, feats, shared, mp)
        assert [id(p) for p in heads] == [id(p) for p in ref_heads], label
        assert sets == ref_sets and own == ref_own, label
    leak = [(h[0](z) ** 2).mean() + enc.weight.sum()]
    with pytest.raises(ConfigurationError, match="1 shared parameter"):
        _walk_heads(leak, [z], shared, [])


class _AliasNet(torch.nn.Module):
    """Gradients autograd returns as ONE tensor for two parameters (``a + b``), in the encoder and in a head,
    and a head parameter two tasks share."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.randn(5, 6)), torch.nn.Parameter(torch.randn(5, 6))
        self.h = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(3)])
        self.u, self.v = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
        self.common = torch.nn.Parameter(torch.randn(6))

    def forward(self, x):
        z = torch.tanh(x @ (self.a + self.b))
        return z, {"t0": (self.h[0](z * (self.u + self.v)) ** 2).mean(),
                   "t1": (self.h[1](z * self.common) ** 2).mean(),
                   "t2": ((self.h[2](z) + (z * self.common).sum(1, keepdim=True)) ** 2).mean()}


@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.parametrize("shared_head", [False, True])
def test_lean_step_never_writes_one_tensor_into_two_grads(level, shared_head, monkeypatch):
    torch.manual_seed(0)
    net_a, net_b = _AliasNet(), _AliasNet()
    net_b.load_state_dict(net_a.state_dict())
    x = torch.randn(4, 5)
    for net in (net_a, net_b):
        if not shared_head:
            net.common.requires_grad_(False)
    for step in range(2):  # the second step accumulates: a shared .grad would take the other's addition
        z, losses = net_b(x)
        mtl_backward(losses, features=[z], shared_params=[net_b.a, net_b.b], method=create("mgda"), level=level)
        z, losses = net_a(x)
        with monkeypatch.context() as mp:
            _lean_only(mp)
            mtl_backward(losses, features=z, shared_params=[net_a.a, net_a.b], method=create("mgda"), level=level)
        ptrs = [p.grad.data_ptr() for p in net_a.parameters() if p.grad is not None]
        assert len(set(ptrs)) == len(ptrs), step
        one = {n: p.grad.clone() for n, p in net_a.named_parameters() if p.grad is not None}
    for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad) or torch.allclose(pa.grad, pb.grad, rtol=0, atol=0), n
    net_a.zero_grad()
    z, losses = net_a(x)
    mtl_backward(losses, features=z, shared_params=[net_a.a, net_a.b], method=create("mgda"), level=level)
    for n, p in net_a.named_parameters():
        if p.grad is not None:
            assert torch.allclose(one[n], 2 * p.grad, rtol=1e-6, atol=1e-7), n


@pytest.mark.parametrize(("name", "level"), [("ew", None), ("upgrad", "param"), ("mgda", "feature")])
def test_no_step_writes_one_tensor_into_two_grads(name, level):
    """Every path of the engine (the lean loss and feature steps, the general path) accumulates as
    ``.backward()`` does where autograd returns one tensor for two parameters (``a + b``)."""
    torch.manual_seed(0)
    net = _AliasNet()
    x = torch.randn(4, 5)
    z, losses = net(x)
    sum(losses.values()).backward()  # the reference for EW; for the others: distinct memory, doubled by 2 steps
    ref = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    once: dict = {}
    for _ in range(2):
        z, losses = net(x)
        mtl_backward(losses, features=z, shared_params=[net.a, net.b], method=create(name), level=level)
        ptrs = [p.grad.data_ptr() for p in net.parameters()]
        assert len(set(ptrs)) == len(ptrs)
        once = once or {n: p.grad.clone() for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-6, atol=1e-7)
        if name == "ew":
            torch.testing.assert_close(once[n], ref[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("level", ["feature", "param"])
@pytest.mark.parametrize("given_heads", [False, True])
def test_lean_step_with_given_heads_or_a_kept_graph_equals_the_general_path(level, given_heads, monkeypatch):
    net_a, net_b = _pair(3, offsets=[0.1, 0.2, 0.3])
    x = torch.randn(4, 5)
    kw = {"task_params": None} if not given_heads else {}
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
                                   method=create("mgda"), level=level, retain_graph=retain, **kw)
            outs.append(rec)
            if retain:  # the graph is still there: a second backward through it works
                sum(losses.values()).backward()
            else:
                with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                    sum(losses.values()).backward()
        _assert_same_record(*outs, level=level)
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
