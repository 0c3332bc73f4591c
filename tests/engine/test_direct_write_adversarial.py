"""Hostile-but-realistic uses of the lean loss step's direct write (``backward()`` writes ``.grad``, the verdict
after it, docs/reliability.md §4) and of ``all_finite``'s fused check (GradScaler's kernel, which stores every
element back): a step that fails changes nothing, and the check never stores into a tensor the engine does not own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _nets import count_direct_writes
from torch import nn

from mtlens.engine import mtl_backward
from mtlens.errors import NonFiniteError
from mtlens.methods import create

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Net(nn.Module):
    def __init__(self, T: int = 2):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.enc(x)
        return z, {f"t{t}": (h(z) ** 2).mean() for t, h in enumerate(self.heads)}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_direct_write_a_hook_that_raises_mid_backward_leaves_every_grad_none(monkeypatch, exc):
    """A tensor hook on the first encoder layer raises (a user's assertion, a ^C during the backward): autograd has
    already written the heads' and the last layer's ``.grad`` when it runs. The step failed, so nothing may be
    written — under ``torch.autograd.grad`` (the captured path) nothing was; the direct write must put every
    ``.grad`` back to ``None``. (Before: every parameter autograd reached before the hook kept its new ``.grad``.)"""
    direct = count_direct_writes(monkeypatch)
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 4, requires_grad=True)  # an input leaf too
    z, losses = net(x)

    def boom(g):
        raise exc("hook refuses")

    net.enc[0].weight.register_hook(boom)
    with pytest.raises(exc, match="hook refuses"):
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert direct == [1]
    assert x.grad is None
    assert {n: p.grad for n, p in net.named_parameters() if p.grad is not None} == {}


def test_direct_write_anomaly_mode_nan_mid_backward_leaves_every_grad_none(monkeypatch):
    """``torch.autograd.set_detect_anomaly(True)`` raises in the middle of the backward at the first node that
    returns NaN — here in the encoder, after the heads' ``.grad`` are written: the failed step leaves every
    ``.grad`` ``None``, as the captured path did."""
    direct = count_direct_writes(monkeypatch)
    torch.manual_seed(0)
    net = Net()
    h = net.enc[0](torch.randn(5, 4))
    z = net.enc[2](torch.relu(h + (h - h).sqrt()))  # sqrt(0)'s gradient is inf: inf − inf = NaN reaches enc[0]
    losses = {f"t{t}": (hd(z) ** 2).mean() for t, hd in enumerate(net.heads)}
    with torch.autograd.set_detect_anomaly(True), pytest.raises(RuntimeError, match="returned nan values"):
        mtl_backward(losses, features=z, method=create("ew"))
    assert direct == [1]
    assert {n: p.grad for n, p in net.named_parameters() if p.grad is not None} == {}


def test_direct_write_refused_then_passing_step_is_backward_exactly(monkeypatch):
    """A refused step (NaN in the gradient of one head's weight only, an input leaf with ``requires_grad``) resets
    every leaf — the input's too; the next, passing step is ``loss.backward()`` bit for bit (nothing stale)."""
    direct = count_direct_writes(monkeypatch)
    torch.manual_seed(0)
    net, twin = Net(), Net()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(5, 4, requires_grad=True)
    z, losses = net(x)
    w = net.heads[1].weight
    bad = {**losses, "t1": losses["t1"] + (w * float("inf")).sum() * 0}  # NaN in w's gradient alone
    with pytest.warns(RuntimeWarning, match="step skipped"):
        rec = mtl_backward(bad, features=z, method=create("ew"), nonfinite="skip")
    assert rec.skipped and x.grad is None and all(p.grad is None for p in net.parameters())
    x2, xt = torch.randn(5, 4, requires_grad=True), None
    xt = x2.detach().clone().requires_grad_(True)
    z, losses = net(x2)
    mtl_backward(losses, features=z, method=create("ew"))
    _, ref = twin(xt)
    sum(ref.values()).backward()
    assert direct == [1, 1]
    assert torch.equal(x2.grad, xt.grad)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad) and p.grad.stride() == q.grad.stride()


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env=env)


def test_fused_check_never_stores_into_read_only_memory(tmp_path):
    """GradScaler's fused kernel stores every element back, so on memory mapped read-only
    (``np.load(mmap_mode="r")``) it is a segmentation fault. A leaf's tensor hook may hand autograd such a tensor as
    the gradient (``torch.autograd.grad`` returns it as it is), and ``all_finite`` is called on a method's outputs
    too: the fused check only runs on tensors the engine owns. (Before: the process died with SIGSEGV, rc -11.)"""
    proc = _run(f"""
        import warnings
        import numpy as np, torch
        from torch import nn
        from mtlens.engine import mtl_backward
        from mtlens.engine.gradients import all_finite
        from mtlens.methods import create
        warnings.simplefilter("ignore")
        np.save({str(tmp_path / "g.npy")!r}, np.full((1, 6), 0.5, dtype=np.float32))
        ro = torch.from_numpy(np.load({str(tmp_path / "g.npy")!r}, mmap_mode="r"))
        assert all_finite([ro])  # a method's output, a user's tensor: the sums
        torch.manual_seed(0)
        enc, heads = nn.Linear(4, 6), nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
        heads[0].weight.register_hook(lambda g: ro)  # a fixed gradient for one head (read from disk)
        for step in range(3):  # the first step writes .grad (direct), the next ones accumulate (captured)
            z = enc(torch.randn(5, 4))
            mtl_backward({{f"t{{t}}": (h(z) ** 2).mean() for t, h in enumerate(heads)}}, features=z,
                         method=create("ew"))
        assert torch.equal(heads[0].weight.grad, ro * 3)
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_a_process_group_turns_the_direct_write_off_even_with_distributed_false():
    """A process group is up (one gloo rank) and the step is called with ``distributed=False``: a DDP reducer, an
    FSDP or a user's hook may listen on the ``AccumulateGrad`` nodes, so the step captures its gradients
    (``backward_into_grad`` is never called) and a refused step runs no such node."""
    proc = _run("""
        import os, warnings
        import torch, torch.distributed as dist
        from torch import nn
        import mtlens.engine.backward as B
        from mtlens.engine import mtl_backward
        from mtlens.methods import create
        warnings.simplefilter("ignore")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        def no_direct(*a, **k):
            raise AssertionError("direct write taken with a process group up")
        B.backward_into_grad = no_direct
        torch.manual_seed(0)
        enc, heads = nn.Linear(4, 6), nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
        calls = []
        acc = enc.weight.view_as(enc.weight).grad_fn.next_functions[0][0]
        acc.register_hook(lambda *a: calls.append(1))
        z = enc(torch.randn(5, 4))
        losses = {f"t{t}": (h(z) ** 2).mean() for t, h in enumerate(heads)}
        losses["t1"] = losses["t1"] + (z * float("inf")).sum() * 0
        rec = mtl_backward(losses, features=z, method=create("ew"), distributed=False, nonfinite="skip")
        assert rec.skipped and calls == [] and enc.weight.grad is None
        dist.destroy_process_group()
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_the_fused_check_is_kept_where_the_engine_owns_the_gradients(monkeypatch):
    """The lean step's direct write (autograd's own ``.grad``, the engine's stacked losses) still takes the fused
    check; a leaf with a tensor hook (it may return the caller's tensor) or a custom ``autograd.Function`` does not."""
    import mtlens.engine.gradients as G

    seen: list[int] = []
    real = G._fused_finite

    def counted(ts):
        seen.append(len(ts))
        return real(ts)

    monkeypatch.setattr(G, "_fused_finite", counted)
    torch.manual_seed(0)
    net = Net()
    z, losses = net(torch.randn(5, 4))
    mtl_backward(losses, features=z, method=create("ew"))
    assert len(seen) == 1
    net.zero_grad(set_to_none=True)
    net.heads[0].bias.register_hook(lambda g: g)
    z, losses = net(torch.randn(5, 4))
    mtl_backward(losses, features=z, method=create("ew"))
    assert len(seen) == 1


def test_refused_direct_write_raise_policy_leaves_input_and_params_none():
    """``nonfinite="raise"``: the NonFiniteError leaves every leaf ``None`` (the input's too)."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 4, requires_grad=True)
    z, losses = net(x)
    bad = {**losses, "t1": losses["t1"] + (z * float("inf")).sum() * 0}
    with pytest.raises(NonFiniteError):
        mtl_backward(bad, features=z, method=create("ew"))
    assert x.grad is None and all(p.grad is None for p in net.parameters())


def test_direct_write_interrupted_during_the_check_leaves_every_grad_none(monkeypatch):
    """^C between ``backward()`` and the verdict (during the finiteness check): the gradients were written but
    never judged — the step failed, every ``.grad`` goes back to ``None``."""
    import mtlens.engine.backward as B

    direct = count_direct_writes(monkeypatch)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "all_finite", interrupted)
    torch.manual_seed(0)
    net = Net()
    z, losses = net(torch.randn(5, 4))
    with pytest.raises(KeyboardInterrupt):
        mtl_backward(losses, features=z, method=create("ew"))
    assert direct == [1] and all(p.grad is None for p in net.parameters())


def test_fused_check_keeps_finite_bits_and_only_re_encodes_nans_of_a_refused_tensor():
    """What the fused kernel stores back: every finite value and infinity bit for bit, in every dtype and on its
    vectorised path (64 elements); a NaN stays a NaN but not always the same one (float16's signalling NaN is
    quieted, bfloat16's is re-encoded) — only in a tensor the check refuses."""
    from mtlens.engine.gradients import _fused_finite

    pats = {torch.float16: (torch.int16, 0x7C01), torch.bfloat16: (torch.int16, 0x7FC0),
            torch.float32: (torch.int32, 0x7F800001)}
    for dtype, (itype, nan_bits) in pats.items():
        for n in (1, 64):
            t = torch.linspace(-3, 3, n).to(dtype)
            t[n // 2] = float("inf")
            before = t.view(itype).clone()
            assert _fused_finite([t]) is False and torch.equal(t.view(itype), before)
            t.view(itype)[0] = nan_bits
            before = t.view(itype).clone()
            assert _fused_finite([t]) is False
            assert torch.isnan(t[0]) and torch.equal(t.view(itype)[1:], before[1:]), (dtype, n)


def test_a_leaf_tensor_hook_does_not_hide_a_custom_function_from_the_walk():
    """A leaf with a tensor hook (not owned) and, deeper, a custom ``autograd.Function`` (reentrant checkpoint): the
    walk still turns the direct write off — the flags are independent."""
    from torch.utils.checkpoint import checkpoint

    from mtlens.engine.graph import objective_leaves_direct

    torch.manual_seed(0)
    net = Net()
    for h in net.heads:  # a bias is an addmm's first edge: met before the checkpoint's node
        h.bias.register_hook(lambda g: g)
    x = torch.randn(5, 4, requires_grad=True)
    z = checkpoint(net.enc, x, use_reentrant=True)
    loss = sum((h(z) ** 2).mean() for h in net.heads)
    leaves, direct, owned = objective_leaves_direct(loss)
    assert not direct and not owned and len(leaves) >= 4
