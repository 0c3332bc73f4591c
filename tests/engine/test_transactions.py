"""A step applies completely or changes nothing (method state included); cached decisions; fp16 loop."""

import math

import pytest
import torch
from _nets import TinyNet, poison_backward

from mtlens.engine import DecisionCache, GramianWeighting, mtl_backward
from mtlens.errors import ConfigurationError, MTLensError, NonFiniteError
from mtlens.methods import available, create, defaults


def Net(T=3):
    return TinyNet(T, offsets=[0.1] * T)

def _state(m):
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v.detach().clone())
        elif isinstance(v, dict):
            for k in sorted(v):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)
        else:
            out.append(v)

    walk(m.state_dict())
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


def _nan_grad_losses(net, x):
    """Finite losses whose gradient is NaN (a NaN injected into the backward only)."""
    z, losses = net(x)

    z2 = poison_backward(z, float("nan"))
    losses = {f"t{i}": (h(z2) ** 2).mean() + 0.1 for i, h in enumerate(net.heads)}
    return z2, losses


# ---- regularisers honour nonfinite="skip" -------------------------------------------------------
@pytest.mark.parametrize("method,level", [("ew", None), ("mgda", "param"), ("mgda", "feature")])
def test_regularisers_honour_skip(method, level):
    net = Net()
    z, losses = _nan_grad_losses(net, torch.randn(4, 5))
    with pytest.warns(RuntimeWarning, match="step skipped"):
        rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create(method),
                           level=level, regularizers=[create("rep_mtl")], nonfinite="skip")
    assert rec.skipped and all(p.grad is None for p in net.parameters())
    z, losses = _nan_grad_losses(net, torch.randn(4, 5))
    with pytest.raises(NonFiniteError):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create(method), level=level,
                     regularizers=[create("rep_mtl")])


# ---- skipped steps do not advance any method state ---------------------------------------------
STATEFUL = ["db_mtl", "moco", "excess_mtl", "pcgrad", "rgw", "nash_mtl", "gradvac", "imtl", "rlw", "dwa", "gradnorm",
            "uw", "imtl_l", "famo", "stch"]


@pytest.mark.parametrize("name", STATEFUL)
def test_skipped_step_leaves_the_method_state_untouched(name):
    kw = {"seed": 0} if name in ("pcgrad", "rgw", "gradvac", "rlw") else {}
    m = create(name, **kw)
    net = Net()
    level = "param" if m.family == "gradient" else None
    z, losses = net(torch.randn(4, 5))  # one good step so that every state exists
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level=level)
    before = _state(m)
    z, losses = _nan_grad_losses(net, torch.randn(4, 5))
    with pytest.warns(RuntimeWarning, match="step skipped"):
        rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level=level,
                           nonfinite="skip")
    assert rec.skipped
    _same(before, _state(m))


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_skip_on_the_very_first_step_of_a_lazily_built_method(name):
    m = create(name)  # learnable scalars created on first use
    net = Net()
    z, losses = _nan_grad_losses(net, torch.randn(4, 5))
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, nonfinite="skip").skipped
    z, losses = net(torch.randn(4, 5))
    assert not mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m).skipped


def test_rlw_skipped_step_draws_no_weights():
    a, b = create("rlw", seed=3), create("rlw", seed=3)
    net = Net()
    x = torch.randn(4, 5)
    z, losses = net(x)
    mtl_backward(losses, method=a, shared_params=net.enc.parameters())
    z, losses = _nan_grad_losses(net, x)  # skipped: the loss-level backward is non-finite
    with pytest.warns(RuntimeWarning):
        assert mtl_backward(losses, method=a, shared_params=net.enc.parameters(), nonfinite="skip").skipped
    z, losses = net(x)
    wa = mtl_backward(losses, method=a, shared_params=net.enc.parameters()).weights
    z, losses = net(x)
    mtl_backward(losses, method=b, shared_params=net.enc.parameters())
    z, losses = net(x)
    wb = mtl_backward(losses, method=b, shared_params=net.enc.parameters()).weights
    torch.testing.assert_close(wa, wb)


# ---- a method failing on the step's numbers: mtlens error, state untouched -----------------------
def test_moco_failure_is_an_mtlens_error_and_changes_nothing():
    m = create("moco")  # normalize="loss": the tracked gradients are scaled by the losses
    net = Net().double()
    z, losses = net(torch.randn(4, 5, dtype=torch.float64))
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level="param")
    before = _state(m)
    net.zero_grad(set_to_none=True)
    z, losses = net(torch.randn(4, 5, dtype=torch.float64))
    losses = {k: v + 1e200 for k, v in losses.items()}  # finite losses and gradients; y y^T overflows
    with pytest.raises(MTLensError) as exc:
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level="param")
    assert "moco" in str(exc.value)
    _same(before, _state(m))
    assert all(p.grad is None for p in net.parameters())


def test_excess_mtl_accumulates_in_float64():
    m = create("excess_mtl")
    J = [torch.full((2, 3), 300.0, dtype=torch.float16)]  # 300² = 9e4 > float16 max 65504
    for _ in range(3):
        out, _ = m.aggregate(J, torch.ones(2))
        assert all(bool(torch.isfinite(o).all()) for o in out)
    assert m.state_dict()["_extra_state"]["grad_sq"][0].dtype == torch.float64
    assert bool(torch.isfinite(m.state_dict()["baseline"]).all())


class Big(GramianWeighting):
    name = "_big_test"

    def weights(self, gramian, losses):
        return torch.full((gramian.shape[0],), 1e5, dtype=torch.float64)


def test_float16_weights_beyond_range_give_an_mtlens_error():
    net = Net().half()
    z, losses = net(torch.randn(4, 5).half())
    with pytest.raises(NonFiniteError, match="float16"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=Big(), level="param")
    assert all(p.grad is None for p in net.parameters())


def test_gradnorm_with_log_transform_errors_clearly_and_changes_nothing():
    # GradNorm declares the log transform incompatible (issue 12, item 4): the engine refuses it on
    # the first call, before any state moves, whatever the loss values (log L < 0 for L < 1 would
    # make its objective NaN).
    m = create("gradnorm")
    net = Net()
    for shift in (5.0, 0.0):
        z, losses = net(torch.randn(4, 5))
        losses = {k: v + shift for k, v in losses.items()}
        before = _state(m)
        with pytest.raises(ConfigurationError, match="log"):
            mtl_backward(losses, method=m, shared_params=net.enc.parameters(), loss_transform="log")
        _same(before, _state(m))
        assert all(p.grad is None for p in net.parameters())


# ---- cached decisions (update_every) ------------------------------------------------------------
def test_cached_decision_reuses_the_last_weights_with_one_backward():
    torch.manual_seed(0)
    net = Net()
    cache = DecisionCache(update_every=3)
    m = create("mgda")
    x = torch.randn(4, 5)
    z, losses = net(x)
    first = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, cache=cache)
    for step in range(1, 4):
        net.zero_grad(set_to_none=True)
        x = torch.randn(4, 5)
        z, losses = net(x)
        rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, cache=cache)
        if step < 3:
            assert rec.method_values.get("cached") == 1.0 and rec.gramian is None
            torch.testing.assert_close(rec.weights, first.weights)
            _, ref_losses = net(x)
            w = first.weights.tolist()
            ref = torch.autograd.grad(sum(wi * L for wi, L in zip(w, ref_losses.values())),
                                      list(net.enc.parameters()), retain_graph=True)
            for p, r in zip(net.enc.parameters(), ref):
                torch.testing.assert_close(p.grad, r)
            head_ref = torch.autograd.grad(sum(ref_losses.values()), list(net.heads.parameters()))
            for p, r in zip(net.heads.parameters(), head_ref):  # the head rule still applies
                torch.testing.assert_close(p.grad, r)
        else:
            assert "cached" not in rec.method_values and rec.gramian is not None  # a new decision


def test_jacobian_aggregators_refuse_cached_decisions():
    net = Net()
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ConfigurationError, match="cannot reuse"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("db_mtl"),
                     cache=DecisionCache(2))
    with pytest.raises(ConfigurationError, match="update_every"):
        DecisionCache(0)


# ---- fp16 + GradScaler: the documented loop survives several overflows ---------------------------
@pytest.mark.parametrize("name,level", [("ew", None), ("mgda", "param"), ("upgrad", "feature"), ("db_mtl", "param")])
def test_documented_fp16_loop_continues_after_several_overflows(name, level):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1)
    m = create(name)
    skipped = 0
    for step in range(12):
        x = torch.randn(4, 5)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = net.enc(x)
        z = z.float()
        if step in (0, 1, 5):  # an overflow in the backward (as fp16 gradients overflow)
            z = poison_backward(z, float("inf"))
        losses = {f"t{i}": (h(z) ** 2).mean() + 0.1 for i, h in enumerate(net.heads)}
        before = [p.detach().clone() for p in net.parameters()]
        state = _state(m)
        rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level=level,
                           grad_scaler=scaler)
        scaler.step(opt)  # the documented loop, unchanged on overflow steps
        scaler.update()
        if rec.skipped:
            skipped += 1
            assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
            _same(state, _state(m))
        assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert skipped >= 3
    assert math.isfinite(scaler.get_scale())


class _BadStateful(GramianWeighting):
    name = "_bad_stateful_test"
    stateful = True

    def __init__(self):
        self.calls = 0

    def weights(self, gramian, losses):
        self.calls += 1  # state changed before the method fails
        return torch.ones(gramian.shape[0] + 1, dtype=torch.float64)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_a_bad_decision_is_refused_and_the_state_restored():
    net = Net()
    m = _BadStateful()
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(NonFiniteError, match="_bad_stateful_test"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m)
    assert m.calls == 0 and all(p.grad is None for p in net.parameters())


# ---- a failed FIRST step leaves every method exactly as a fresh one -------------------------------
# What a failed step may leave behind, each for a reason (everything else must be as in a fresh method):
NOT_STATE = {
    # the last call's diagnostics (log_values, solver reports) and a warm start overwritten before any use
    "_log", "_last", "last_weights", "last_orders", "_last_er", "_last_lgrad", "_kept", "_x",
    "_problems",  # Nash-MTL's cache of compiled cvxpy problems, one per task count
    # checks of the user's calls (after_step, meta_step, on_epoch_end, the optimiser's steps): a missed call is
    # the user's, whatever the step's fate, and a warning already given stays given
    "_calls", "_meta_calls", "_watch",
}
# UW's and IMTL-L's learnable scalars created on the first call stay created (the user's optimiser may hold them
# already; they hold their initial values): MethodState.restore's documented exception
CREATED_PARAMETERS = {"uw": "log_vars", "imtl_l": "log_scales"}


def _observable(m):
    """Everything a method object holds that a later step can read: its state_dict, and every plain attribute
    (those its helpers hold too), walked recursively, whether or not ``state_attrs`` names it; a lazily set
    attribute (a task count bound on the first call) that a failed step leaves behind shows up here."""
    out, seen = [], set()
    skip = {"_init_args", "training", "_method", *NOT_STATE}

    def walk(path, v):
        if isinstance(v, torch.Tensor):
            out.append((path, v.detach().clone()))
        elif isinstance(v, torch.Generator):
            out.append((path, v.get_state()))
        elif isinstance(v, torch.optim.Optimizer):
            walk(path + ".opt", v.state_dict())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(f"{path}[{k}]", v[k])
        elif isinstance(v, (list, tuple, set, frozenset)):
            out.append((path + ".len", len(v)))
            for i, u in enumerate(sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v):
                walk(f"{path}[{i}]", u)
        elif callable(v) and not hasattr(v, "__dict__"):
            out.append((path, type(v).__name__))
        elif hasattr(v, "__dict__") and type(v).__module__.startswith("mtlens"):
            if id(v) in seen:
                return
            seen.add(id(v))
            for k in sorted(vars(v)):
                if k not in skip and not (k.startswith("_") and k.endswith("hooks")) and k not in (
                        "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                        "_non_persistent_buffers_set", "_modules"):
                    walk(f"{path}.{k}", vars(v)[k])
        else:
            out.append((path, v))

    walk("state_dict", m.state_dict())
    walk("m", m)
    return out


def _same_observable(a, b, name):
    assert [p for p, _ in a] == [p for p, _ in b], name
    for (path, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y), f"{name}: {path}"
        else:
            assert x == y, f"{name}: {path}: {x!r} after a failed first step, {y!r} fresh"


@pytest.mark.parametrize("name", available())
def test_a_failed_first_step_leaves_the_method_as_a_fresh_one(name, monkeypatch):
    """Every registered method: a first step that fails after the method decided (the engine's transaction:
    ``snapshot`` → decide → failure → ``restore``) leaves it exactly as a fresh instance — its state_dict and
    every attribute set lazily on the first call (DWA's task count, bound on the first weighting)."""
    import mtlens.engine.backward as backward_module

    kw = {"seed": 0} if "seed" in defaults(name) else {}
    if name in CREATED_PARAMETERS:
        kw["num_tasks"] = 3
    m, fresh = create(name, **kw), create(name, **kw)
    expected = _observable(fresh)

    def refuse(decision, grads, method_name):
        raise NonFiniteError(f"injected failure after '{method_name}' decided")

    monkeypatch.setattr(backward_module, "check_decision", refuse)
    net = Net()
    z, losses = net(torch.randn(4, 5))
    if m.family == "regularizer":  # a regulariser: the step with MGDA fails
        call = {"method": create("mgda"), "regularizers": [m], "level": "param", "jacobian": "batched"}
    elif m.family == "loss":  # keep_saliencies: the general path (the lean loss step has no check_decision)
        call = {"method": m, "keep_saliencies": True}
    else:  # jacobian="batched": the general path
        call = {"method": m, "level": m.levels[0], "jacobian": "batched" if m.levels[0] == "param" else "loop"}
    with pytest.raises(MTLensError):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), **call)
    _same_observable(_observable(m), expected, name)


def test_dwa_after_a_skipped_first_step_serves_another_task_count():
    """DWA binds its task count on the first weighting; a first step skipped for a non-finite gradient (the lean
    loss step) must not bind it: a retry with another number of tasks works, as with a fresh DWA."""
    m = create("dwa", steps_per_epoch=10)
    net = Net(3)
    z, losses = _nan_grad_losses(net, torch.randn(4, 5))
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m,
                            nonfinite="skip").skipped
    net2 = Net(2)
    z, losses = net2(torch.randn(4, 5))
    rec = mtl_backward(losses, features=z, shared_params=net2.enc.parameters(), method=m)
    assert not rec.skipped and rec.weights.shape == (2,)
