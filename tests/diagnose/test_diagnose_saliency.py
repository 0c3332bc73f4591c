"""Feature Disentanglement (arXiv:2402.03557) and TSR entropy (arXiv:2507.21049): known answers."""

import math

import pytest
import torch

import mtlens  # noqa: F401
from mtlens.diagnose import feature_disentanglement, tsr_entropy
from mtlens.engine import StepRecord
from mtlens.errors import ConfigurationError, ShapeError
from mtlens.methods.rep_mtl import tsr_loss


def _binary_entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_fully_disentangled_is_zero_and_identical_is_one():
    T, B, C, H, W = 3, 2, 6, 2, 2
    S = torch.zeros(T, B, C, H, W)
    for t in range(T):
        S[t, :, 2 * t : 2 * t + 2] = torch.randn(B, 2, H, W)  # each element serves one task
    assert feature_disentanglement(S) == pytest.approx(0.0, abs=1e-7)
    base = torch.randn(B, C, H, W)
    S = torch.stack([base, -base, 2 * base.abs() / 2])  # equal magnitudes, any sign
    assert feature_disentanglement(S) == pytest.approx(1.0, abs=1e-6)


def test_known_mixture_and_zero_elements_left_out():
    S = torch.tensor([[1.0, 2.0], [3.0, 2.0]]).reshape(2, 1, 2)  # element 0: (1, 3); element 1: (2, 2)
    expected = (_binary_entropy(0.25) + math.log(2)) / 2 / math.log(2)
    assert feature_disentanglement(S) == pytest.approx(expected, rel=1e-6)
    padded = torch.cat([S, torch.zeros(2, 1, 5)], dim=2)  # all-zero elements do not count
    assert feature_disentanglement(padded) == pytest.approx(expected, rel=1e-6)
    one_sided = torch.cat([S, torch.tensor([[0.0], [5.0]]).reshape(2, 1, 1)], dim=2)  # counts as entropy 0
    assert feature_disentanglement(one_sided) == pytest.approx(expected * 2 / 3, rel=1e-6)


def test_exact_at_tiny_scale_and_input_forms():
    S = torch.randn(3, 4, 5, 3, 3)
    ref = feature_disentanglement(S)
    assert feature_disentanglement(S * 1e-10) == pytest.approx(ref, rel=1e-6)
    assert feature_disentanglement(S * 1e-30) == pytest.approx(ref, rel=1e-6)
    assert feature_disentanglement(list(S)) == pytest.approx(ref, rel=1e-7)
    assert feature_disentanglement(S.double()) == pytest.approx(ref, rel=1e-5)
    rec = StepRecord(
        task_names=["a", "b", "c"],
        losses=torch.ones(3),
        objective_losses=torch.ones(3),
        level="loss",
        saliencies=S,
    )
    assert feature_disentanglement(rec) == pytest.approx(ref, rel=1e-7)
    rec.saliencies = None
    with pytest.raises(ConfigurationError, match="keep_saliencies=True"):
        feature_disentanglement(rec)
    with pytest.raises(ShapeError, match="share one shape"):
        feature_disentanglement([torch.randn(2, 3), torch.randn(2, 4)])


def test_temperature_option():
    S = torch.tensor([[1.0, 2.0], [3.0, 2.0]]).reshape(2, 1, 2)
    tau = 0.5
    mean_a = 2.0
    p = torch.softmax(torch.tensor([1.0, 3.0]) / (tau * mean_a), dim=0)
    h0 = float(-(p * p.log()).sum())
    expected = (h0 + math.log(2)) / 2 / math.log(2)
    assert feature_disentanglement(S, temperature=tau) == pytest.approx(expected, rel=1e-6)
    # scale-free (τ is relative to mean(a)), smooths toward uniform as τ grows, sharpens as τ → 0
    R = torch.randn(3, 2, 4, 3)
    assert feature_disentanglement(R * 1e-10, temperature=0.3) == pytest.approx(
        feature_disentanglement(R, temperature=0.3), rel=1e-5
    )
    assert feature_disentanglement(R, temperature=1e4) == pytest.approx(1.0, abs=1e-6)
    assert feature_disentanglement(R, temperature=1e-4) < 0.01
    assert feature_disentanglement(R, temperature=2.0) > feature_disentanglement(R)
    with pytest.raises(ConfigurationError, match="temperature"):
        feature_disentanglement(R, temperature=-1.0)


def test_edge_cases_single_task_and_all_zero():
    assert feature_disentanglement(torch.randn(1, 2, 3)) == 0.0
    assert math.isnan(feature_disentanglement(torch.zeros(3, 2, 4)))


def test_tsr_entropy_is_rep_mtl_value_and_differs_from_fd():
    S = torch.randn(3, 2, 4, 3, 3)
    assert tsr_entropy(S) == pytest.approx(float(tsr_loss(S)), rel=1e-7)
    assert tsr_entropy(S, normalize=True) == pytest.approx(float(tsr_loss(S)) / math.log(3), rel=1e-7)
    # task 0's channels cancel in the signed channel mean: TSR sees one task, FD sees two equal ones
    S = torch.tensor([[1.0, -1.0], [1.0, 1.0]]).reshape(2, 1, 2)
    assert tsr_entropy(S) == pytest.approx(0.0, abs=1e-7)
    assert feature_disentanglement(S) == pytest.approx(1.0, rel=1e-6)
    assert tsr_entropy(torch.randn(1, 2, 3), normalize=True) == 0.0
    with pytest.raises(ShapeError, match="at least 3"):
        tsr_entropy(torch.randn(2, 3))


# ---- hostile inputs (helper "breaker"): each test names the input that failed before its fix ----
def _fd_reference(S):
    """FD computed naively in float64 on the per-element max-scaled saliencies (no overflow)."""
    S = S.detach().double().reshape(S.shape[0], -1)
    a = S.abs()
    m = a.amax(dim=0)
    keep = m > 0
    p = a[:, keep] / m[keep]
    p = p / p.sum(dim=0)
    return float(-(torch.special.xlogy(p, p)).sum(dim=0).mean() / math.log(S.shape[0]))


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float64, 1e308)])
def test_fd_exact_for_saliencies_whose_task_sum_overflows(dtype, big):
    """Broke on S = 3e38 (float32) / 1e308 (float64) for every task: Σ_t |S_t| overflowed to inf,
    p = a/inf = 0, and FD read 0.0 ("perfectly disentangled") instead of 1.0."""
    S = torch.full((3, 2, 5), big, dtype=dtype)
    S[1, 0] = big / 7
    assert feature_disentanglement(S) == pytest.approx(_fd_reference(S), rel=1e-6)
    assert feature_disentanglement(torch.full((3, 10), big, dtype=dtype)) == pytest.approx(1.0, rel=1e-6)
    S[0, 0, 0] = float("nan")  # a non-finite input still gives NaN (not a rescaled guess)
    assert math.isnan(feature_disentanglement(S))


def test_fd_from_two_threads_with_changing_sizes_dtypes_and_layouts_matches_a_float64_reference():
    """Not a former failure: the per-thread scratch block, used from 2 threads at once, with sizes growing and
    shrinking between calls (1 to 3e5 columns, T = 2–5), float16/32/64 and non-contiguous inputs."""
    import threading

    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for k in range(12):
            T = int(torch.randint(2, 6, (1,), generator=g))
            n = int(torch.randint(1, 300_000 if k % 2 else 50, (1,), generator=g))
            dtype = (torch.float16, torch.float32, torch.float64)[k % 3]
            S = torch.randn(n, T, generator=g).to(dtype).t()  # non-contiguous (T, n)
            if k % 4 == 0:
                S = S[:, ::2]
            got, want = feature_disentanglement(S), _fd_reference(S)
            if not abs(got - want) <= 1e-5:
                errors.append((seed, k, T, n, dtype, got, want))

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _fd_softmax_reference(S, tau):
    """The smoothened FD in float64, logits ``(a − max_t a)/mean(a)/τ`` (float32 inputs are far inside its range)."""
    S = S.detach().double().reshape(S.shape[0], -1)
    a = S.abs()
    active = a.sum(dim=0) > 0
    p = torch.softmax((a - a.amax(dim=0)) / a.mean() / tau, dim=0)[:, active]
    return float(-(torch.special.xlogy(p, p)).sum(dim=0).mean() / math.log(S.shape[0]))


@pytest.mark.parametrize("tau", [1e-300, 1e-40, 1e-3, 1.0])
def test_fd_smoothened_in_float32_for_tiny_temperatures_and_subnormal_saliencies(tau):
    """Broke on float32 saliencies with temperature = 1e-40 (and 1e-300): τ·mean(a) underflowed to 0, FD was NaN
    (float64: 0.0); and on float32 saliencies of 1e-45 next to zeros (mean(a) underflowed: NaN at τ = 1)."""
    torch.manual_seed(0)
    S = torch.randn(3, 4, 100)
    S[:, 0, :5] = 0
    assert feature_disentanglement(S, tau) == pytest.approx(_fd_softmax_reference(S, tau), abs=1e-5)
    S = torch.zeros(3, 1000)
    S[0, 0], S[1, 0] = 1e-45, 2e-45  # both round to float32's smallest subnormal: equal
    assert feature_disentanglement(S, tau) == pytest.approx(_fd_softmax_reference(S, tau), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_zero_terms_and_non_finite_inputs_across_chunks(dtype):
    """Not a former failure: FD's ratio pass takes 0·log 0 as a skipped NaN (0/0 of an all-zero element, 0·(−inf) of
    a zero task) instead of clamping; over several column chunks, zeros, subnormal and huge-ratio entries match a
    float64 reference, and an inf or NaN saliency in any chunk still gives NaN."""
    g = torch.Generator().manual_seed(3)
    S = torch.randn(4, 400_000, generator=g).to(dtype)  # 4 chunks at T = 4
    S[:, ::7] = 0.0  # all-zero elements (left out of the mean)
    S[1, 1::5] = 0.0  # one task's zero next to others' saliencies (p = 0 terms)
    S[2, 3::11] = torch.finfo(dtype).tiny * torch.finfo(dtype).eps * 3  # subnormal saliencies
    S[0, 5::13] = 1e30  # ratios down to ~1e-30 in the other tasks
    assert feature_disentanglement(S) == pytest.approx(_fd_reference(S), rel=1e-5)
    for bad in (float("inf"), float("nan")):
        T = S.clone()
        T[3, 399_999] = bad
        assert math.isnan(feature_disentanglement(T))


def test_fd_scratch_blocks_are_reused_per_shape_and_bounded():
    """FD writes its temporaries into blocks kept per (shape, dtype, device) and thread: the same storage on the
    next call of that shape (no fresh memory per call), and at most _SCRATCH_SHAPES shapes kept."""
    from mtlens.diagnose import saliency as sal

    S = torch.randn(3, 4, 8)
    feature_disentanglement(S)
    a1, _ = sal._scratch(torch.Size((3, 32)), S.dtype, S.device)
    feature_disentanglement(torch.randn(3, 4, 8))
    a2, _ = sal._scratch(torch.Size((3, 32)), S.dtype, S.device)
    assert a1.data_ptr() == a2.data_ptr()
    for n in range(1, 10):
        feature_disentanglement(torch.randn(2, n))
    assert len(sal._scratch_local.blocks) <= sal._SCRATCH_SHAPES
    assert feature_disentanglement(torch.tensor([[1.0, 0.0], [0.0, 2.0]])) == 0.0  # values unaffected


def test_saliencies_of_returns_the_engine_block_itself_and_promotes_half_precision():
    from mtlens.diagnose._inputs import saliencies_of

    S = torch.randn(3, 2, 4)
    assert saliencies_of(S) is S
    H = S.half()
    out = saliencies_of(H)
    assert out.dtype == torch.float32 and torch.equal(out, H.float())
    G = torch.randn(3, 2, 4, requires_grad=True)
    assert not saliencies_of(G).requires_grad
