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
    # the contract's scale: ‖g_s‖‖g_t‖ (an off-diagonal entry 1/100 of it is not accurate to 1e-6 of itself)
    assert _float64_error(rec.gramian, J) < 1e-6
    torch.testing.assert_close(rec.gramian.diagonal(), (J * J).sum(1), rtol=1e-6, atol=0)
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


def test_a_step_taking_the_buffer_while_another_puts_it_back_gets_its_own():
    """Another thread's step may pop the cached buffer at any bytecode boundary, also at the moment the first step
    puts it back: by then the first step's matrix must already hold the storage, or both steps write one buffer. The
    other step is simulated at that exact moment, from the cache's own ``__setitem__``."""
    from mtlens.engine import gramian

    gramian.release_workspace()
    like = [torch.empty(5, 7), torch.empty(3)]
    gramian.jacobian_workspace(2, like)  # now cached and free
    taken: list = []

    class Interleaved(dict):
        def __setitem__(self, key, ws):
            super().__setitem__(key, ws)
            if not taken:  # the other thread's step, exactly when the buffer is back in the cache (once)
                taken.append(None)
                taken[0] = gramian.jacobian_workspace(2, like)

    saved = gramian._WORKSPACE
    gramian._WORKSPACE = Interleaved(saved)
    try:
        mine = gramian.jacobian_workspace(2, like)
    finally:
        gramian._WORKSPACE = saved
    assert taken[0] is not None and taken[0].untyped_storage().data_ptr() != mine.untyped_storage().data_ptr()
    gramian.release_workspace()


def test_a_block_kept_by_someone_is_never_overwritten():
    """A Jacobian matrix (or a block view of it) still referenced after its step (a method keeping it, a grad
    that is a view of it) makes the next step allocate a fresh buffer: the kept values stay as they were."""
    from mtlens.engine import gramian

    gramian.release_workspace()
    like = [torch.empty(5, 7), torch.empty(3)]
    kept = gramian.jacobian_workspace(2, like)
    assert kept.shape == (2, 38)
    kept.fill_(1.0)
    again = gramian.jacobian_workspace(2, like)
    assert again.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()
    again.fill_(2.0)
    assert bool((kept == 1.0).all())
    ptr = again.untyped_storage().data_ptr()  # the cached buffer now
    block = gramian.matrix_blocks(again, like)[0]  # a view of one parameter's block keeps the buffer taken
    del kept, again
    other = gramian.jacobian_workspace(2, like)
    assert other.untyped_storage().data_ptr() != ptr and bool((block == 2.0).all())
    ptr = other.untyped_storage().data_ptr()
    del block, other
    third = gramian.jacobian_workspace(2, like)  # nothing holds the cached buffer any more: reused
    assert third.untyped_storage().data_ptr() == ptr
    blocks = gramian.matrix_blocks(third, like)
    assert blocks[0].shape == (2, 5, 7) and blocks[1].shape == (2, 3)
    third[1, 35:].copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert blocks[1][1].tolist() == [1.0, 2.0, 3.0] and blocks[0][1].reshape(-1).data_ptr() == third[1].data_ptr()
    assert gramian.jacobian_workspace(2, [torch.empty(2, dtype=torch.float64), torch.empty(2)]) is None
    gramian.release_workspace()


@pytest.mark.parametrize("T", [2, 11, 40])
def test_flat_matrix_gramian_is_float64_accurate_to_1e6(T):
    """The (T, P) workspace's Gramian: float32 products on CHUNK-column chunks that span several parameters
    (mixed sizes: large, just above a chunk, small, tiny), summed in float64, read through the strided
    workspace view — against the float64 product; and the per-parameter path on the same blocks."""
    from mtlens.engine import gramian

    g = torch.Generator().manual_seed(100 + T)
    like = [torch.empty(3 * CHUNK + 17), torch.empty(CHUNK + 1), torch.empty(8, 3, 3), torch.empty(5),
            torch.empty(64, 3, 3, 3)]
    J = torch.randn(T, sum(p.numel() for p in like) + 9, generator=g)[:, 9:]  # row stride ≠ P: a strided view
    J[0] *= 1e3  # tasks on different scales
    blocks = gramian.matrix_blocks(J, like)
    ref = _reference(blocks)
    scale = float(ref.diagonal().max())
    G = gramian.gramian_from_matrix(J)
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    rel = (G - ref).abs() / (ref.diagonal().sqrt()[:, None] * ref.diagonal().sqrt()[None, :])
    assert float(rel.max()) < 1e-6, f"max error {float(rel.max()):.2e} of ‖g_s‖‖g_t‖"
    torch.testing.assert_close(G, gramian_from_blocks(blocks), rtol=1e-6, atol=1e-7 * scale)
    # under one chunk: one float64 product of float32 values (exact products; float64 round-off in the sums,
    # relative to ‖g_s‖‖g_t‖: an entry that nearly cancels is not accurate to 1e-13 of itself)
    small = J[:, : CHUNK - 1]
    ref_small = _reference([small])
    torch.testing.assert_close(gramian.gramian_from_matrix(small), ref_small, rtol=1e-13,
                               atol=1e-14 * float(ref_small.diagonal().max()))
    J64 = J.double()
    torch.testing.assert_close(gramian.gramian_from_matrix(J64), J64 @ J64.T, rtol=1e-13, atol=1e-14 * scale)


def test_combine_matrix_is_the_weighted_sum_as_a_fresh_vector():
    from mtlens.engine import gramian

    g = torch.Generator().manual_seed(3)
    like = [torch.empty(4, 5), torch.empty(7)]
    J = torch.randn(3, 27, generator=g)
    w = torch.tensor([0.5, -2.0, 1.25], dtype=torch.float64)
    v = gramian.combine_matrix(w, J)
    assert v.shape == (27,) and v.dtype == torch.float32
    assert v.untyped_storage().data_ptr() != J.untyped_storage().data_ptr()
    torch.testing.assert_close(v.double(), w @ J.double(), rtol=1e-6, atol=1e-6)
    parts = gramian.split_flat(v, like)
    assert [tuple(p.shape) for p in parts] == [(4, 5), (7,)]
    assert torch.equal(parts[1], v[20:])


def test_grads_are_fresh_every_step_never_views_of_the_workspace():
    """Parameter level through the (T, P) workspace: every .grad is a view of a flat vector of its own step
    (not of the reused Jacobian buffer), so a .grad kept from one step keeps its values through the next steps,
    and the workspace is still reused (the .grads do not hold it)."""
    from mtlens.engine import gramian

    torch.manual_seed(1)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 80), torch.nn.ReLU(), torch.nn.Linear(80, 70))
    heads = torch.nn.ModuleList(torch.nn.Linear(70, 1) for _ in range(3))
    x, ys = torch.randn(16, 6), torch.randn(3, 16, 1)
    gramian.release_workspace()
    _upgrad_step(enc, heads, x, ys)
    (ws,) = gramian._WORKSPACE.values()
    kept = [p.grad for p in enc.parameters()]
    values = [g.clone() for g in kept]
    assert all(g.untyped_storage().data_ptr() != ws.untyped_storage().data_ptr() for g in kept)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a different second step: the workspace gets other rows
    _upgrad_step(enc, heads, x, ys)
    (ws2,) = gramian._WORKSPACE.values()
    assert ws2.untyped_storage().data_ptr() == ws.untyped_storage().data_ptr()  # reused: nothing held it
    for g, v in zip(kept, values):
        assert torch.equal(g, v)
    assert not torch.equal(list(enc.parameters())[0].grad, values[0])
    gramian.release_workspace()


def _float64_error(G, J):
    """Largest |G − G64| over ‖g_s‖‖g_t‖ (the precision contract's scale) against float64 J Jᵀ."""
    J64 = J.double()
    ref = J64 @ J64.T
    d = ref.diagonal().sqrt().clamp_min(1e-300)
    return float(((G - ref).abs() / (d[:, None] * d[None, :])).max())


@pytest.mark.parametrize("P", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 3 * CHUNK, 3 * CHUNK + 5,
                               4099 * 5,  # no equal chunks of ≤ CHUNK in ≤ 2× the fewest: the tail's product
                               56_640])  # the conv benchmark's P: 15 equal chunks of 3 776
@pytest.mark.parametrize("T", [1, 2, 3, 7, 11, 40])
def test_matrix_gramian_within_the_contract_on_every_layout(T, P):
    """gramian_from_matrix on a contiguous matrix, a strided view (row stride ≠ P), the zero-padded workspace and
    the per-parameter blocks path: float64, exactly symmetric, within the contract's bound of the float64 product
    (√CHUNK·2⁻²⁴ ≈ 3.8e-6 of ‖g_s‖‖g_t‖ at worst; 2e-6 here for random rows), never reading past the row."""
    from mtlens.engine import gramian

    g = torch.Generator().manual_seed(1000 * T + P)
    base = torch.randn(T, P + 13, generator=g)
    base[:, P:] = float("nan")  # columns past the row: any read of them would show
    layouts = {"contiguous": base[:, :P].contiguous(), "strided": base[:, :P]}
    gramian.release_workspace()
    ws = gramian.jacobian_workspace(T, [torch.empty(P)])
    ws.copy_(layouts["contiguous"])
    layouts["workspace"] = ws
    for name, J in layouts.items():
        G = gramian.gramian_from_matrix(J)
        assert G.dtype == torch.float64 and G.shape == (T, T), name
        assert torch.equal(G, G.T), name
        err = _float64_error(G, J)
        assert err < 2e-6, f"{name}: error {err:.1e}"
    Gb = gramian_from_blocks([layouts["strided"]])  # the one-large-float32-block path (feature level's stack)
    assert torch.equal(Gb, Gb.T) and _float64_error(Gb, layouts["contiguous"]) < 2e-6
    gramian.release_workspace()


def test_chunk_widths_are_at_most_chunk_and_cover_the_row():
    from mtlens.engine.gramian import _chunk_width

    for n in [CHUNK, CHUNK + 2, 3 * CHUNK + 5, 56_640, 427_264, 11_689_512, 2**20 + 7]:
        w = _chunk_width(n)
        assert w == 0 or (w <= CHUNK and n % w == 0 and n // w <= 2 * -(-n // CHUNK)), n
    assert _chunk_width(56_640) == 3776 and _chunk_width(427_264) == 3338 and _chunk_width(4 * CHUNK) == CHUNK
    assert _chunk_width(4099 * 5) == 0  # 20 495 = 5·4099: no divisor between 6 and 10 chunks


def test_workspace_padding_is_zero_never_visible_and_the_buffer_still_reused():
    """The float32 workspace of P > CHUNK columns is a (T, P) view of a (T, P_pad) buffer: nothing handed out
    (the matrix, its rows, the per-parameter blocks) reaches the padding, which stays zero through steps of
    written rows; the buffer is reused from call to call, and not while a view of it is held."""
    from mtlens.engine import gramian

    gramian.release_workspace()
    like = [torch.empty(4099 * 5 - 17 * 31 - 2), torch.empty(17, 31), torch.empty(2)]
    P = sum(p.numel() for p in like)
    assert gramian._chunk_width(P) == 0  # P = 20 495 = 5·4099: no equal chunks, the padded chunks are read
    J = gramian.jacobian_workspace(4, like)
    assert J.shape == (4, P) and J.stride() == (6 * CHUNK, 1)  # rows padded to the next multiple of CHUNK
    base = J._base
    ptr = base.data_ptr()
    assert base.shape == (4, 6 * CHUNK) and bool((base[:, P:] == 0).all())
    blocks = gramian.matrix_blocks(J, like)
    assert sum(b[0].numel() for b in blocks) == P and blocks[-1][3, -1].data_ptr() == J[3, P - 1].data_ptr()
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        for t in range(4):
            J[t].copy_(torch.randn(P, generator=g))  # the engine's row writer (_write_row) writes J[t]
        J.div_(2.0)  # the engine's loss-scale division on the matrix
        for b in blocks:
            b.mul_(1.0)
        assert bool((base[:, P:] == 0).all()), step
        G = gramian.gramian_from_matrix(J)
        assert torch.equal(G, G.T) and _float64_error(G, J) < 2e-6
    base[:, P:] = 1.0  # the Gramian does read the padding (so its zeros matter): ones there change G
    assert _float64_error(gramian.gramian_from_matrix(J), J) > 1e-3
    base[:, P:] = 0.0
    del blocks, b, J, base  # every view: the buffer is free again
    again = gramian.jacobian_workspace(4, like)
    assert again._base.data_ptr() == ptr  # nothing held it: reused, padding still zero
    assert bool((again._base[:, P:] == 0).all())
    kept = again[1:]  # a view held: the next call allocates a fresh buffer
    other = gramian.jacobian_workspace(4, like)
    assert other._base.data_ptr() != ptr and bool((other._base[:, P:] == 0).all())
    del kept, again, other
    # float64 and P ≤ CHUNK (or a multiple of it): no padding, the contiguous (T, P) matrix as before
    assert gramian.jacobian_workspace(2, [torch.empty(3 * CHUNK + 5, dtype=torch.float64)]).is_contiguous()
    assert gramian.jacobian_workspace(2, [torch.empty(CHUNK - 3)]).is_contiguous()
    assert gramian.jacobian_workspace(2, [torch.empty(2 * CHUNK)]).is_contiguous()
    gramian.release_workspace()


def test_only_whole_rows_of_the_padded_workspace_take_the_padded_chunks():
    """A sub-matrix of the workspace that is not whole rows (a column slice) must not read the columns after it:
    it takes the general path and stays within the contract."""
    from mtlens.engine import gramian

    gramian.release_workspace()
    P = 4099 * 5  # no equal chunks: the workspace's Gramian reads its zero padding
    J = gramian.jacobian_workspace(3, [torch.empty(P)])
    J.copy_(torch.randn(3, P, generator=torch.Generator().manual_seed(3)))
    J._base[:, P:] = float("nan")  # stands for columns it must not read: only whole rows may
    assert gramian._zero_padded(J) and gramian._zero_padded(J[1:])
    assert bool(gramian.gramian_from_matrix(J).isnan().all())
    # column slices: the tail's product (n = 20 494, 20 492: no equal chunks) or equal chunks, no padding read
    for sub in (J[:, 1:], J[:, 3:], J[:, 50:], J[:, : P - 50], J[:, 1:-1]):
        assert not gramian._zero_padded(sub)
        G = gramian.gramian_from_matrix(sub)
        assert torch.equal(G, G.T) and _float64_error(G, sub) < 2e-6
    assert not gramian._zero_padded(J.contiguous()) and not gramian._zero_padded(torch.randn(3, P))
    gramian.release_workspace()
