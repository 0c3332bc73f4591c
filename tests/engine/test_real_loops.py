"""Training loops as users write them, ``mtl_backward`` against ``sum(losses).backward()``, parameters bit for bit.

Where ``tests/engine/test_grad_parity.py`` compares the ``.grad`` of two accumulated micro-batches, these tests run a
few optimiser steps of a whole loop — optimiser parameter groups, layers frozen and unfrozen between steps, an EMA
copy, gradient clipping by value, ``zero_grad(set_to_none=False)``, a closure optimiser (LBFGS), tasks missing from
some batches, a compiled encoder — once with ``loss.backward()`` and once with ``mtl_backward``, and compare every
parameter, buffer, optimiser state and ``.grad`` bit for bit (``torch.equal``). Routes: EW at loss level (its
gradient IS the plain one, module docstring of test_grad_parity) with any number of tasks, and with one task MGDA at
feature level and UPGrad at parameter level (``jacobian="loop"``), whose update is then the task's gradient exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mtlens.engine import mtl_backward
from mtlens.errors import ConfigurationError
from mtlens.methods import create

STEPS = 6

# (method, level, number of tasks): EW with three tasks; the Gramian routes with one (their update is then g)
ROUTES = [("ew", None, 3), ("mgda", "feature", 1), ("upgrad", "param", 1)]
IDS = [f"{m}-{lv or 'loss'}-T{t}" for m, lv, t in ROUTES]


class Net(nn.Module):
    """Encoder 5 → 8 (BatchNorm, ReLU, dropout) → 6 (Tanh); ``T`` heads 6 → 1."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 6),
                                 nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))


def _batch(k: int, T: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(8, 5, generator=g), torch.randn(8, T, generator=g)


def _forward(net: Net, k: int, encoder: Callable[[Tensor], Tensor] | None = None,
             tasks: list[int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    T = len(net.heads)
    x, y = _batch(k, T)
    torch.manual_seed(5000 + k)  # the dropout masks
    z = (encoder or net.enc)(x)
    tasks = list(range(T)) if tasks is None else tasks
    return z, {f"t{t}": ((net.heads[t](z).squeeze(-1) - y[:, t]) ** 2).mean() for t in tasks}


def _backward(net: Net, z: Tensor, losses: dict[str, Tensor], route: tuple[str, str | None, int] | None) -> None:
    """``route is None``: the plain loop's ``sum(losses).backward()``; else ``mtl_backward`` with it."""
    if route is None:
        sum(losses.values()).backward()  # type: ignore[union-attr]
        return
    method, level, _ = route
    mtl_backward(losses, method=create(method), level=level, features=z, shared_params=net.enc.parameters())


def _net(T: int) -> Net:
    torch.manual_seed(0)
    return Net(T)


def _assert_same(a: nn.Module, b: nn.Module, overflow: bool = False) -> None:
    """Parameters, ``.grad`` and buffers bit for bit. ``overflow``: where some ``.grad`` of ``a`` is not finite (a
    GradScaler's overflow step, which both loops skip), ``b`` has a ``.grad`` that is not finite too, and the
    ``.grad`` values are not compared (the engine signals the overflow with ``inf`` in every ``.grad`` it would have
    written; ``backward()`` leaves the finite ones finite)."""
    skipped = overflow and not all(torch.isfinite(p.grad).all() for p in a.parameters() if p.grad is not None)
    if skipped:
        assert not all(torch.isfinite(q.grad).all() for q in b.parameters() if q.grad is not None)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), (name, (p - q).abs().max())
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and not skipped:
            assert torch.equal(p.grad, q.grad), name
    for (name, s), t in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(s, t), name


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            assert torch.equal(v, w) if isinstance(v, Tensor) else v == w, (k, key)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_param_groups_and_layers_frozen_mid_training(route):
    """AdamW with two parameter groups (encoder: lr 1e-3, weight decay; heads: lr 1e-2), the first encoder layer and
    head 0 frozen (``requires_grad_(False)``) at step 2 and unfrozen at step 4; ``zero_grad()`` (set to None) each
    step, so a frozen parameter keeps no ``.grad`` and AdamW skips it, exactly as in the plain loop."""
    T = route[2]
    nets = [_net(T), _net(T)]
    opts = [torch.optim.AdamW([{"params": n.enc.parameters(), "lr": 1e-3, "weight_decay": 0.05},
                               {"params": n.heads.parameters(), "lr": 1e-2, "weight_decay": 0.0}]) for n in nets]
    for k in range(STEPS):
        for net, opt, r in zip(nets, opts, (None, route)):
            if k in (2, 4):
                net.enc[0].requires_grad_(k == 4)
                net.heads[0].requires_grad_(k == 4)
            opt.zero_grad()
            z, losses = _forward(net, k)
            _backward(net, z, losses, r)
            if k in (2, 3):
                assert net.enc[0].weight.grad is None and net.heads[0].weight.grad is None
            opt.step()
        _assert_same(*nets)
        _assert_same_state(*opts)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_an_ema_copy_and_clipping_by_value(route):
    """``clip_grad_value_`` then SGD with momentum and Nesterov, and an EMA of the model
    (``AveragedModel(..., multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)``) updated after each step: the
    model, its EMA (parameters and BatchNorm statistics) and the momentum buffers are the plain loop's."""
    T = route[2]
    nets = [_net(T), _net(T)]
    emas = [AveragedModel(n, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) for n in nets]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True) for n in nets]
    for k in range(STEPS):
        for net, ema, opt, r in zip(nets, emas, opts, (None, route)):
            opt.zero_grad()
            z, losses = _forward(net, k)
            _backward(net, z, losses, r)
            torch.nn.utils.clip_grad_value_(net.parameters(), 0.02)
            opt.step()
            ema.update_parameters(net)
        _assert_same(*nets)
        _assert_same(*emas)
        _assert_same_state(*opts)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_zero_grad_keeping_the_tensors_accumulates_into_them(route):
    """``zero_grad(set_to_none=False)`` and two accumulated micro-batches per step: each ``.grad`` stays the SAME
    tensor object through the whole run (the engine adds into it in place, as ``AccumulateGrad`` does; an optimiser
    or the user may hold it), with the plain loop's values."""
    T = route[2]
    nets = [_net(T), _net(T)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.5) for n in nets]
    held: list[dict[str, Tensor]] = [{}, {}]
    for k in range(STEPS):
        for j, (net, opt, r) in enumerate(zip(nets, opts, (None, route))):
            opt.zero_grad(set_to_none=False)
            for micro in range(2):
                z, losses = _forward(net, 2 * k + micro)
                _backward(net, z, losses, r)
            opt.step()
            for name, p in net.named_parameters():
                assert p.grad is not None
                assert held[j].setdefault(name, p.grad) is p.grad, f"{name}: a new .grad object at step {k}"
        _assert_same(*nets)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_lbfgs_with_a_closure(route):
    """``torch.optim.LBFGS``, whose closure zeroes the gradients, runs the forward and the backward, and returns the
    loss: it re-evaluates several times per step and reads ``.grad`` after each; the same iterates as the plain
    loop's (BatchNorm's statistics move once per evaluation on both)."""
    T = route[2]
    nets = [_net(T), _net(T)]
    for n in nets:
        n.enc[3].p = 0.0  # LBFGS's line search needs a deterministic objective: no dropout
    opts = [torch.optim.LBFGS(n.parameters(), lr=0.5, max_iter=4, history_size=3) for n in nets]
    for k in range(3):
        for net, opt, r in zip(nets, opts, (None, route)):

            def closure(net: Net = net, opt: torch.optim.Optimizer = opt, r=r, k: int = k) -> Tensor:
                opt.zero_grad()
                z, losses = _forward(net, k)
                _backward(net, z, losses, r)
                return sum(losses.values()).detach()  # type: ignore[return-value]

            opt.step(closure)
        _assert_same(*nets)


def test_a_task_missing_from_some_batches():
    """Multi-task data where some batches lack a task's labels: the loss dict holds only the tasks present, so the
    absent task's head gets no gradient (``.grad`` None after ``zero_grad()``, Adam skips it) — as in the plain
    loop."""
    nets = [_net(3), _net(3)]
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in nets]
    present = [[0, 1, 2], [0, 2], [1], [0, 1, 2], [2, 0]]
    for k, tasks in enumerate(present):
        for net, opt, r in zip(nets, opts, (None, ("ew", None, 3))):
            opt.zero_grad()
            z, losses = _forward(net, k, tasks=tasks)
            _backward(net, z, losses, r)
            for t in range(3):
                assert (net.heads[t].weight.grad is None) == (t not in tasks)
            opt.step()
        _assert_same(*nets)
        _assert_same_state(*opts)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_a_compiled_encoder_trains_as_the_compiled_plain_loop(route):
    """``torch.compile(net.enc, backend="aot_eager")`` (BatchNorm and dropout inside) in both loops, AdamW: the same
    parameters, statistics and optimiser state after each step. Dynamo is reset first (its 8-entry cache, once full,
    runs later compiles eagerly), donated buffers are off (the per-task Jacobian differentiates the encoder once per
    task; tests/engine/test_compile.py), and ``Z`` is asserted to be the compiled graph's output."""
    T = route[2]
    torch._dynamo.reset()
    try:
        nets = [_net(T), _net(T)]
        fast = [torch.compile(n.enc, backend="aot_eager") for n in nets]
        opts = [torch.optim.AdamW(n.parameters(), lr=1e-2) for n in nets]
        with torch._functorch.config.patch(donated_buffer=False):
            for k in range(4):
                for net, enc, opt, r in zip(nets, fast, opts, (None, route)):
                    opt.zero_grad()
                    z, losses = _forward(net, k, encoder=enc)
                    assert z.grad_fn is not None and "CompiledFunctionBackward" in z.grad_fn.name(), z.grad_fn
                    _backward(net, z, losses, r)
                    opt.step()
                _assert_same(*nets)
                _assert_same_state(*opts)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("method", ["ew", "uw", "dwa"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
def test_a_frozen_encoder_warm_up_then_unfrozen(method, scaled):
    """A warm-up phase that trains the heads on a frozen encoder (``net.enc.requires_grad_(False)``, a linear probe),
    then unfreezes it — the same loop, ``features=z`` and ``shared_params`` passed every step. While the encoder is
    frozen ``Z`` does not require grad; a loss weighting does not read the features, so the step writes the heads'
    gradients as ``loss.backward()`` does (the engine refused it as "a detached copy"). EW bit for bit; UW and DWA
    train through the same phases (their weights are not the plain sum's)."""
    nets = [_net(3), _net(3)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    m = create(method, num_tasks=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaled else None
    opts[1].add_param_group({"params": list(m.parameters())}) if list(m.parameters()) else None
    for k in range(5):
        frozen = k < 2
        for net, opt, mine in zip(nets, opts, (False, True)):
            net.enc.requires_grad_(not frozen)
            opt.zero_grad()
            z, losses = _forward(net, k)
            assert z.requires_grad is not frozen
            if not mine:
                sum(losses.values()).backward()  # type: ignore[union-attr]
                opt.step()
                continue
            mtl_backward(losses, method=m, features=z, shared_params=net.enc.parameters(), grad_scaler=scaler)
            assert all((p.grad is None) == frozen for p in net.enc.parameters())
            assert all(p.grad is not None for p in net.heads.parameters())
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        if method == "ew":
            _assert_same(*nets)
        if method == "dwa":
            m.on_epoch_end(torch.stack([v.detach() for v in losses.values()]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("method,level", [("mgda", "feature"), ("upgrad", "param"), ("ew", None)])
def test_a_frozen_encoder_where_the_step_reads_the_features_is_refused_with_the_fix_named(method, level):
    """A gradient method (or saliencies at loss level) on a frozen encoder has nothing to decide on: refused, naming
    the frozen encoder and what to do while it is frozen; nothing written."""
    net = _net(3)
    net.enc.requires_grad_(False)
    z, losses = _forward(net, 0)
    kw = {"keep_saliencies": True} if method == "ew" else {}
    pattern = "saliencies" if method == "ew" else "every parameter in shared_params is frozen"
    with pytest.raises(ConfigurationError, match=pattern) as info:
        mtl_backward(losses, method=create(method), level=level, features=z, shared_params=net.enc.parameters(),
                     **kw)
    assert "frozen" in str(info.value) and "create('ew')" in str(info.value)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
@pytest.mark.parametrize("init_scale", [2.0**8, 2.0**20], ids=["finite", "overflow"])
def test_float16_autocast_with_a_grad_scaler_unscaled_and_clipped(route, init_scale):
    """The mixed-precision loop: ``torch.autocast("cpu", dtype=torch.float16)`` around the forward, a
    ``GradScaler`` (``mtl_backward(..., grad_scaler=scaler)`` against ``scaler.scale(loss).backward()``),
    ``scaler.unscale_(opt)`` then ``clip_grad_norm_``, ``scaler.step``/``update``. An initial scale of 2^20 makes the
    first steps overflow in float16: both loops skip them and back the scale off (the ``.grad`` of a skipped step:
    :func:`_assert_same`'s ``overflow``)."""
    T = route[2]
    nets = [_net(T), _net(T)]
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2) for n in nets]
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2) for _ in nets]
    method, level, _ = route
    for k in range(STEPS):
        for net, opt, scaler, mine in zip(nets, opts, scalers, (False, True)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                z, losses = _forward(net, k)
            if mine:
                mtl_backward(losses, method=create(method), level=level, features=z,
                             shared_params=net.enc.parameters(), grad_scaler=scaler, nonfinite="skip")
            else:
                scaler.scale(sum(losses.values())).backward()  # type: ignore[union-attr]
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        _assert_same(*nets, overflow=True)
        _assert_same_state(*opts)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_foreach_and_fused_optimisers(route, impl):
    """``AdamW(foreach=True)`` and ``AdamW(fused=True)`` (CPU kernels), ``clip_grad_norm_(foreach=True)``: the
    parameter level writes each ``.grad`` as a view of one flat vector, which these multi-tensor kernels take."""
    T = route[2]
    nets = [_net(T), _net(T)]
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2, **{impl: True}) for n in nets]
    for k in range(4):
        for net, opt, r in zip(nets, opts, (None, route)):
            opt.zero_grad()
            z, losses = _forward(net, k)
            _backward(net, z, losses, r)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5, foreach=True)
            opt.step()
        _assert_same(*nets)
        _assert_same_state(*opts)


@pytest.mark.parametrize("method,level", [("mgda", "feature"), ("upgrad", "param")])
def test_shared_params_listing_the_heads_is_refused_naming_the_fix(method, level):
    """``shared_params=model.parameters()`` (the heads too), a common slip: a gradient method splitting at ``Z``
    cannot tell the heads from the encoder. Refused naming the head parameters (the encoder's graph does not read
    them) and the fix; nothing written. EW at loss level reads no shared parameters and steps as ``backward()``."""
    net = _net(3)
    z, losses = _forward(net, 0)
    with pytest.raises(ConfigurationError, match=r"6 of them \(shapes .*\) are not read by the encoder at all: head "
                       r"parameters listed in shared_params; pass the encoder's parameters only \(shared_params="
                       r"model.encoder.parameters\(\), not model.parameters\(\)\)"):
        mtl_backward(losses, method=create(method), level=level, features=z, shared_params=net.parameters())
    assert all(p.grad is None for p in net.parameters())
    ref, net = _net(3), _net(3)
    zr, lr = _forward(ref, 0)
    sum(lr.values()).backward()  # type: ignore[union-attr]
    z, losses = _forward(net, 0)
    mtl_backward(losses, method=create("ew"), features=z, shared_params=net.parameters())
    _assert_same(net, ref)
