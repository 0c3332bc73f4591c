"""Post-accumulate-grad hooks run under ``mtl_backward`` as under ``loss.backward()``: once per written
parameter, after its ``.grad`` is written, on every route of the engine — and never on a step that writes
nothing (docs/reliability.md §4). The optimizer-in-backward pattern (PyTorch's tutorial "How to save memory by
fusing the optimizer step into the backward pass") trains the same weights as a separate optimiser step."""

from __future__ import annotations

import copy

import pytest
import torch
from _nets import TinyNet, poison_backward

from mtlens.engine import DecisionCache, mtl_backward
from mtlens.engine.graph import backward_order
from mtlens.errors import ConfigurationError, NonFiniteError
from mtlens.methods import create

ROUTES = [
    # (method, level, extra options): the lean loss step, the general loss step, the lean feature and
    # parameter steps, the general parameter and feature steps, a method with its own head rule
    ("ew", None, {}),
    ("uw", None, {}),
    ("ew", None, {"keep_saliencies": True}),
    ("mgda", "feature", {}),
    ("upgrad", "param", {}),
    ("upgrad", "param", {"jacobian": "batched"}),
    ("pcgrad", "param", {"regularizers": "rep_mtl"}),
    ("mgda", "feature", {"regularizers": "rep_mtl"}),
    ("aligned_mtl", "param", {}),
]


def _hooked(net: torch.nn.Module) -> list[str]:
    calls: list[str] = []
    for name, p in net.named_parameters():
        p.register_post_accumulate_grad_hook(lambda q, name=name: calls.append((name, q.grad is not None)))
    return calls


@pytest.mark.parametrize("name,level,opts", ROUTES, ids=[f"{m}-{lv}-{'-'.join(o)}" for m, lv, o in ROUTES])
def test_hooks_run_once_per_parameter_with_its_grad_written(name, level, opts):
    torch.manual_seed(0)
    net = TinyNet(3)
    ref = copy.deepcopy(net)
    calls = _hooked(net)
    opts = dict(opts)
    if "regularizers" in opts:
        opts["regularizers"] = [create(opts["regularizers"])]
    x = torch.randn(16, 5)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create(name), level=level,
                 **opts)
    # the reference: which parameters the step writes (every one here), each exactly once
    written = [n for n, p in net.named_parameters() if p.grad is not None]
    assert sorted(n for n, _ in calls) == sorted(written) == sorted(n for n, _ in ref.named_parameters())
    assert all(had for _, had in calls), calls  # .grad was already written when the hook ran


def test_a_hook_sees_the_accumulated_grad_when_grad_already_exists():
    torch.manual_seed(1)
    net = TinyNet(2)
    w = net.heads[0].weight
    w.grad = torch.ones_like(w)
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    z, losses = net(torch.randn(8, 5))
    ref = torch.autograd.grad(sum(losses.values()), [w], retain_graph=True)[0]
    mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create("ew"))
    assert len(seen) == 1 and torch.allclose(seen[0], 1 + ref)


@pytest.mark.parametrize("name,level", [("ew", None), ("mgda", "feature"), ("upgrad", "param")])
def test_no_hook_runs_on_a_step_that_writes_nothing(name, level):
    net = TinyNet(3)
    calls = _hooked(net)
    z, losses = net(torch.randn(4, 5))
    bad = {**losses, "t2": losses["t2"] + torch.sqrt(z.sum() * 0 - 0.0)}  # finite loss, NaN gradient
    with pytest.raises(NonFiniteError):
        mtl_backward(bad, features=z, shared_params=list(net.enc.parameters()), method=create(name), level=level)
    assert calls == [] and all(p.grad is None for p in net.parameters())
    z, losses = net(torch.randn(4, 5))
    bad = {**losses, "t2": losses["t2"] + torch.sqrt(z.sum() * 0 - 0.0)}
    with pytest.warns(RuntimeWarning, match="step skipped"):
        rec = mtl_backward(bad, features=z, shared_params=list(net.enc.parameters()), method=create(name),
                           level=level, nonfinite="skip")
    assert rec.skipped and calls == []


def test_cached_steps_run_the_hooks():
    torch.manual_seed(2)
    net = TinyNet(3)
    calls = _hooked(net)
    cache = DecisionCache(3)
    method = create("upgrad")
    for step in range(3):
        calls.clear()
        z, losses = net(torch.randn(8, 5))
        mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=method, level="param",
                     cache=cache)
        assert sorted(n for n, _ in calls) == sorted(n for n, _ in net.named_parameters()), step
        net.zero_grad()


@pytest.mark.parametrize("name,level", [("ew", None), ("mgda", "feature"), ("upgrad", "param")])
def test_optimizer_in_backward_trains_as_a_separate_optimizer_step(name, level):
    """Each parameter's own SGD with momentum, stepped by its hook (then its .grad freed), against one optimiser
    stepped after the backward: the same weights after three steps."""
    torch.manual_seed(3)
    a = TinyNet(3)
    b = copy.deepcopy(a)
    start = [p.detach().clone() for p in a.parameters()]
    opts = {p: torch.optim.SGD([p], lr=0.1, momentum=0.9) for p in a.parameters()}

    def hook(p):
        opts[p].step()
        opts[p].zero_grad()

    for p in a.parameters():
        p.register_post_accumulate_grad_hook(hook)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    ma, mb = create(name), create(name)
    for _ in range(3):
        x = torch.randn(16, 5)
        za, la = a(x)
        mtl_backward(la, features=za, shared_params=list(a.enc.parameters()), method=ma, level=level)
        assert all(p.grad is None for p in a.parameters())  # the hooks stepped and freed every gradient
        opt_b.zero_grad()
        zb, lb = b(x)
        mtl_backward(lb, features=zb, shared_params=list(b.enc.parameters()), method=mb, level=level)
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), start))  # every parameter trained


@pytest.mark.parametrize("name,level,opts", ROUTES[:5], ids=[f"{m}-{lv}-{'-'.join(o)}" for m, lv, o in ROUTES[:5]])
def test_a_hook_that_returns_a_value_is_refused_as_by_backward(name, level, opts):
    """``loss.backward()`` raises "Tensor post accumulate grad hooks should return None." for a hook that returns a
    tensor (one that meant to replace the gradient: a post-accumulate hook cannot); the engine ignored the value
    silently, so the hook's intended change never happened."""
    torch.manual_seed(3)
    ref = TinyNet(2)
    ref.heads[0].weight.register_post_accumulate_grad_hook(lambda p: p.grad * 2)
    with pytest.raises(RuntimeError, match="should return None"):
        sum(ref(torch.randn(4, 5))[1].values()).backward()
    net = TinyNet(2)
    net.heads[0].weight.register_post_accumulate_grad_hook(lambda p: p.grad * 2)
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ConfigurationError, match="should return None"):
        mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create(name), level=level,
                     **opts)


class _DeepNet(torch.nn.Module):
    """A convolutional encoder with normalisation layers and two-layer heads (one head read by two tasks): the
    order of autograd's AccumulateGrad nodes is not the parameters' order reversed (a convolution's weight before
    its bias, a linear layer's bias before its weight)."""

    def __init__(self, T: int = 3):
        super().__init__()
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
            torch.nn.GroupNorm(2, 4), torch.nn.Tanh(), torch.nn.Flatten())
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            for _ in range(T - 1))

    def forward(self, x):
        z = self.enc(x)
        losses = {f"t{i}": (h(z) ** 2).mean() for i, h in enumerate(self.heads)}
        losses["again"] = self.heads[0](z).abs().mean()  # the first head read by a second task
        return z, losses


NETS = {"mlp": (lambda: TinyNet(3), (16, 5)), "conv": (lambda: _DeepNet(3), (2, 3, 8, 8))}
ORDER_ROUTES = [*ROUTES, ("upgrad", "param", {"features": False}), ("upgrad", "param", {"cache": 2}),
                ("db_mtl", "param", {})]


def _order(net: torch.nn.Module) -> list[str]:
    calls: list[str] = []
    for name, p in net.named_parameters():
        p.register_post_accumulate_grad_hook(lambda q, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("name,level,opts", ORDER_ROUTES, ids=[f"{m}-{lv}-{'-'.join(o)}" for m, lv, o in ORDER_ROUTES])
def test_hooks_run_in_the_order_backward_runs_them(net_name, name, level, opts):
    """The hooks' order is ``sum(losses).backward()``'s on every route (the heads near the losses first, the encoder
    from its last layer back; within a layer autograd's order): mtlens wrote the shared parameters first, then the
    heads, each group in the parameters' order — the reverse of what DDP-like bucketing and optimizer-in-backward
    loops written for ``backward()`` see. Two steps: from ``.grad is None`` and accumulating."""
    build, shape = NETS[net_name]
    torch.manual_seed(0)
    net = build()
    ref = copy.deepcopy(net)
    mine, theirs = _order(net), _order(ref)
    opts = dict(opts)
    features = opts.pop("features", True)
    if "regularizers" in opts:
        opts["regularizers"] = [create(opts["regularizers"])]
    if "cache" in opts:  # the second step reuses the first one's weights (backward.py's _cached_step)
        opts["cache"] = DecisionCache(opts["cache"])
    method = create(name)
    for step in range(2):
        x = torch.randn(*shape)
        z, losses = net(x)
        mtl_backward(losses, features=z if features else None, shared_params=list(net.enc.parameters()),
                     method=method, level=level, **opts)
        sum(ref(x)[1].values()).backward()
        assert len(theirs) == len(list(ref.parameters())) * (step + 1)
        assert mine == theirs, step


def _overflowing(net: TinyNet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    z = poison_backward(net.enc(x), float("inf"))  # as float16 gradients overflow
    return z, {f"t{i}": (h(z) ** 2).mean() + 0.1 for i, h in enumerate(net.heads)}


@pytest.mark.parametrize("name,level", [("ew", None), ("mgda", "param"), ("upgrad", "feature"), ("db_mtl", "param")])
def test_a_grad_scaler_overflow_runs_every_hook_as_the_scaled_backward_does(name, level):
    """``scaler.scale(loss).backward()`` that overflows writes its non-finite gradients and runs every written
    parameter's post-accumulate hook (a DDP-like bucket or an offloading hook counts on one call per parameter and
    step); the engine's overflow signal wrote ``inf`` into ONE parameter and ran no hook. Now: ``inf`` in every
    parameter the step would have written, each hook right after (it sees the ``inf``), in ``backward()``'s order;
    ``scaler.step`` still skips the optimiser step and nothing moves."""
    torch.manual_seed(0)
    net = TinyNet(3)
    ref = copy.deepcopy(net)
    seen: list[tuple[str, bool]] = []
    for n, p in net.named_parameters():
        p.register_post_accumulate_grad_hook(lambda q, n=n: seen.append((n, not bool(torch.isfinite(q.grad).any()))))
    theirs = _order(ref)
    x = torch.randn(4, 5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    z, losses = _overflowing(net, x)
    rec = mtl_backward(losses, features=z, shared_params=list(net.enc.parameters()), method=create(name), level=level,
                       grad_scaler=scaler)
    assert rec.skipped and rec.reason.startswith("grad_scaler overflow")
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    ref_scaler.scale(sum(_overflowing(ref, x)[1].values())).backward()
    assert [n for n, _ in seen] == theirs and len(theirs) == len(list(ref.parameters()))
    assert all(inf for _, inf in seen)  # each hook saw its parameter's inf
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**16 and all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def _replay_matches_backward(net: torch.nn.Module, losses_of) -> None:
    names = {id(p): n for n, p in net.named_parameters()}
    calls = _order(net)
    losses = losses_of(net)
    replayed = [names[id(v)] for v in backward_order(losses)]
    sum(losses).backward()
    assert replayed == calls and len(calls) == len(names)


class _ManyLeaves(torch.nn.Module):
    """Nodes with several parameters' AccumulateGrad nodes ready at once: ``torch.addcmul(a, b, c)``, and a
    ``torch.cat`` of eight parameters, whose hooks ``backward()`` runs as 0, 1, 2, 7, 6, 3, 5, 4 — libstdc++'s heap
    does not hand back equal priorities in the order they were pushed."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(5, 6)
        self.a, self.b, self.c, self.d = (torch.nn.Parameter(torch.randn(6)) for _ in range(4))
        self.parts = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(1)) for _ in range(8))

    def losses(self, x):
        z = self.enc(x)
        return [(torch.addcmul(self.a, self.b, self.c) * z).sum(), torch.addcmul(z, self.d, self.a).pow(2).sum(),
                (z * self.c * self.b).sum(), (z[:, :1] * torch.cat(list(self.parts)).sum()).sum()]


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.LSTM(5, 6, num_layers=2, batch_first=True)
        self.att = torch.nn.MultiheadAttention(6, 2, batch_first=True)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(4))

    def losses(self, x):
        z, _ = self.enc(x)
        z, _ = self.att(z, z, z)
        return [(h(z) ** 2).mean() for h in self.heads]


def test_backward_order_replays_autograds_scheduler():
    """``engine/graph.py::backward_order`` against the order ``sum(losses).backward()`` runs the post-accumulate
    hooks: several leaves of one node, an LSTM with multi-head attention, and random MLP encoders and heads."""
    torch.manual_seed(0)
    _replay_matches_backward(_ManyLeaves(), lambda m: m.losses(torch.randn(4, 5)))
    _replay_matches_backward(_Recurrent(), lambda m: m.losses(torch.randn(2, 7, 5)))
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        layers, d = [], 5
        for _ in range(int(torch.randint(1, 5, (), generator=gen))):
            kind = int(torch.randint(0, 3, (), generator=gen))
            if kind == 0:
                layers.append(torch.nn.Linear(d, 6))
                d = 6
            else:
                layers.append(torch.nn.LayerNorm(d) if kind == 1 else torch.nn.Tanh())
        enc = torch.nn.Sequential(*layers)
        heads = torch.nn.ModuleList(
            torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(int(torch.randint(0, 3, (), generator=gen)))],
                                torch.nn.Linear(d, 1))
            for _ in range(int(torch.randint(1, 5, (), generator=gen))))
        net = torch.nn.ModuleDict({"enc": enc, "heads": heads})
        _replay_matches_backward(net, lambda m: [(h(m["enc"](torch.randn(3, 5))) ** 2).mean() for h in m["heads"]])
