"""The reused (T, *Z) saliency blocks: torch.stack's values, never memory someone still holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlens.engine import mtl_backward, pool
from mtlens.methods import create

pytestmark = pytest.mark.skipif(pool._use_count is None, reason="this torch exposes no storage use count")


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch):
    """An empty pool whose threshold the small blocks below reach (the mechanism is tested, not the size)."""
    monkeypatch.setattr(pool, "MIN_BYTES", 128 * 1024)
    pool.clear()
    yield
    pool.clear()


def test_blocks_below_the_threshold_are_plain_stacks(monkeypatch):
    monkeypatch.setattr(pool, "MIN_BYTES", 1024 * 1024)
    rows = _rows(0, T=3, shape=(256, 256))  # 768 KiB: below the default threshold
    out = pool.stack(rows)
    assert torch.equal(out, torch.stack(rows)) and not pool._pool
    big = _rows(1, T=5, shape=(256, 256))  # 1.25 MiB: pooled
    assert torch.equal(pool.stack(big), torch.stack(big)) and pool._pool


def _rows(seed: int, T: int = 3, shape=(64, 256)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(T)]


def test_values_are_torch_stack():
    rows = _rows(0)
    out = pool.stack(rows)
    assert out.is_contiguous() and out.dtype == rows[0].dtype
    assert torch.equal(out, torch.stack(rows))


def test_released_block_is_reused_held_block_is_not():
    a = pool.stack(_rows(0))
    ptr = a.data_ptr()
    b = pool.stack(_rows(1))  # a is held: another block
    assert b.data_ptr() != ptr
    kept = a.clone()
    c = pool.stack(_rows(2))  # both held (PER_KEY = 2): a fresh torch.stack
    assert c.data_ptr() not in (ptr, b.data_ptr())
    assert torch.equal(a, kept)
    del a
    d = pool.stack(_rows(3))
    assert d.data_ptr() == ptr  # released: reused
    assert torch.equal(d, torch.stack(_rows(3)))


@pytest.mark.parametrize("hold", ["slice", "numpy", "view", "storage"])
def test_any_remaining_holder_prevents_reuse(hold):
    a = pool.stack(_rows(0))
    ptr = a.data_ptr()
    if hold == "slice":
        held = a[1]
    elif hold == "numpy":
        held = a.numpy()
    elif hold == "view":
        held = a.reshape(-1)
    else:
        held = a.untyped_storage()
    kept = a.clone()
    del a
    for seed in (1, 2, 3):
        assert pool.stack(_rows(seed)).data_ptr() != ptr
    if hold == "storage":
        assert torch.equal(torch.tensor([], dtype=torch.float32).set_(held).reshape(kept.shape), kept)
    else:
        assert torch.equal(
            torch.as_tensor(held).reshape(-1), kept[1].reshape(-1) if hold == "slice" else kept.reshape(-1)
        )


def test_small_or_mixed_inputs_are_plain_stacks():
    small = pool.stack(_rows(0, shape=(4, 4)))
    assert torch.equal(small, torch.stack(_rows(0, shape=(4, 4))))
    assert not pool._pool


def test_records_of_earlier_steps_keep_their_saliencies():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 256), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(3))
    method = create("mgda")
    records, copies = [], []
    for _ in range(4):
        x = torch.randn(64, 16)
        z = enc(x)
        losses = {f"t{t}": (h(z) - t).pow(2).mean() for t, h in enumerate(heads)}
        expect = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0] for L in losses.values()])
        rec = mtl_backward(losses, features=z, shared_params=list(enc.parameters()), method=method, level="feature")
        assert rec.saliencies is not None
        torch.testing.assert_close(rec.saliencies, expect, rtol=0, atol=0)
        records.append(rec)
        copies.append(rec.saliencies.clone())
    for rec, kept in zip(records, copies):
        assert torch.equal(rec.saliencies, kept)  # no later step wrote into an earlier record's block
    assert len({r.saliencies.data_ptr() for r in records}) == 4


def test_engine_reuses_the_block_once_the_record_is_dropped():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 256), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(3))
    method = create("upgrad")
    ptrs = []
    for _ in range(3):
        z = enc(torch.randn(64, 16))
        losses = [h(z).pow(2).mean() for h in heads]
        rec = mtl_backward(losses, features=z, shared_params=list(enc.parameters()), method=method, level="feature")
        ptrs.append(rec.saliencies.data_ptr())
        del rec
    assert len(set(ptrs)) == 1


def test_written_gradients_alias_nothing_the_caller_keeps():
    """.grad after apply_decision shares memory with no tensor of the TaskGradients (head rows, saliency block):
    a later accumulation into .grad must not change what the caller kept."""
    from mtlens.engine import Decision, apply_decision, compute_task_gradients

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 256), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(3))
    shared = list(enc.parameters())
    z = enc(torch.randn(64, 16))
    losses = [h(z).pow(2).mean() for h in heads]
    grads = compute_task_gradients(losses, level="feature", features=z, shared_params=shared)
    kept_rows = [[None if r is None else r.clone() for r in row] for row in grads.head_rows]
    kept_block = grads.saliencies.clone()
    assert apply_decision(grads, Decision(weights=torch.ones(3, dtype=torch.float64))) == ""
    for p in list(enc.parameters()) + list(heads.parameters()):
        p.grad.add_(1.0)  # what the next accumulation does
    for row, kept in zip(grads.head_rows, kept_rows):
        for r, k in zip(row, kept):
            assert (r is None and k is None) or torch.equal(r, k)
    assert torch.equal(grads.saliencies, kept_block)


def test_block_is_a_free_pooled_block_or_a_fresh_one():
    """``pool.block``: the (n, *shape) block to be filled row by row; a held block is never handed out again, a
    released one is; below the threshold (or off the CPU) a fresh ``torch.empty``."""
    a = pool.block(3, (64, 256), torch.float32, torch.device("cpu"))
    assert a.shape == (3, 64, 256) and a.dtype == torch.float32 and a.is_contiguous()
    ptr = a.data_ptr()
    b = pool.block(3, (64, 256), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != ptr  # a is held
    rows = _rows(0)
    a[:] = torch.stack(rows)
    c = pool.stack(_rows(1))  # the key's two blocks are held: a fresh stack, a untouched
    assert c.data_ptr() not in (ptr, b.data_ptr()) and torch.equal(a, torch.stack(rows))
    del a
    assert pool.block(3, (64, 256), torch.float32, torch.device("cpu")).data_ptr() == ptr  # released: reused
    small = pool.block(2, (4, 4), torch.float64, torch.device("cpu"))
    assert small.shape == (2, 4, 4) and small.dtype == torch.float64 and (2, (4, 4), torch.float64) not in pool._pool
    meta = pool.block(3, (64, 256), torch.float32, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (3, 64, 256)


def test_a_block_beyond_the_cap_leaves_the_pool_alone(monkeypatch):
    """A block larger than MAX_BYTES is a plain one, and the pooled shapes stay pooled (it used to evict them all
    before falling back)."""
    kept = pool.stack(_rows(0))
    del kept
    assert pool._pool
    monkeypatch.setattr(pool, "MAX_BYTES", 256 * 1024)
    big = pool.block(5, (64, 256), torch.float32, torch.device("cpu"))  # 320 KiB > the cap
    assert big.shape == (5, 64, 256) and (3, (64, 256), torch.float32) in pool._pool
    assert torch.equal(pool.stack(_rows(1, T=5)), torch.stack(_rows(1, T=5)))
    assert (3, (64, 256), torch.float32) in pool._pool
