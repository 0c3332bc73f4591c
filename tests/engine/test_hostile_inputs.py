"""Hostile inputs to the Gramian validation, the solvers and the engine's finiteness check.

Each test names the input that broke the code before its fix (docs/reliability.md lists them)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from _nets import poison_backward

from mtlens.engine import GramianWeighting
from mtlens.engine.numerics import check_gramian
from mtlens.errors import NonFiniteError
from mtlens.methods import available, create
from mtlens.methods._solvers import min_norm_simplex

GRAMIAN_METHODS = [n for n in available() if isinstance(create(n), GramianWeighting)]
NEAR_MAX = 1.7e308  # finite, but G + Gᵀ overflows


def test_check_gramian_symmetrises_entries_near_the_float64_limit_without_overflow():
    """Broke on G = 1.7e308·11ᵀ (finite): ``0.5 * (G + Gᵀ)`` overflowed to inf after the finiteness check."""
    G = torch.full((2, 2), NEAR_MAX, dtype=torch.float64)
    out = check_gramian(G)
    assert torch.isfinite(out).all() and torch.equal(out, G)


def test_check_gramian_numpy_route_matches_the_torch_route_bitwise_and_raises_alike():
    """Not a former failure: CPU Gramians are validated in numpy (a few µs instead of ~50 per step); the result,
    its dtype and the errors are those of the tensor route (float32 / asymmetric / non-contiguous / numpy input),
    and the input is left unmodified."""
    from mtlens.engine.numerics import check_gramian_numpy
    from mtlens.errors import ShapeError

    g = torch.Generator().manual_seed(0)
    for G in (torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g),
              torch.randn(6, 6, generator=g, dtype=torch.float64).t(), np.full((2, 2), NEAR_MAX)):
        before = torch.as_tensor(G).clone()
        Gt = torch.as_tensor(G).to(torch.float64)
        want = 0.5 * Gt + 0.5 * Gt.T
        got, got_np = check_gramian(G), check_gramian_numpy(G)
        assert got.dtype == torch.float64 and torch.equal(got, want) and np.array_equal(got_np, want.numpy())
        assert torch.equal(torch.as_tensor(G), before)
    for bad in (float("nan"), float("inf")):
        G = torch.eye(3, dtype=torch.float64)
        G[1, 2] = bad
        for f in (check_gramian, check_gramian_numpy):
            with pytest.raises(NonFiniteError, match="non-finite entries"):
                f(G, "mgda")
    for f in (check_gramian, check_gramian_numpy):
        with pytest.raises(ShapeError, match="non-empty square"):
            f(torch.ones(2, 3), "mgda")


_CHILD = """
import sys, torch
from mtlens.methods import create
from mtlens.errors import MTLensError
G = torch.full((2, 2), 1.7e308, dtype=torch.float64)
for name in sys.argv[1:]:
    try:
        create(name).weights(G, torch.ones(2))
    except MTLensError:
        pass
print("survived")
"""


def test_gramian_methods_survive_a_gramian_near_the_float64_limit():
    """Broke on G = 1.7e308·11ᵀ: UPGrad and DualProj (the dual-cone NNLS) aborted the whole Python process
    (``free(): double free`` inside scipy's nnls, fed the inf of the overflowed symmetrisation). Every
    Gramian method must return or raise an mtlens error — never a raw numpy/scipy exception (the child's
    traceback) nor an abort (run in a child: an abort would kill pytest)."""
    r = subprocess.run([sys.executable, "-c", _CHILD, *GRAMIAN_METHODS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "survived" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_min_norm_simplex_refuses_non_finite_gramians(bad):
    """Broke on G = [[1, nan], [nan, 1]] (and inf): returned the uniform weights [0.5, 0.5] as a certified
    answer (NaN compares false in every test); the callers that pass it their own matrices (FairGrad's
    cosine matrix, CAGrad) would have trusted it."""
    G = np.array([[1.0, bad], [bad, 1.0]])
    with pytest.raises(NonFiniteError, match="non-finite"):
        min_norm_simplex(G)
    with pytest.raises(NonFiniteError):
        min_norm_simplex(np.array([[bad, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]), relative=True)


# ---- sparse gradients (nn.Embedding(sparse=True) as a shared parameter) -------------------------
def _embedding_step(sparse, method, level, jacobian="loop", nan_task=None, nonfinite="raise"):
    from torch import nn

    from mtlens.engine import mtl_backward

    torch.manual_seed(0)
    emb = nn.Embedding(10, 6, sparse=sparse)
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    z = emb(torch.tensor([[1, 2, 3], [3, 4, 4], [0, 9, 9], [5, 5, 5]])).mean(1)

    def poisoned(t):
        return poison_backward(t, float("nan"))

    losses = {f"t{i}": (h(poisoned(z) if i == nan_task else z) ** 2).mean() + 0.1 for i, h in enumerate(heads)}
    m = create(method)
    rec = mtl_backward(losses, features=z, shared_params=[emb.weight], method=m, level=level, jacobian=jacobian,
                       nonfinite=nonfinite)
    return emb.weight.grad, rec


@pytest.mark.parametrize("method,level", [("mgda", "param"), ("upgrad", "param"), ("db_mtl", None)])
def test_sparse_gradients_at_the_parameter_level_match_the_dense_embedding(method, level):
    """Broke on nn.Embedding(sparse=True) as the shared parameter with MGDA/UPGrad at level='param' and DB-MTL
    (per-task parameter gradients): a raw RuntimeError "copy_() between dense and sparse Tensors" (before this
    round's rewrite: "reshape is not implemented for sparse tensors"). Each task's sparse row is now densified."""
    g_sparse, _ = _embedding_step(True, method, level)
    g_dense, _ = _embedding_step(False, method, level)
    g_sparse = g_sparse.to_dense() if g_sparse.layout != torch.strided else g_sparse
    assert torch.allclose(g_sparse, g_dense, rtol=1e-6, atol=1e-8)


def test_sparse_gradients_with_the_batched_jacobian_are_a_configuration_error():
    """Broke on the same embedding with jacobian='batched': a raw NotImplementedError from vmap ("Could not run
    'aten::view' with arguments from the 'SparseCPU' backend")."""
    from mtlens.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="jacobian='loop'"):
        _embedding_step(True, "mgda", "param", jacobian="batched")


@pytest.mark.parametrize("method,level", [("ew", None), ("mgda", "param"), ("mgda", "feature")])
def test_sparse_gradients_nonfinite_skip_and_raise(method, level):
    """A NaN task gradient through a sparse embedding is skipped (no .grad written) under nonfinite='skip' and a
    NonFiniteError under 'raise' (at level='param' it broke with the raw RuntimeError above; EW and the feature
    level held)."""
    with pytest.warns(RuntimeWarning, match="skipped"):
        g, rec = _embedding_step(True, method, level, nan_task=1, nonfinite="skip")
    assert rec.skipped and g is None
    with pytest.raises(NonFiniteError):
        _embedding_step(True, method, level, nan_task=1)
