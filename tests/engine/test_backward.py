"""The engine against autograd references on a small hard-parameter-sharing model."""

import pytest
import torch
from _nets import TinyNet
from torch import nn

from mtlens.engine import GramianWeighting, JacobianAggregator, mtl_backward
from mtlens.errors import ConfigurationError, NonFiniteError, ShapeError
from mtlens.methods import create


class FixedWeights(GramianWeighting):
    name = "_fixed_test"

    def __init__(self, w):
        self.w = torch.tensor(w, dtype=torch.float64)

    def weights(self, gramian, losses):
        return self.w


def Net(T=3):
    return TinyNet(T)

def _ref_grads(net, x, w, head_w=(1.0, 1.0, 1.0)):
    """Encoder: the gradient of Σ w_t L_t; heads: of Σ h_t L_t (the head rule: unit weights by default)."""
    out = []
    for weights in (w, head_w):
        net.zero_grad()
        _, losses = net(x)
        sum(wi * L for wi, L in zip(weights, losses.values())).backward()
        out.append({id(p): p.grad.clone() for p in net.parameters()})
    enc = {id(p) for p in net.enc.parameters()}
    return [out[0][id(p)] if id(p) in enc else out[1][id(p)] for p in net.parameters()]


@pytest.mark.parametrize("level", ["param", "feature"])
@pytest.mark.parametrize("jac", ["loop", "batched"])
def test_weighted_update_matches_autograd(level, jac):
    net = Net()
    x = torch.randn(4, 5)
    w = [0.2, 0.5, 1.3]
    ref = _ref_grads(net, x, w)
    net.zero_grad(set_to_none=True)
    z, losses = net(x)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights(w),
                       level=level, jacobian=jac)
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)
    assert rec.gramian.shape == (3, 3) and rec.gramian.dtype == torch.float64
    assert rec.saliencies.shape == (3, 4, 6)


def test_param_gramian_matches_flattened_jacobian():
    net = Net()
    x = torch.randn(4, 5)
    _, losses = net(x)
    rows = []
    for L in losses.values():
        gs = torch.autograd.grad(L, list(net.enc.parameters()), retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in gs]))
    J = torch.stack(rows).double()
    z, losses = net(x)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]))
    torch.testing.assert_close(rec.gramian, J @ J.T)
    # without features: the plain per-task loop gives the same Gramian
    net.zero_grad(set_to_none=True)
    _, losses = net(x)
    rec2 = mtl_backward(losses, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]))
    torch.testing.assert_close(rec2.gramian, J @ J.T)
    for jac in ("loop", "batched"):  # no features: the per-task loop in either mode
        _, losses = net(x)
        rec3 = mtl_backward(losses, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]),
                            jacobian=jac)
        torch.testing.assert_close(rec3.gramian, J @ J.T)


def test_feature_level_runs_exactly_one_encoder_backward():
    net = Net()
    calls = []
    net.enc[0].register_full_backward_hook(lambda *a: calls.append(1))
    z, losses = net(torch.randn(4, 5))
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 2, 3]),
                 level="feature")
    assert len(calls) == 1


def test_loss_level_single_backward_and_feature_level_rejected():
    net = Net()
    calls = []
    net.enc[0].register_full_backward_hook(lambda *a: calls.append(1))
    z, losses = net(torch.randn(4, 5))
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert len(calls) == 1 and rec.gramian is None and rec.level == "loss"
    with pytest.raises(ConfigurationError, match="loss-level"):
        mtl_backward(losses, features=z, method=create("ew"), level="feature")


def test_nonfinite_loss_raises_and_leaves_grads_untouched():
    net = Net()
    z, losses = net(torch.randn(4, 5))
    losses["t1"] = losses["t1"] * float("nan")
    with pytest.raises(NonFiniteError, match="'t1'=nan"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]))
    assert all(p.grad is None for p in net.parameters())
    with pytest.warns(RuntimeWarning, match="skipped"):
        rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"),
                           nonfinite="skip")
    assert rec.skipped and all(p.grad is None for p in net.parameters())


def test_nonfinite_gradient_with_finite_loss_is_caught():
    net = Net()
    z, _ = net(torch.randn(4, 5))
    # sqrt at 0 has an infinite derivative while the loss is finite
    losses = {"a": torch.sqrt((z * 0).sum()), "b": z.pow(2).mean()}
    with pytest.raises(NonFiniteError):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 1]))
    assert all(p.grad is None for p in net.parameters())


def test_bad_inputs_are_loud():
    net = Net()
    z, losses = net(torch.randn(4, 5))
    with pytest.raises(ShapeError, match="scalar"):
        mtl_backward({"a": z.sum(1)}, method=create("ew"))
    with pytest.raises(ConfigurationError, match="shared_params"):
        mtl_backward(losses, features=z, method=FixedWeights([1, 1, 1]))
    with pytest.raises(ConfigurationError, match="features"):
        mtl_backward(losses, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]), level="feature")
    with pytest.raises(ConfigurationError, match="attached"):
        mtl_backward(losses, features=z.detach(), shared_params=net.enc.parameters(), method=create("ew"),
                     keep_saliencies=True)


def test_multi_input_feature_level_update_is_exact():
    """features={task: Z_task}: each task's saliency pushed through its own encoder graph."""
    enc = nn.Linear(5, 4)
    heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    xs = [torch.randn(3, 5), torch.randn(3, 5)]
    w = [0.3, 0.7]
    zs = [enc(x) for x in xs]
    losses = {f"t{i}": heads[i](zs[i]).pow(2).mean() for i in range(2)}
    sum(wi * L for wi, L in zip(w, losses.values())).backward()
    ref = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad(set_to_none=True)
    zs = [enc(x) for x in xs]
    losses = {f"t{i}": heads[i](zs[i]).pow(2).mean() for i in range(2)}
    for h in heads:
        h.zero_grad(set_to_none=True)
    mtl_backward(losses, features={f"t{i}": zs[i] for i in range(2)}, shared_params=enc.parameters(),
                 method=FixedWeights(w), level="feature")
    for p, r in zip(enc.parameters(), ref):
        torch.testing.assert_close(p.grad, r)
    # unequal per-task batch sizes are fine: nothing is paired across tasks
    zs = [enc(torch.randn(3, 5)), enc(torch.randn(2, 5))]
    losses = {f"t{i}": heads[i](zs[i]).pow(2).mean() for i in range(2)}
    rec = mtl_backward(losses, features={"t0": zs[0], "t1": zs[1]}, shared_params=enc.parameters(),
                       method=create("mgda"), level="feature")
    assert rec.gramian[0, 1] == 0 and rec.saliencies is None


class SumAgg(JacobianAggregator):
    name = "_sum_test"

    def aggregate(self, jacobian, losses):
        return [b.sum(0) for b in jacobian], torch.ones(jacobian[0].shape[0])


def test_jacobian_aggregator_path_equals_sum():
    net = Net()
    x = torch.randn(4, 5)
    ref = _ref_grads(net, x, [1, 1, 1])
    net.zero_grad(set_to_none=True)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=SumAgg(), level="param")
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_log_transform_and_grad_accumulation():
    net = Net()
    x = torch.randn(4, 5)
    net.zero_grad()
    _, losses = net(x)
    sum(torch.log(L + 1e-8) for L in losses.values()).backward()
    ref = [2 * p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    for _ in range(2):  # accumulates like loss.backward()
        z, losses = net(x)
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]),
                     loss_transform="log")
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_grad_scaler_writes_scaled_gradients_and_backs_off_on_overflow():
    net = Net()
    x = torch.randn(4, 5)
    ref = _ref_grads(net, x, [1, 1, 1])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    net.zero_grad(set_to_none=True)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]),
                 grad_scaler=scaler)
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad / 1024.0, r, rtol=1e-5, atol=1e-6)
    net.zero_grad(set_to_none=True)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1e38)
    z, losses = net(x)
    rec = mtl_backward({k: v * 1e10 for k, v in losses.items()}, features=z, shared_params=net.enc.parameters(),
                       method=FixedWeights([1, 1, 1]), grad_scaler=scaler2)
    assert rec.skipped and rec.reason.startswith("grad_scaler overflow")
    # the scaler's own protocol: the documented loop continues, the step is skipped, the scale backs off
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    scaler2.step(opt)
    scaler2.update()
    assert scaler2.get_scale() < 1e38
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("level", ["param", "feature"])
def test_record_saliencies_are_raw_under_log_transform(level):
    net = Net()
    x = torch.randn(4, 5)
    z, losses = net(x)
    ref = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0] for L in losses.values()])
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=FixedWeights([1, 1, 1]),
                       level=level, loss_transform="log")
    torch.testing.assert_close(rec.saliencies, ref)
    # the Gramian is the one the method saw: of log(L_t + eps)
    scale = 1 / (rec.losses.double() + 1e-8)
    if level == "feature":
        S = ref.reshape(3, -1).double() * scale[:, None]
        torch.testing.assert_close(rec.gramian, S @ S.T, rtol=1e-4, atol=1e-10)


def test_engine_passes_features_to_methods_that_need_them():
    net = Net(T=2)
    z, losses = net(torch.randn(4, 5))
    m = create("graddrop", batch_reduce=True, seed=0)
    assert m.needs_features
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level="feature")
    assert all(torch.isfinite(p.grad).all() for p in net.enc.parameters())
    with pytest.raises(ConfigurationError, match="feature"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level="param")


@pytest.mark.parametrize("name", ["mgda", "upgrad"])
def test_param_level_multi_input_maps_sliced_from_one_encoder_pass(name):
    # {task: Z[idx_t]} from one encoder pass: the maps share the encoder's graph, which the first task's row
    # used to free ("backward through the graph a second time"); the Jacobian is the explicit one
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(3)])
    shared, x = list(enc.parameters()), torch.randn(9, 5)

    def fwd():
        z = enc(x)
        zs = {f"t{i}": z[3 * i:3 * i + 3] for i in range(3)}
        return zs, {k: heads[i](zs[k]).pow(2).mean() for i, k in enumerate(zs)}

    _, losses = fwd()
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, shared, retain_graph=True)])
                     for L in losses.values()]).double()
    zs, losses = fwd()
    rec = mtl_backward(losses, features=zs, shared_params=shared, method=create(name), level="param")
    torch.testing.assert_close(rec.gramian, J @ J.T)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        sum(losses.values()).backward()  # the graph was freed, as loss.backward() frees it
