"""``mtl_backward`` with ``torch.compile``'d models (docs/engine.md, "torch.compile").

What holds, each checked against the same model run eagerly:

* a compiled **encoder** (heads eager or compiled apart) gives the eager gradients at loss level, at feature level
  and with saliency regularisers (Rep-MTL, encoder only); at parameter level with ``jacobian="batched"``, or with
  ``torch._functorch.config.donated_buffer = False``;
* a model compiled **as a whole** trains at loss level; where the step splits the losses at ``features`` (feature
  level, parameter level with ``features=``, saliencies, regularisers) it is refused with the fix named, since
  ``Z`` and what the heads read are then outputs of one compiled node and ``∂L_t/∂Z`` through autograd is 0 (it
  was a silent wrong step: MGDA's weights uniform, Nash-MTL's zero, Rep-MTL's penalty on zero saliencies);
* what a compiled backward cannot do (run twice under its donated buffers; a second derivative) raises
  :class:`ConfigurationError` naming the fix, with nothing written into ``.grad`` and the method's state unchanged.

The tests compile with ``backend="aot_eager"``: the same autograd structure (one ``CompiledFunctionBackward`` node
per compiled graph, donated buffers, no double backward) without a C++ compiler; one slow test uses inductor where
a compiler exists."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch._functorch.config  # noqa: F401  (torch._functorch.config.patch below)
from torch import nn

from mtlens.engine import mtl_backward
from mtlens.errors import ConfigurationError
from mtlens.methods import create

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes about the tiny graphs


class Net(nn.Module):
    """Encoder 16 → 32 → 8 (ReLU), three linear heads; ``forward`` returns ``Z`` and the heads' outputs (losses are
    computed outside, as in most training loops)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(3))

    def forward(self, x):
        z = self.enc(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


class WholeLosses(nn.Module):
    """The same model returning the losses themselves (compiled as a whole, the losses are the compiled node's
    outputs)."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, y):
        z, preds = self.net(x)
        return z, {f"t{i}": ((p - y[:, i]) ** 2).mean() for i, p in enumerate(preds)}


X = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles fresh modules: dynamo's per-code cache (8 entries) would otherwise fill up and run the
    later ones eagerly, and these tests would then test nothing."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _base() -> Net:
    torch.manual_seed(0)
    return Net()


def _step(net: Net, method: str, level: str | None, features: bool = True, model=None, **kw) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    regs = [create(r) for r in kw.pop("regularizers", ())]
    z, preds = (model if model is not None else net)(X)
    losses = {f"t{i}": ((p - Y[:, i]) ** 2).mean() for i, p in enumerate(preds)}
    mtl_backward(losses, method=create(method), features=z if features else None, shared_params=net.enc.parameters(),
                 level=level, regularizers=regs, **kw)
    return [p.grad for p in net.parameters()]


def _compiled_encoder(heads: bool = False) -> Net:
    net = copy.deepcopy(_base())
    net.enc = torch.compile(net.enc, backend="aot_eager")
    if heads:
        net.heads = nn.ModuleList(torch.compile(h, backend="aot_eager") for h in net.heads)
    return net


def _assert_compiled(t: torch.Tensor) -> None:
    assert t.grad_fn is not None and "CompiledFunction" in t.grad_fn.name(), t.grad_fn


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


ENCODER_ROUTES = [
    ("ew", None, {}),
    ("uw", None, {}),
    ("ew", None, {"keep_saliencies": True}),
    ("ew", None, {"regularizers": ["rep_mtl"]}),
    ("mgda", "feature", {}),
    ("nash_mtl", "feature", {}),
    ("mgda", "feature", {"jacobian": "batched"}),
    ("mgda", "feature", {"regularizers": ["rep_mtl"]}),
    ("upgrad", "param", {"jacobian": "batched"}),
]


@pytest.mark.parametrize("method,level,kw", ENCODER_ROUTES,
                         ids=[f"{m}-{lv}-{'-'.join(map(str, k.values()))}" for m, lv, k in ENCODER_ROUTES])
@pytest.mark.parametrize("heads", [False, True], ids=["eager-heads", "compiled-heads"])
def test_a_compiled_encoder_gives_the_eager_gradients(method, level, kw, heads):
    if heads and kw.get("regularizers"):
        pytest.skip("a saliency regulariser differentiates the heads twice: refused below")
    want = _step(_base(), method, level, **copy.deepcopy(kw))
    net = _compiled_encoder(heads)
    _assert_compiled(net.enc(X))
    _assert_same(_step(net, method, level, **copy.deepcopy(kw)), want)


@pytest.mark.parametrize("method,level,features", [("upgrad", "param", True), ("upgrad", "param", False),
                                                   ("pcgrad", "param", True), ("ew", None, "gramian")])
def test_without_donated_buffers_the_per_task_jacobian_runs_through_a_compiled_encoder(method, level, features):
    kw = {"compute_gramian": "param"} if features == "gramian" else {}
    feats = features is not False
    want = _step(_base(), method, level, feats, **kw)
    with torch._functorch.config.patch(donated_buffer=False):  # read when the backward is compiled (first call)
        net = _compiled_encoder_with_donated_buffers()  # which this setting turns off
        got = _step(net, method, level, feats, **kw)
    _assert_same(got, want)


def _compiled_encoder_with_donated_buffers() -> Net:
    """A compiled encoder whose backward donates its buffers. On torch 2.13 the first graph dynamo compiles for
    ``Sequential.forward`` keeps them (its parameters are graph inputs); the graph it compiles for a second
    instance (a recompilation, as in any process that builds more than one model) donates them — where
    ``torch._functorch.config.donated_buffer`` is on, its default (the tests below set it explicitly)."""
    first = _compiled_encoder()
    first.enc(X).sum().backward()
    return _compiled_encoder()


@pytest.fixture
def donating():
    """aot_autograd's default, whatever an earlier test in the process left (``train.compile`` turns it off)."""
    with torch._functorch.config.patch(donated_buffer=True):
        yield


@pytest.mark.parametrize("method,level,kw", [("upgrad", "param", {}), ("mgda", "param", {}),
                                             ("ew", None, {"compute_gramian": "param"})])
def test_donated_buffers_refuse_the_per_task_jacobian_with_the_fix_named(method, level, kw, donating):
    net = _compiled_encoder_with_donated_buffers()
    m = create(method)
    before = copy.deepcopy(m.state_dict())
    z, preds = net(X)
    _assert_compiled(z)
    losses = {f"t{i}": ((p - Y[:, i]) ** 2).mean() for i, p in enumerate(preds)}
    with pytest.raises(ConfigurationError, match="donated_buffer = False") as info:
        mtl_backward(losses, method=m, features=z, shared_params=net.enc.parameters(), level=level, **kw)
    assert "jacobian='batched'" in str(info.value) and "docs/engine.md" in str(info.value)
    assert all(p.grad is None for p in net.parameters())  # nothing written
    torch.testing.assert_close(m.state_dict(), before, rtol=0, atol=0)  # the method's state as before the step


def test_with_donated_buffers_jacobian_batched_runs_the_encoder_once(donating):
    want = _step(_base(), "upgrad", "param")
    _assert_same(_step(_compiled_encoder_with_donated_buffers(), "upgrad", "param", jacobian="batched"), want)


@pytest.mark.parametrize("level", [None, "feature"])
def test_rep_mtl_runs_through_an_encoder_with_donated_buffers(level, donating):
    """The encoder is differentiated once a step with a saliency regulariser too: its graph is freed by that one
    backward (the feature level used to keep it, which a compiled backward with donated buffers refuses)."""
    method = "ew" if level is None else "mgda"
    want = _step(_base(), method, level, regularizers=["rep_mtl"])
    _assert_same(_step(_compiled_encoder_with_donated_buffers(), method, level, regularizers=["rep_mtl"]), want)


def test_feature_level_with_rep_mtl_frees_the_encoders_graph():
    net = _base()
    z, preds = net(X)
    losses = {f"t{i}": ((p - Y[:, i]) ** 2).mean() for i, p in enumerate(preds)}
    mtl_backward(losses, method=create("mgda"), features=z, shared_params=net.enc.parameters(), level="feature",
                 regularizers=[create("rep_mtl")])
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(z.sum(), list(net.enc.parameters()))


def test_the_compile_errors_are_translated_and_nothing_else_is():
    from mtlens.engine._autograd import compile_error

    donated = RuntimeError("This backward function was compiled with non-empty donated buffers which requires "
                           "create_graph=False and retain_graph=False. Please keep backward(...)")
    double = RuntimeError("torch.compile with aot_autograd does not currently support double backward")
    assert "donated_buffer = False" in str(compile_error(donated))
    assert "second derivative" in str(compile_error(double))
    assert compile_error(RuntimeError("Trying to backward through the graph a second time")) is None


@pytest.mark.parametrize("level", [None, "feature"])
def test_compiled_heads_under_a_saliency_regulariser_are_refused_with_the_fix_named(level):
    net = _compiled_encoder(heads=True)
    method = "ew" if level is None else "mgda"
    with pytest.raises(ConfigurationError, match="second derivative") as info:
        _step(net, method, level, regularizers=["rep_mtl"])
    assert "torch.compile(model.encoder)" in str(info.value)
    assert all(p.grad is None for p in net.parameters())


def test_a_model_compiled_as_a_whole_trains_at_loss_level():
    want = _step(_base(), "ew", None)
    net = copy.deepcopy(_base())
    whole = torch.compile(net, backend="aot_eager")
    got = _step(net, "ew", None, model=whole)
    _assert_same(got, want)
    want = _step(_base(), "upgrad", "param", features=False)
    with torch._functorch.config.patch(donated_buffer=False):
        net = copy.deepcopy(_base())
        got = _step(net, "upgrad", "param", features=False, model=torch.compile(net, backend="aot_eager"))
    _assert_same(got, want)


WHOLE_REFUSED = [
    ("mgda", "feature", {}),
    ("nash_mtl", "feature", {}),
    ("upgrad", "param", {}),
    ("upgrad", "param", {"jacobian": "batched"}),
    ("ew", None, {"keep_saliencies": True}),
    ("ew", None, {"regularizers": ["rep_mtl"]}),
    ("mgda", "feature", {"regularizers": ["rep_mtl"]}),
]


@pytest.mark.parametrize("losses_inside", [False, True], ids=["heads-outputs", "losses"])
@pytest.mark.parametrize("method,level,kw", WHOLE_REFUSED,
                         ids=[f"{m}-{lv}-{'-'.join(map(str, k.values()))}" for m, lv, k in WHOLE_REFUSED])
def test_a_model_compiled_as_a_whole_is_refused_where_the_step_splits_at_features(method, level, kw, losses_inside):
    """Z and the heads' inputs come out of one compiled node: autograd has no path from the losses to Z, so the
    saliencies would be 0 — refused, naming the fix, before anything is written."""
    net = copy.deepcopy(_base())
    kw = dict(kw)
    regs = [create(r) for r in kw.pop("regularizers", ())]
    if losses_inside:
        z, losses = torch.compile(WholeLosses(net), backend="aot_eager")(X, Y)
        assert all(L.grad_fn is z.grad_fn for L in losses.values())  # the losses are the compiled node's outputs
    else:
        z, preds = torch.compile(net, backend="aot_eager")(X)
        losses = {f"t{i}": ((p - Y[:, i]) ** 2).mean() for i, p in enumerate(preds)}
    _assert_compiled(z)
    with pytest.raises(ConfigurationError, match="compile the encoder alone") as info:
        mtl_backward(losses, method=create(method), features=z, shared_params=net.enc.parameters(), level=level,
                     regularizers=regs, **kw)
    assert "CompiledFunction" in str(info.value) and "docs/engine.md" in str(info.value)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.slow
# inductor compiles C++ (g++ unless CXX says otherwise): a machine with gcc but no g++ (Debian's gcc package) has none
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a C++ compiler")
def test_an_inductor_compiled_encoder_gives_the_eager_gradients():
    """The default backend (inductor: generated C++ on the CPU) at feature level, MGDA: the eager gradients up to
    the fused kernels' float32 rounding."""
    want = _step(_base(), "mgda", "feature")
    net = copy.deepcopy(_base())
    net.enc = torch.compile(net.enc)
    got = _step(net, "mgda", "feature")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
