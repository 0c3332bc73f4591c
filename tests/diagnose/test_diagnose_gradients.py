"""GDS (arXiv:2402.03557), GMS (PCGrad Def. 3, arXiv:2001.06782), norms and cond(G) from the Gramian."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlens  # noqa: F401
from mtlens.diagnose import (
    gradient_direction_similarity,
    gradient_magnitude_similarity,
    gradient_norms,
    gramian_condition_number,
)
from mtlens.engine import StepRecord, mtl_backward
from mtlens.errors import ConfigurationError, NonFiniteError, ShapeError
from mtlens.methods import create


def G_of(J):
    J = torch.as_tensor(J, dtype=torch.float64)
    return J @ J.T


def test_parallel_opposite_and_magnitude_ratio():
    v = torch.randn(7, dtype=torch.float64)
    par = G_of(torch.stack([v, v, v]))
    gds, gms = gradient_direction_similarity(par), gradient_magnitude_similarity(par)
    assert gds.mean == pytest.approx(1.0) and gds.min == pytest.approx(1.0) and gds.conflict_fraction == 0.0
    assert gms.mean == pytest.approx(1.0) and gds.n_pairs == 3
    opp = G_of(torch.stack([v, -v]))
    gds = gradient_direction_similarity(opp)
    assert gds.mean == pytest.approx(-1.0) and gds.conflict_fraction == 1.0
    assert gradient_magnitude_similarity(opp).mean == pytest.approx(1.0)
    ratio = G_of(torch.stack([v, 3 * v]))
    assert gradient_magnitude_similarity(ratio).mean == pytest.approx(0.6)  # 2·3/(1+9)
    assert gradient_direction_similarity(ratio).mean == pytest.approx(1.0)
    three = G_of(torch.stack([v, 2 * v, -4 * v]))  # pairs: r = 1/2, 1/4, 1/2
    gms = gradient_magnitude_similarity(three)
    expect = [0.8, 8 / 17, 0.8]
    assert gms.mean == pytest.approx(sum(expect) / 3) and gms.min == pytest.approx(8 / 17)
    gds = gradient_direction_similarity(three)
    assert gds.conflict_fraction == pytest.approx(2 / 3) and gds.mean == pytest.approx(-1 / 3)


def test_matches_explicit_cosines_on_random_jacobian():
    J = torch.randn(4, 20, dtype=torch.float64)
    res = gradient_direction_similarity(G_of(J))
    cos = F.cosine_similarity(J.unsqueeze(1), J.unsqueeze(0), dim=2)
    torch.testing.assert_close(res.matrix, cos)
    iu = torch.triu_indices(4, 4, 1)
    assert res.mean == pytest.approx(float(cos[iu[0], iu[1]].mean()))
    assert res.min == pytest.approx(float(cos[iu[0], iu[1]].min()))
    assert res.conflict_fraction == pytest.approx(float((cos[iu[0], iu[1]] < 0).double().mean()))
    torch.testing.assert_close(res.grad_norms, J.norm(dim=1))
    torch.testing.assert_close(gradient_norms(G_of(J)), J.norm(dim=1))
    assert set(res.to_dict("x/", ["a", "b", "c", "d"])) == {
        "x/gds_mean",
        "x/gds_min",
        "x/gds_conflict_fraction",
        "x/cond_G",
        "x/grad_norm/a",
        "x/grad_norm/b",
        "x/grad_norm/c",
        "x/grad_norm/d",
    }


def test_zero_norm_gradients_and_single_task_are_defined():
    v = torch.randn(5, dtype=torch.float64)
    G = G_of(torch.stack([v, torch.zeros(5), 2 * v, torch.zeros(5)]))
    gds, gms = gradient_direction_similarity(G), gradient_magnitude_similarity(G)
    for r in (gds, gms):
        assert torch.isfinite(r.matrix).all() and math.isfinite(r.mean) and math.isfinite(r.min)
    assert gds.matrix[0, 1] == 0.0 and gds.matrix[1, 1] == 0.0 and gds.matrix[0, 2] == pytest.approx(1.0)
    assert gms.matrix[0, 1] == 0.0 and gms.matrix[1, 3] == 1.0  # two zero gradients: equal magnitudes
    assert gramian_condition_number(G) == math.inf
    one = gradient_direction_similarity(torch.tensor([[4.0]]))
    assert (one.mean, one.min, one.conflict_fraction, one.n_pairs, one.condition_number) == (
        1.0,
        1.0,
        0.0,
        0,
        1.0,
    )
    assert gradient_magnitude_similarity(torch.tensor([[0.0]])).mean == 1.0
    assert gramian_condition_number(torch.zeros(2, 2)) == math.inf


def test_condition_number_and_scale():
    G = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert gramian_condition_number(G) == pytest.approx(4.0)
    J = torch.randn(3, 10, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(G_of(J))
    assert gramian_condition_number(G_of(J)) == pytest.approx(float(ev[-1] / ev[0]))
    tiny = G_of(J * 1e-150)  # entries ~1e-300: still exact
    assert gradient_direction_similarity(tiny).mean == pytest.approx(
        gradient_direction_similarity(G_of(J)).mean
    )
    assert gradient_magnitude_similarity(tiny).mean == pytest.approx(
        gradient_magnitude_similarity(G_of(J)).mean
    )


def test_bad_input_is_loud():
    with pytest.raises(ShapeError, match="square"):
        gradient_direction_similarity(torch.ones(2, 3))
    # a non-finite Gramian is the same fault for diagnostics and methods: one validation, one error
    with pytest.raises(NonFiniteError, match="non-finite"):
        gradient_magnitude_similarity(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    rec = StepRecord(task_names=["a"], losses=torch.ones(1), objective_losses=torch.ones(1), level="loss")
    with pytest.raises(ConfigurationError, match="compute_gramian='param'"):
        gradient_direction_similarity(rec)


def test_from_an_engine_record_equals_explicit_per_task_gradients():
    enc = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    x = torch.randn(8, 5)
    z = enc(x)
    losses = {f"t{i}": (h(z) - i).pow(2).mean() for i, h in enumerate(heads)}
    rows = []
    for L in losses.values():
        gs = torch.autograd.grad(L, list(enc.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]).double())
    J = torch.stack(rows)
    rec = mtl_backward(
        losses,
        features=z,
        shared_params=enc.parameters(),
        method=create("ew"),
        compute_gramian="param",
    )
    assert rec.level == "param"
    res = gradient_direction_similarity(rec)
    torch.testing.assert_close(res.matrix, F.cosine_similarity(J.unsqueeze(1), J.unsqueeze(0), dim=2))
    assert res.level == "param"
    assert gradient_magnitude_similarity(rec).mean == pytest.approx(
        float(gradient_magnitude_similarity(J @ J.T).mean)
    )


def _torch_reference(G):
    """GDS/GMS as torch formulas on the symmetrised float64 Gramian (the implementation before the plain-Python
    one): cosines G_ij / n_i / n_j clamped to [-1, 1] (0 without a direction), 2r / (1 + r²) with r = min/max."""
    G = torch.as_tensor(G).to(torch.float64)
    G = 0.5 * G + 0.5 * G.T
    n = G.diagonal().clamp_min(0).sqrt()
    nz = n > 0
    d = torch.where(nz, n, torch.ones_like(n))
    cos = torch.where(nz[:, None] & nz[None, :], (G / d[:, None] / d[None, :]).clamp(-1, 1), torch.zeros_like(G))
    cos.diagonal().copy_(nz.double())
    hi, lo = torch.maximum(n[:, None], n[None, :]), torch.minimum(n[:, None], n[None, :])
    r = torch.where(hi > 0, lo / torch.where(hi > 0, hi, torch.ones_like(hi)), torch.ones_like(hi))
    return cos, 2 * r / (1 + r * r), n


@pytest.mark.parametrize("case", ["random", "1e+150", "1e-150", "mixed", "asymmetric", "zero rows", "T=40"])
def test_plain_python_identifiers_equal_the_tensor_formulas(case):
    torch.manual_seed(0)
    J = torch.randn(40 if case == "T=40" else 4, 9, dtype=torch.float64)
    if case in ("1e+150", "1e-150"):
        J = J * float(case)
    if case == "mixed":
        J[0] *= 1e150
        J[2] *= 1e-150
    if case == "zero rows":
        J[1] = 0
        J[3] = 0
    G = G_of(J)
    if case == "asymmetric":
        G = G + 1e-3 * torch.triu(torch.ones_like(G), 1)  # round-off asymmetry: both symmetrise it
    cos, gms_ref, n = _torch_reference(G)
    iu = torch.triu_indices(G.shape[0], G.shape[0], 1)
    gds, gms = gradient_direction_similarity(G), gradient_magnitude_similarity(G)
    torch.testing.assert_close(gds.matrix, cos, rtol=1e-13, atol=0)
    torch.testing.assert_close(gms.matrix, gms_ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(gds.grad_norms, n, rtol=1e-15, atol=0)
    assert gds.mean == pytest.approx(float(cos[iu[0], iu[1]].mean()), rel=1e-12, abs=1e-15)
    assert gds.min == float(cos[iu[0], iu[1]].min()) and gms.min == float(gms_ref[iu[0], iu[1]].min())
    assert gms.mean == pytest.approx(float(gms_ref[iu[0], iu[1]].mean()), rel=1e-12)
    assert gds.conflict_fraction == float((cos[iu[0], iu[1]] < 0).double().mean())
    assert "condition_number" not in vars(gds)  # computed when first read, equal to gramian_condition_number
    cond = gramian_condition_number(G)
    assert gds.condition_number == cond and gms.condition_number == cond and gds.to_dict()["cond_G"] == cond


def test_identifier_matrices_live_on_the_gramians_device_and_cond_needs_the_gramian():
    G = G_of(torch.randn(3, 5))
    for f in (gradient_direction_similarity, gradient_magnitude_similarity):
        r = f(G)
        assert r.matrix.device == G.device and r.grad_norms.device == G.device
        bare = type(r)(r.mean, r.min, r.matrix, r.grad_norms, r.n_pairs)
        with pytest.raises(ConfigurationError, match="built without its Gramian"):
            _ = bare.condition_number
