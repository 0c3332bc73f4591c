"""The engine's cheaper fixed per-step work keeps every guarantee: exact finiteness, transactions, heads."""

import pytest
import torch
from _nets import TinyNet

from mtlens.engine import compute_task_gradients, mtl_backward
from mtlens.engine.gradients import _FUSED_BELOW, all_finite
from mtlens.errors import ConfigurationError, NonFiniteError, ShapeError
from mtlens.methods import create


def test_all_finite_is_exact_for_large_small_and_mixed_tensors():
    big = torch.randn(_FUSED_BELOW + 3)
    small = [torch.randn(7), torch.randn(2, 3), torch.randn(1).half(), torch.randn(5, dtype=torch.float64)]
    assert all_finite([big, None, *small]) and all_finite([]) and all_finite([None])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for k in range(1 + len(small)):
            ts = [big.clone(), *[s.clone() for s in small]]
            ts[k].view(-1)[-1] = bad
            assert not all_finite(ts), (bad, k)
    # finite values whose sum overflows the dtype: the fast sum alarms, the exact check clears them
    huge = torch.full((_FUSED_BELOW,), 3e38)
    assert all_finite([huge]) and all_finite([torch.full((3,), 3e38), torch.full((2,), 3e38)])
    assert all_finite([torch.full((4,), 6e4, dtype=torch.float16)])
    assert not all_finite([huge, torch.tensor([float("nan")])])
    # +inf and -inf in different tensors cancel to NaN in the sum: still caught
    assert not all_finite([torch.tensor([float("inf")]), torch.tensor([-float("inf")])])
    # complex: both parts are read (a real-valued sum used to drop the imaginary part: a NaN there passed)
    for n in (3, _FUSED_BELOW + 1):
        for dt in (torch.complex64, torch.complex128):
            c = torch.randn(n, dtype=dt)
            assert all_finite([c]) and all_finite([c, torch.randn(3)])
            for bad in (complex(1, float("nan")), complex(float("inf"), 0), complex(0, -float("inf"))):
                c2 = c.clone()
                c2[-1] = bad
                assert not all_finite([c2]) and not all_finite([torch.randn(3), c2]), (n, dt, bad)
    assert all_finite([torch.arange(5), torch.randn(3)]) and all_finite([torch.empty(0), torch.tensor(1.0)])


def test_all_finite_common_case_is_exact():
    """One real dtype (the common case: sums in that dtype, one concatenation): every position and kind of
    non-finite value is caught, sums that overflow are cleared exactly, sparse members are judged."""
    for dt in (torch.float32, torch.float64):
        ts = [torch.randn(_FUSED_BELOW + 5, dtype=dt), torch.randn(3, 4, dtype=dt), torch.randn((), dtype=dt)]
        assert all_finite(ts) and all_finite([None, *ts, None]) and all_finite(ts[:1]) and all_finite(ts[1:2])
        for k in range(len(ts)):
            for bad in (float("nan"), float("inf"), -float("inf")):
                t2 = [t.clone() for t in ts]
                t2[k].view(-1)[0] = bad
                assert not all_finite(t2) and not all_finite(t2[k:k + 1]), (dt, k, bad)
        big = torch.full((_FUSED_BELOW,), torch.finfo(dt).max / 2, dtype=dt)
        assert all_finite([big, big.clone()]) and all_finite([big[:5], big[:5].clone()])  # finite sums overflow
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    g = emb.weight.grad.coalesce()
    assert all_finite([torch.randn(3), g]) and all_finite([torch.randn(_FUSED_BELOW), g])
    assert not all_finite([torch.randn(3), torch.sparse_coo_tensor(g.indices(), g.values() * float("nan"), g.shape)])


def test_ew_weights_are_a_fresh_tensor_every_step():
    """EW copies its weights from a kept ones vector: each record gets its own tensor, and changing one
    changes neither the kept vector nor the next step's weights."""
    from mtlens.methods.ew import EW

    ew = EW()
    losses = torch.rand(4, requires_grad=True)
    obj, w1 = ew.combine(losses)
    _, w2 = ew.combine(losses)
    assert w1 is not w2 and w1.data_ptr() != w2.data_ptr() and torch.equal(w1, torch.ones(4, dtype=torch.float64))
    w1.mul_(float("nan"))
    _, w3 = ew.combine(losses)
    assert torch.equal(w3, torch.ones(4, dtype=torch.float64)) and torch.equal(w2, w3)
    assert torch.equal(obj, losses.sum()) and ew.combine(torch.rand(2))[1].shape == (2,)


def test_all_finite_judges_sparse_gradients():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    g = emb.weight.grad.coalesce()
    assert g.is_sparse and all_finite([g]) and all_finite([g, torch.randn(3)])
    nan = torch.sparse_coo_tensor(g.indices(), g.values() * float("nan"), g.shape)
    assert not all_finite([nan, torch.randn(3)]) and not all_finite([nan])
    huge = torch.sparse_coo_tensor(g.indices(), g.values() * 1e38, g.shape)  # finite, its sum overflows
    assert all_finite([huge])


def test_loss_level_walks_the_heads_only_when_asked():
    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    g = compute_task_gradients(losses, level="loss", features=z, shared_params=list(net.enc.parameters()))
    assert g._task_params is None  # not walked yet: one backward of the weighted sum needs no head list
    assert {id(p) for p in g.task_params} == {id(p) for p in net.heads.parameters()}
    # the walk still refuses a shared parameter reaching the losses around the features, when it runs
    leak = {"a": losses["t0"] + net.enc[0].weight.sum()}
    g = compute_task_gradients(leak, level="loss", features=z, shared_params=list(net.enc.parameters()))
    with pytest.raises(ConfigurationError, match="without passing through"):
        _ = g.task_params
    # paths that use the features at loss level validate them eagerly, as before
    with pytest.raises(ConfigurationError, match="without passing through"):
        compute_task_gradients(
            leak, level="loss", features=z, shared_params=list(net.enc.parameters()), keep_saliencies=True
        )


@pytest.mark.parametrize("name", ["ew", "uw"])
def test_loss_level_step_equals_plain_backward_and_fails_cleanly(name):
    net = TinyNet(3, offsets=[0.1, 0.2, 0.3])
    x = torch.randn(4, 5)
    m = create(name, num_tasks=3) if name == "uw" else create(name)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    _, losses = net(x)
    obj, _ = m.combine(torch.stack(list(losses.values())))
    obj.backward()
    for a, p in zip(got, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)
    # a non-finite gradient with finite losses: nothing written, the method's state untouched
    net.zero_grad()
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    z, _ = net(x)
    bad = {"a": torch.sqrt((z * 0).sum()), "b": z.pow(2).mean(), "c": z.abs().mean()}
    with pytest.raises(NonFiniteError):
        mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=m)
    assert all(p.grad is None for p in net.parameters())
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k])
    # accumulation into existing .grad: the finite step adds, a failing one leaves the sum as it was
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m)
    held = [p.grad.clone() for p in net.parameters()]
    z, _ = net(x)
    bad = {"a": torch.sqrt((z * 0).sum()), "b": z.pow(2).mean(), "c": z.abs().mean()}
    with pytest.warns(RuntimeWarning, match="skipped"):
        rec = mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=m, nonfinite="skip")
    assert rec.skipped
    for a, p in zip(held, net.parameters()):
        assert torch.equal(a, p.grad)


def test_snapshot_restores_exactly_what_state_dict_holds():
    m = create("famo", num_tasks=3)  # a buffer and an internal Adam (extra state)
    m.combine(torch.tensor([1.0, 2.0, 3.0], requires_grad=True))
    snap = m.snapshot()
    ref = m.state_dict()
    assert list(snap) == list(ref) and getattr(snap, "_metadata", None) == getattr(ref, "_metadata", None)
    with torch.no_grad():  # a failed step that changed the live tensors in place
        for t in [*m.parameters(), *m.buffers()]:
            t.fill_(7.0)
    m.restore(snap)
    now = m.state_dict()
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, now[k]), k


# ---------------------------------------------------------------------------------------------
# the lean loss-level step (mtl_backward's common loop) against the engine's three steps
# ---------------------------------------------------------------------------------------------
_LOSS_KW = {"uw": {"num_tasks": 3}, "imtl_l": {"num_tasks": 3}, "rlw": {"seed": 0}, "stch": {"warmup_epochs": 0}}


def _three_steps(losses, z, net, m):
    """The documented composition, without the lean path: compute_task_gradients → decide → check → apply."""
    from mtlens.engine.apply import apply_decision, check_decision
    from mtlens.engine.backward import step_record

    grads = compute_task_gradients(losses, level="loss", features=z, shared_params=list(net.enc.parameters()))
    rec = step_record(grads)
    d = m.decide(grads)
    check_decision(d, grads, m.name)
    assert apply_decision(grads, d, name=m.name) == ""
    rec.weights, rec.head_weights = d.weights, d.head_weights
    rec.method_values.update(d.values)
    return rec


@pytest.mark.parametrize("name", ["ew", "gls", "uw", "dwa", "rlw", "imtl_l", "stch", "famo"])
def test_lean_loss_step_equals_the_three_engine_steps(name):
    torch.manual_seed(0)
    net_a = TinyNet(3, offsets=[0.1, 0.2, 0.3])
    net_b = TinyNet(3, offsets=[0.1, 0.2, 0.3])
    net_b.load_state_dict(net_a.state_dict())
    m_a, m_b = create(name, **_LOSS_KW.get(name, {})), create(name, **_LOSS_KW.get(name, {}))
    for step in range(3):
        x = torch.randn(4, 5)
        z, losses = net_a(x)
        rec_a = mtl_backward(losses, features=z, shared_params=net_a.enc.parameters(), method=m_a)
        z, losses = net_b(x)
        rec_b = _three_steps(losses, z, net_b, m_b)
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad), (name, step)
        assert rec_a.task_names == rec_b.task_names and rec_a.level == rec_b.level == "loss"
        assert torch.equal(rec_a.losses, rec_b.losses) and torch.equal(rec_a.objective_losses, rec_b.objective_losses)
        assert rec_a.weights.dtype == torch.float64 and torch.equal(rec_a.weights, rec_b.weights)
        assert rec_a.head_weights is None and rec_b.head_weights is None and rec_a.gramian is None
        assert rec_a.method_values == rec_b.method_values and rec_a.regularizer_values == {} and not rec_a.skipped
        assert not rec_a.losses.requires_grad and not rec_a.weights.requires_grad
        sa, sb = m_a.state_dict(), m_b.state_dict()
        assert list(sa) == list(sb)
        torch.testing.assert_close(dict(sa), dict(sb), rtol=0, atol=0, equal_nan=True)
        for m in (m_a, m_b):
            if name == "famo":
                m.after_step(rec_a.losses * 0.9)


@pytest.mark.parametrize("form", ["stacked", "list"])
def test_lean_loss_step_takes_every_loss_form(form):
    """A stacked loss vector (TorchJD's and LibMTL's examples) or a list, with task_names: the same step."""
    torch.manual_seed(0)
    net_a, net_b = TinyNet(3, offsets=[0.1, 0.2, 0.3]), TinyNet(3, offsets=[0.1, 0.2, 0.3])
    net_b.load_state_dict(net_a.state_dict())
    x = torch.randn(4, 5)
    z, losses = net_a(x)
    vals = list(losses.values())
    given = torch.stack(vals) if form == "stacked" else vals
    rec_a = mtl_backward(given, task_names=list(losses), features=z, method=create("uw", num_tasks=3), level="loss")
    z, losses = net_b(x)
    rec_b = _three_steps(losses, z, net_b, create("uw", num_tasks=3))
    assert rec_a.task_names == rec_b.task_names == ["t0", "t1", "t2"]
    assert torch.equal(rec_a.losses, rec_b.losses) and torch.equal(rec_a.weights, rec_b.weights)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_lean_losses_fast_path_and_its_fallbacks_agree_with_normalise_losses():
    """The one-pass check of the common call returns what normalise_losses returns; every other form (another
    Mapping, non-string keys, 1-element non-scalar losses, task_names) goes through normalise_losses itself."""
    from collections import OrderedDict

    from mtlens.engine.backward import _lean_losses
    from mtlens.engine.gradients import normalise_losses

    a, b = torch.rand((), requires_grad=True), torch.rand((), requires_grad=True)
    forms = [({"x": a * 2, "y": b + 1}, None), (OrderedDict(x=a * 2, y=b + 1), None), ({0: a * 2, 1: b + 1}, None),
             ({"x": (a * 2).reshape(1), "y": b + 1}, None), ({"x": a * 2, "y": b + 1}, ["x", "y"]), ([a, b], None)]
    for losses, names in forms:
        got, want = _lean_losses(losses, names), normalise_losses(losses, names)
        assert got[0] == want[0] and all(type(n) is str for n in got[0])
        assert len(got[1]) == len(want[1]) and all(x.ndim == 0 and torch.equal(x, y) for x, y in zip(got[1], want[1]))
    with pytest.raises(ConfigurationError, match="no losses"):
        _lean_losses({}, None)
    with pytest.raises(ConfigurationError, match="do not match"):
        _lean_losses({"x": a * 2}, ["y"])


@pytest.mark.parametrize("name", ["ew", "uw"])
def test_lean_loss_step_refuses_what_the_engine_refuses(name):
    """Non-finite losses (each task named), a detached feature map, a non-scalar loss, a loss without graph:
    the messages and the policy of the general path; nothing written, the method's state untouched."""
    net = TinyNet(3)
    m = create(name, **_LOSS_KW.get(name, {}))
    x = torch.randn(4, 5)
    z, losses = net(x)
    bad = {**losses, "t1": losses["t1"] * float("nan"), "t2": losses["t2"] + float("inf")}
    with pytest.raises(NonFiniteError, match=r"non-finite task loss: 't1'=nan, 't2'=inf\. Nothing was written"):
        mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=m)
    assert all(p.grad is None for p in net.parameters())
    z, losses = net(x)
    bad = {**losses, "t1": losses["t1"] * float("nan")}
    with pytest.warns(RuntimeWarning, match="step skipped .*non-finite task loss: 't1'=nan"):
        rec = mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=m, nonfinite="skip")
    assert rec.skipped and rec.weights is None and rec.losses.shape == (3,)
    assert all(p.grad is None for p in net.parameters())
    z, losses = net(x)
    with pytest.raises(ConfigurationError, match="detached copy"):
        mtl_backward(losses, features=z.detach(), shared_params=net.enc.parameters(), method=m)
    z, losses = net(x)
    with pytest.raises(ShapeError, match="must be a scalar"):
        mtl_backward({**losses, "t0": torch.stack([losses["t0"]] * 2)}, features=z, method=m)
    with pytest.raises(ConfigurationError, match="does not require grad"):
        mtl_backward({**losses, "t0": losses["t0"].detach()}, features=z, method=m)


def test_constant_weights_that_are_not_finite_are_refused_after_the_fused_check():
    """A method declaring constant_weights has its weights checked with the gradients; non-finite weights raise
    the message of check_decision (not a gradient message), and nothing is written."""
    from mtlens.methods.ew import EW

    class Broken(EW):
        name = "broken_ew"

        def combine(self, losses, grad_norms=None):
            return losses.sum(), torch.full_like(losses.detach(), float("nan"))

    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(NonFiniteError, match=r"method 'broken_ew' returned weights \[nan, nan, nan\] for 3 tasks"):
        mtl_backward(losses, features=z, method=Broken())
    assert all(p.grad is None for p in net.parameters())


def test_ew_step_reads_the_device_once_and_runs_no_isfinite_kernels():
    """The whole non-finite guarantee of an EW step (losses, weights, every gradient) is one fused sum read
    back once: one host synchronisation on a GPU (it was three, and ``torch.isfinite`` is four kernels)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    with Count() as c:
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert c.ops["_local_scalar_dense"] == 1, c.ops
    assert not {"isfinite", "abs", "ne", "eq", "all"} & set(c.ops), c.ops
    assert all(p.grad is not None for p in net.parameters())


def test_a_failing_loss_step_runs_no_accumulation_hook():
    """Nothing written before the verdict: post-accumulate-grad hooks and the AccumulateGrad node hooks
    (where DDP's reducer listens) do not run on a failing step when a post-accumulate-grad hook is set (a passing
    one runs the former after each ``.grad`` is written: tests/engine/test_post_accumulate_hooks.py; the latter
    never; without any post-accumulate-grad hook: the next test). Tensor hooks
    (``p.register_hook``) and ``retain_grad()`` tensors do see the computed gradient, as under
    ``torch.autograd.grad`` (docs/performance.md)."""
    net = TinyNet(3)
    calls = []
    w = net.heads[0].weight
    w.register_post_accumulate_grad_hook(lambda p: calls.append("post_accumulate"))
    acc = w.view_as(w).grad_fn.next_functions[0][0]
    acc.register_hook(lambda gi, go: calls.append("accumulate_node"))
    z, losses = net(torch.randn(4, 5))
    bad = {**losses, "t2": losses["t2"] + torch.sqrt(z.sum() * 0 - 0.0)}  # finite loss, NaN gradient
    with pytest.raises(NonFiniteError, match="non-finite gradient in the backward of 'ew'"):
        mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert calls == [] and all(p.grad is None for p in net.parameters())


def test_find_leaves_is_a_first_reached_depth_first_walk():
    """The iterative walk (leaves recognised by the AccumulateGrad type) against a recursive reference, on
    random graphs with shared subgraphs, leaves that do not require grad and stop points."""
    import random

    from mtlens.engine.graph import find_leaves, objective_leaves

    def reference(roots, stop_at=()):
        stop = {t.grad_fn for t in stop_at if t.grad_fn is not None}
        stop_ids = {id(t) for t in stop_at if t.grad_fn is None}
        seen, out = set(), []

        def visit(node):
            if node is None or node in seen or node in stop:
                return
            seen.add(node)
            var = getattr(node, "variable", None)
            if var is not None:
                if id(var) not in stop_ids and all(v is not var for v in out):
                    out.append(var)
                return
            for nxt, _ in node.next_functions:
                visit(nxt)

        for r in roots:
            visit(r.grad_fn)
        return out

    rng = random.Random(0)
    ops = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: torch.stack([a, b]).sum(0),
           lambda a, b: (a.exp() * b).sin(), lambda a, b: torch.cat([a, b, a])[:3]]
    for _ in range(300):
        nodes = [torch.randn(3, requires_grad=rng.random() < 0.8) for _ in range(6)]
        for _ in range(rng.randint(1, 15)):
            a, b = rng.sample(nodes, 2)
            nodes.append(rng.choice(ops)(a, b))
        roots = [n for n in rng.sample(nodes, 3) if n.requires_grad]
        stops = [n for n in rng.sample(nodes, 2) if n.requires_grad]
        for stop_at in ([], stops):
            assert [id(t) for t in find_leaves(roots, stop_at)] == [id(t) for t in reference(roots, stop_at)]
        for r in roots:  # the loss step's walk: the same leaves, each once, in its own (deterministic) order
            got = [id(t) for t in objective_leaves(r)]
            assert len(got) == len(set(got)) and set(got) == {id(t) for t in reference([r])}
            assert got == [id(t) for t in objective_leaves(r)]
    assert objective_leaves(torch.randn(3, requires_grad=True)) == []  # a leaf root: no backward edges


# ---- the fused finiteness check and the EW step's direct write (docs/performance.md, "EW against a plain loop") ----


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fused_finiteness_check_is_exact_and_leaves_every_bit_and_version(dtype):
    """GradScaler's fused check with an inverse scale of 1 stores each element back unchanged (signed zeros,
    subnormals even under ``torch.set_flush_denormal(True)``, where a multiplication by 1 would flush them), bumps
    no version counter, and catches every kind and position of non-finite value."""
    from mtlens.engine.gradients import _FUSED_CHECK, _fused_finite

    assert _FUSED_CHECK  # this torch has the kernel: otherwise the tests below would test the sums only
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 5000)] + [torch.randn(6, 5, generator=g).to(dtype).t()]
    ts[1][0], ts[1][1] = -0.0, torch.finfo(dtype).tiny / 4  # a subnormal (bfloat16: flushed to 0 by .to, harmless)
    before = [(_bits(t), t._version) for t in ts]
    torch.set_flush_denormal(True)  # where the CPU supports it (x86 with SSE3); the bits are compared either way
    try:
        assert _fused_finite(ts) is True and all_finite(ts)
    finally:
        torch.set_flush_denormal(False)
    for t, (bits, version) in zip(ts, before):
        assert torch.equal(_bits(t), bits) and t._version == version
    for k in range(len(ts)):
        for bad in (float("nan"), float("inf"), -float("inf")):
            t2 = [t.clone() for t in ts]
            t2[k][(-1,) * t2[k].ndim] = bad
            assert _fused_finite(t2) is False and not all_finite(t2), (k, bad)
    # mixed floating dtypes in one call; a tensor requiring grad and a parameter are read as they are
    p = torch.nn.Parameter(torch.randn(3))
    assert _fused_finite([ts[0], torch.randn(4, dtype=torch.float64), p, p * 2]) is True and p._version == 0


def test_fused_finiteness_check_hands_what_it_cannot_read_to_the_sums():
    """Expanded (stride-0), complex, sparse and integer tensors are refused by the kernel: ``None``, and
    ``all_finite`` judges them by the exact sums instead (tested above)."""
    from mtlens.engine.gradients import _fused_finite

    expanded = torch.ones(1).expand(5)
    c = torch.randn(3, dtype=torch.complex64)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for ts in ([torch.randn(3), expanded], [c], [emb.weight.grad], [torch.arange(3)]):
        assert _fused_finite(ts) is None and all_finite(ts)
    nan_expanded = torch.tensor([float("nan")]).expand(4)
    assert not all_finite([torch.randn(3), nan_expanded])


def _ew_step(net, x, **kw):
    z, losses = net(x)
    return mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"), **kw)


def test_ew_step_lets_backward_write_every_grad_when_nothing_can_see_a_refused_write(monkeypatch):
    """Every ``.grad`` ``None``, no post-accumulate-grad hook, no custom ``autograd.Function``, no process group: the
    EW step is ``backward()`` itself, then the check — the same ``.grad`` bit for bit as ``loss.backward()`` (autograd's
    own writes), and no captured gradient (``vjp`` is not called)."""
    import mtlens.engine.backward as B

    def no_vjp(*a, **k):
        raise AssertionError("the EW step captured its gradients instead of letting backward() write them")

    monkeypatch.setattr(B, "vjp", no_vjp)
    torch.manual_seed(0)
    net, twin, x = TinyNet(3), TinyNet(3), torch.randn(4, 5)
    twin.load_state_dict(net.state_dict())
    rec = _ew_step(net, x)
    _, losses = twin(x)
    sum(losses.values()).backward()
    for (n, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad) and p.grad.stride() == q.grad.stride(), n
    assert torch.equal(rec.weights, torch.ones(3, dtype=torch.float64)) and not rec.skipped


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_ew_direct_write_refused_leaves_every_grad_none(policy):
    """A finite loss with a NaN gradient (built-in ops only, so the direct write is taken): the verdict after
    ``backward()`` resets every ``.grad`` it wrote to ``None`` — the state before the step — under both policies,
    and ``Z.retain_grad()`` still sees the computed gradient, as under ``torch.autograd.grad``."""
    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    z.retain_grad()
    bad = {**losses, "t2": losses["t2"] + torch.sqrt(z.sum() * 0 - 0.0)}  # sqrt(0) = 0, its gradient 0·inf = NaN
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="non-finite gradient in the backward of 'ew'"):
            mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    else:
        with pytest.warns(RuntimeWarning, match="step skipped .*nothing was written"):
            rec = mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=create("ew"),
                               nonfinite="skip")
        assert rec.skipped
    assert all(p.grad is None for p in net.parameters())
    assert z.grad is not None and not torch.isfinite(z.grad).all()


def test_ew_step_captures_its_gradients_where_a_write_could_be_seen(monkeypatch):
    """An existing ``.grad`` (accumulation: a refused step must leave it as it was), a custom ``autograd.Function``
    (its backward may call ``backward()`` itself) or a post-accumulate-grad hook: the captured path, with its
    verdict before any write — the sums of an accumulation equal ``backward()``'s."""
    import mtlens.engine.backward as B

    calls = []
    vjp = B.vjp

    def counted(*a, **k):
        calls.append(1)
        return vjp(*a, **k)

    monkeypatch.setattr(B, "vjp", counted)
    torch.manual_seed(0)
    net, twin, x = TinyNet(3), TinyNet(3), torch.randn(4, 5)
    twin.load_state_dict(net.state_dict())
    _ew_step(net, x)
    assert calls == []
    _ew_step(net, x)  # accumulates into the .grad of the first step
    assert calls == [1]
    for _ in range(2):
        _, losses = twin(x)
        sum(losses.values()).backward()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    net.zero_grad(set_to_none=True)
    from _nets import poison_backward

    z, losses = net(x)
    _ = mtl_backward({**losses, "t0": poison_backward(losses["t0"], 1.0)}, features=z, method=create("ew"))
    assert calls == [1, 1]
    net.zero_grad(set_to_none=True)
    net.heads[1].bias.register_post_accumulate_grad_hook(lambda p: None)
    _ew_step(net, x)
    assert calls == [1, 1, 1]


def test_without_a_process_group_a_node_hook_runs_during_the_direct_write_as_under_backward():
    """The documented limit of the direct write (docs/reliability.md §4): a hook on a leaf's ``AccumulateGrad`` node
    cannot be seen from Python, so without a process group (DDP's reducer needs one, and then the step captures its
    gradients) and without a post-accumulate-grad hook it runs during the step's ``backward()``, as under
    ``loss.backward()`` — on a step the verdict refuses too, whose ``.grad`` are then reset to ``None``."""
    net = TinyNet(3)
    calls = []
    w = net.heads[0].weight
    acc = w.view_as(w).grad_fn.next_functions[0][0]
    acc.register_hook(lambda gi, go: calls.append("accumulate_node"))
    z, losses = net(torch.randn(4, 5))
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert calls == ["accumulate_node"]
    net.zero_grad(set_to_none=True)
    z, losses = net(torch.randn(4, 5))
    bad = {**losses, "t2": losses["t2"] + torch.sqrt(z.sum() * 0 - 0.0)}
    with pytest.raises(NonFiniteError):
        mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert calls == ["accumulate_node"] * 2 and all(p.grad is None for p in net.parameters())


def test_fused_finiteness_check_works_under_another_default_dtype():
    """The kernel's flag and inverse scale are float32 CPU tensors whatever the user's default dtype: under
    ``torch.set_default_dtype(torch.float64)`` the fused path still decides (it would otherwise refuse every call and
    leave every step to the slower sums, silently)."""
    from mtlens.engine.gradients import _fused_finite

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert _fused_finite([torch.randn(5), torch.randn(3, dtype=torch.float32)]) is True
        assert _fused_finite([torch.randn(5), torch.tensor([float("inf")])]) is False
    finally:
        torch.set_default_dtype(old)


def test_an_error_inside_the_direct_backward_leaves_every_grad_none():
    """Anomaly mode raising on a NaN in the middle of the backward, or a tensor hook raising: the ``.grad`` that
    ``backward()`` had already written are put back to ``None`` before the error propagates (the captured path
    wrote none), and the method's state is as before."""
    net = TinyNet(3)
    z, losses = net(torch.randn(4, 5))
    bad = {**losses, "t2": losses["t2"] + torch.sqrt(z.sum() * 0 - 0.0)}
    with torch.autograd.set_detect_anomaly(True), pytest.raises(RuntimeError, match="nan"):
        mtl_backward(bad, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert all(p.grad is None for p in net.parameters())

    def boom(g):
        raise ValueError("hook failed")

    net.enc[0].weight.register_hook(boom)  # the encoder's first layer: written last, after every head
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ValueError, match="hook failed"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert all(p.grad is None for p in net.parameters())
