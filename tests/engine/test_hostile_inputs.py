"""Hostile inputs to the Gramian validation, the solvers and the engine's finiteness check.

Each test names the input that broke the code before its fix (docs/reliability.md lists them)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

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
