"""The engine's Gramian: float32 products on column chunks, summed in float64, against float64 J Jᵀ."""

from __future__ import annotations

import pytest
import torch

from mtlens.engine.gramian import CHUNK, gramian_from_blocks, gramian_from_rows


def _reference(blocks):
    J = torch.cat([b.reshape(b.shape[0], -1).double() for b in blocks], dim=1)
    return J @ J.T


@pytest.mark.parametrize("T", [2, 11, 40])
def test_chunked_float32_gramian_is_float64_accurate_to_1e6(T):
    g = torch.Generator().manual_seed(T)
    # a large block (many chunks + a tail), one just above a chunk, small ones (exact path)
    blocks = [torch.randn(T, 3 * CHUNK + 17, generator=g), torch.randn(T, CHUNK + 1, generator=g),
              torch.randn(T, 8, 3, 3, generator=g), torch.randn(T, 5, generator=g)]
    ref = _reference(blocks)
    G = gramian_from_blocks(blocks)
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    scale = ref.diagonal().max()
    err = (G - ref).abs().max() / scale
    assert err < 1e-6, f"max error {err:.2e} of max‖g‖²"
    torch.testing.assert_close(G, ref, rtol=1e-5, atol=1e-6 * float(scale))
    # rows (per task, per parameter; chunks copied into one reused buffer) give the same numbers
    rows = [[b[t] for b in blocks] for t in range(T)]
    Gr = gramian_from_rows(rows)
    assert torch.equal(Gr, Gr.T) and (Gr - ref).abs().max() / scale < 1e-6
    torch.testing.assert_close(Gr, G, rtol=1e-6, atol=1e-7 * float(scale))


def test_float64_and_small_blocks_are_exact():
    g = torch.Generator().manual_seed(0)
    J64 = torch.randn(5, 2 * CHUNK + 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(gramian_from_blocks([J64]), J64 @ J64.T, rtol=1e-14, atol=0)
    small = torch.randn(5, CHUNK - 1, generator=g)  # one float64 product: products of float32 are exact
    torch.testing.assert_close(gramian_from_blocks([small]), _reference([small]), rtol=1e-13, atol=0)


def test_half_precision_blocks_and_float32_accumulation():
    g = torch.Generator().manual_seed(1)
    J = torch.randn(3, 2 * CHUNK, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        Jh = J.to(dt)
        torch.testing.assert_close(gramian_from_blocks([Jh]), _reference([Jh]), rtol=1e-5, atol=1e-3)
    G32 = gramian_from_blocks([J], dtype=torch.float32)
    assert G32.dtype == torch.float32
    torch.testing.assert_close(G32.double(), _reference([J]), rtol=1e-4, atol=1e-2)


def test_identical_tasks_give_a_psd_gramian_equal_to_float32_round_off():
    """Duplicated rows: entries agree to ~1e-7 relative (not bitwise: the sgemm kernel orders the
    diagonal and off-diagonal sums differently), G stays symmetric and PSD to that precision."""
    g = torch.Generator().manual_seed(2)
    r = torch.randn(1, 3 * CHUNK + 5, generator=g)
    G = gramian_from_blocks([torch.cat([r, r, torch.randn(1, 3 * CHUNK + 5, generator=g)])])
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G[0, 1], G[0, 0], rtol=1e-6, atol=0)
    torch.testing.assert_close(G[0, 2], G[1, 2], rtol=1e-6, atol=1e-6 * float(G[0, 0]))
    assert float(torch.linalg.eigvalsh(G).min()) >= -1e-6 * float(G.trace())


@pytest.mark.parametrize("T", [3, 40])
def test_rows_copied_several_times_through_a_growing_buffer(T):
    """gramian_from_rows' copy buffer: a small parameter first (a one-chunk buffer), then one that needs
    a larger buffer and several copies of it (T = 40: 6 chunks per copy of ~4 MiB, 8 chunks + a tail),
    then small ones — against the float64 product, and equal to the blocks' result."""
    from mtlens.engine import gramian

    g = torch.Generator().manual_seed(T)
    per_copy = max(1, gramian.BUFFER_BYTES // (4 * T * CHUNK))
    blocks = [torch.randn(T, CHUNK + 3, generator=g), torch.randn(T, (per_copy + 2) * CHUNK + 5, generator=g),
              torch.randn(T, 7, generator=g), torch.randn(T, 2 * CHUNK, generator=g)]
    ref = _reference(blocks)
    scale = float(ref.diagonal().max())
    Gr = gramian_from_rows([[b[t] for b in blocks] for t in range(T)])
    assert torch.equal(Gr, Gr.T) and float((Gr - ref).abs().max()) / scale < 1e-6
    torch.testing.assert_close(Gr, gramian_from_blocks(blocks), rtol=1e-6, atol=1e-7 * scale)



def _upgrad_step(enc, heads, x, ys):
    from mtlens.engine import mtl_backward
    from mtlens.methods import create

    for p in list(enc.parameters()) + list(heads.parameters()):
        p.grad = None
    z = enc(x)
    losses = {f"t{t}": ((h(z) - ys[t]) ** 2).mean() for t, h in enumerate(heads)}
    return mtl_backward(losses, features=z, shared_params=list(enc.parameters()), method=create("upgrad"),
                        level="param")


def test_parameter_level_rows_reuse_one_workspace_and_never_alias_grad():
    """Consecutive parameter-level steps copy the per-task rows into the same CPU buffer (no fresh T·P
    allocation for glibc to return and fault back in), give the reference result, and no .grad aliases it."""
    from mtlens.engine import gramian

    assert gramian._FREE_REFS is not None  # the storage reference count is available: reuse is on
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 80), torch.nn.ReLU(), torch.nn.Linear(80, 70))  # 6 160 weights
    heads = torch.nn.ModuleList(torch.nn.Linear(70, 1) for _ in range(3))
    x, ys = torch.randn(16, 6), torch.randn(3, 16, 1)
    gramian.release_workspace()
    rec = _upgrad_step(enc, heads, x, ys)
    (ws,) = gramian._WORKSPACE.values()
    first = [p.grad.clone() for p in enc.parameters()]
    # the reference: per-task gradients by autograd, their float64 Gramian and the weighted sum
    z = enc(x)
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(((h(z) - ys[t]) ** 2).mean(),
                                                                         list(enc.parameters()),
                                                                         retain_graph=True)])
                     for t, h in enumerate(heads)]).double()
    torch.testing.assert_close(rec.gramian, J @ J.T, rtol=1e-6, atol=1e-9)
    w = rec.weights.to(torch.float64)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in first]).double(), w @ J, rtol=1e-5, atol=1e-7)
    for p in enc.parameters():
        assert p.grad.untyped_storage().data_ptr() != ws.untyped_storage().data_ptr()
    rec2 = _upgrad_step(enc, heads, x, ys)  # same inputs: the same step, through the reused buffer
    (ws2,) = gramian._WORKSPACE.values()
    assert ws2.untyped_storage().data_ptr() == ws.untyped_storage().data_ptr()
    torch.testing.assert_close(rec2.gramian, rec.gramian, rtol=0, atol=0)
    for p, g in zip(enc.parameters(), first):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    gramian.release_workspace()
    assert not gramian._WORKSPACE


def test_a_block_kept_by_someone_is_never_overwritten():
    """A Jacobian block still referenced after its step (a method keeping it, a grad that is a view of it)
    makes the next step allocate a fresh buffer: the kept values stay as they were."""
    from mtlens.engine import gramian

    gramian.release_workspace()
    like = [torch.empty(5, 7), torch.empty(3)]
    kept = gramian.jacobian_workspace(2, like)
    kept[0].fill_(1.0)
    again = gramian.jacobian_workspace(2, like)
    assert again[0].untyped_storage().data_ptr() != kept[0].untyped_storage().data_ptr()
    again[0].fill_(2.0)
    assert bool((kept[0] == 1.0).all())
    ptr = again[0].untyped_storage().data_ptr()  # the cached buffer now
    del kept, again
    third = gramian.jacobian_workspace(2, like)  # nothing holds the cached buffer any more: reused
    assert third[0].untyped_storage().data_ptr() == ptr
    assert third[0].shape == (2, 5, 7) and third[1].shape == (2, 3)
    assert gramian.jacobian_workspace(2, [torch.empty(2, dtype=torch.float64), torch.empty(2)]) is None
    gramian.release_workspace()
