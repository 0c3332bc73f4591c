"""The engine's cheaper fixed per-step work keeps every guarantee: exact finiteness, transactions, heads."""

import pytest
import torch
from _nets import TinyNet

from mtlens.engine import compute_task_gradients, mtl_backward
from mtlens.engine.gradients import _FUSED_BELOW, all_finite
from mtlens.errors import ConfigurationError, NonFiniteError
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
