"""A data-parallel differential harness: what every rank writes into ``.grad`` under ``distributed=`` against the
single-process step on the global batch.

Under data parallelism each rank passes the losses of its equal share of the global batch and every rank must write
the gradient of the whole global batch (docs/engine.md, "Data parallelism"). ``test_grad_parity.py``'s constructs
(sparse embeddings, complex and frozen parameters, unreached ones, tied weights, checkpointing, parametrizations,
custom Functions, hooks, ...) and ``_ddp_parity_worker.py``'s own (data-dependent reach, a non-finite gradient or
loss on one rank only, a task left out on one rank) run through every route — EW (the lean loss step in one
process), UW and DWA (loss weightings with state), MGDA at feature level, UPGrad at parameter level (Jacobian loop,
batched, without features, cached decisions), PCGrad, Rep-MTL, ``retain_graph``, ``nonfinite="skip"``, a
GradScaler, the log transform, GradNorm, accumulated micro-batches (``TaskGradients.accumulate``) and
``nn.parallel.DistributedDataParallel`` (its own ``loss.backward()``; the engine under ``no_sync()``) — in 2 gloo
processes spawned once for the module. Compared per parameter: ``.grad`` None-ness, dtype, layout (a sparse
gradient stays sparse, on the rows the global batch touched), shape and values (``torch.testing.assert_close``'s
defaults: the reductions add in another order); every rank must hold the same ``.grad`` bit for bit, the same method
state and the same ``skipped`` flags, and a data-parallel run must raise where (and what) the single-process run
raises, or refuse with the fix named where data parallelism cannot be exact (``REFUSED_DP``).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_parity_worker as W  # noqa: E402
import test_grad_parity as gp  # noqa: E402
from _spawn import free_port, spawn  # noqa: E402

KEYS = W.plan()
IDS = [f"{c}-{r}" for c, r in KEYS]
# bfloat16 keeps 8 bits of mantissa: the global batch's sums and the ranks' means round differently
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}
# bfloat16 parameters, or autocast's bfloat16 matmuls
BF16_CASES = {"bfloat16", "autocast_bf16", "channels_last_autocast", "compiled_ragged"}
STATE_TOL = {"rtol": 1e-5, "atol": 1e-6}

# mixed_dtypes: its float64 layer's gradient comes through float32 activations and losses (float32's rounding)
F32_TOL = {"rtol": 1.3e-6, "atol": 1e-5}
# Gradient methods decide through a solver (UPGrad's QP, MGDA's min-norm): a Gramian that differs in its last bits
# moves the weights by the solver's tolerance; under a GradScaler the compared gradients are ×1024, and so is the
# absolute tolerance: 1e-5 of an unscaled gradient (an element that nearly cancels, enc.1.weight of sparse_embedding
# under EW, was 3e-5 off in scaled units on an AVX-512 CPU, whose reductions add in another order than AVX2's)
SCALER_TOL = {"rtol": 1e-4, "atol": 1e-5 * 2**10}

# Refused under data parallelism by design, with the fix named: (case, route) -> the message's pattern. Asserted.
REFUSED_DP: dict[tuple[str, str], str] = {
    # the heads (or, at loss level, the parameters) found from each rank's own graph differ between the ranks: the
    # reduction would pair different parameters (gloo aborted the process: "Received data size doesn't match")
    (c, r): r"differ between ranks.*Pass task_params=\[every task-specific parameter\]"
    for c, r in KEYS if c == "routed_found" and r != "ddp-backward"
} | {
    # a rank left a task out (no labelled sample in its share): the ranks' loss vectors differ in length (gloo
    # aborted the process)
    (c, r): r"the ranks passed different tasks.*Every rank must pass every task's loss"
    for c, r in KEYS if c == "missing_task"
}

# Not divergences of data parallelism: the one-process reference is the known divergence of test_grad_parity
# (KNOWN there): its .grad IS the gradient a custom Function or a hook keeps, so its next accumulation writes into
# that kept tensor and changes every later step's gradient; the data-parallel step writes the reduced copy, as
# loss.backward() would. A strict xfail each: if the reference stops diverging, these must pass.
KEPT: dict[tuple[str, str], str] = {
    (c, r): "the one-process reference accumulates into a kept gradient (test_grad_parity's KNOWN)"
    for c in ("kept_function", "kept_hook") for r in ("ew-loss", "uw-loss", "mgda-feature")
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_parity")
    spawn(W.worker, (free_port(), str(out), KEYS), W.WORLD, [out / f"rank{r}.pt" for r in range(W.WORLD)])
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]
    ref = {k: v for r in res for k, v in r["ref"].items()}
    return ref, [r["dp"] for r in res]


def test_every_grad_parity_construct_is_covered():
    """A construct test_grad_parity adds runs here too, unless it is left out with its reason."""
    assert set(gp.CASES) - set(W.EXCLUDED) <= set(W.BUILDERS)


@pytest.mark.slow
@pytest.mark.parametrize("case,route", KEYS, ids=IDS)
def test_data_parallel_grads_equal_the_global_batch(runs, case, route, request):
    if (case, route) in KEPT:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KEPT[(case, route)]))
    ref_all, dps = runs
    key = f"{case}|{route}"
    assert_parity(ref_all[key], [d[key] for d in dps], case, route)


def assert_parity(ref: dict, got: list[dict], case: str, route: str) -> None:
    """The data-parallel runs ``got`` (one per rank) against the one-process run ``ref`` (see the module docstring)."""
    if (case, route) in REFUSED_DP:
        assert ref["error"] is None, ref["error"]
        for r, g in enumerate(got):
            assert g["error"] is not None and g["error"].startswith("ConfigurationError"), (r, g["error"])
            assert re.search(REFUSED_DP[(case, route)], g["error"]), (r, g["error"])
        return
    if ref["error"] is not None:  # refused in one process (by design: test_grad_parity's REFUSED): refused here too
        for r, g in enumerate(got):
            assert g["error"] is not None, f"rank {r} did not raise; the single process raised {ref['error']}"
            assert g["error"].split(":")[0] == ref["error"].split(":")[0], (r, g["error"], ref["error"])
        return
    for r, g in enumerate(got):
        assert g["error"] is None, f"rank {r} raised (one process did not):\n{g['trace']}"
    for r, g in enumerate(got):
        assert g["skipped"] == ref["skipped"], f"rank {r} skipped {g['skipped']}, one process {ref['skipped']}"
        assert set(g["grads"]) == set(ref["grads"]), r
        for name, want in ref["grads"].items():
            have = g["grads"][name]
            assert (have is None) == (want is None), (
                f"rank {r}: {name}.grad is {'None' if have is None else 'set'}, "
                f"one process: {'None' if want is None else 'set'}")
            if want is None:
                continue
            assert have.dtype == want.dtype, (r, name, have.dtype, want.dtype)
            assert have.layout == want.layout, (r, name, have.layout, want.layout)
            assert have.shape == want.shape, (r, name)
            if want.layout == torch.sparse_coo:  # the rows the global batch touched, a zero-gradient one included
                assert torch.equal(have.coalesce().indices(), want.coalesce().indices()), (r, name)
            tol = (BF16_TOL if case in BF16_CASES else SCALER_TOL if W.ROUTE_BY_ID[route].scaler
                   else F32_TOL if case == "mixed_dtypes" else {})
            torch.testing.assert_close(have.to_dense(), want.to_dense(), **tol,
                                       msg=lambda m, r=r, name=name: f"rank {r}, {name}: {m}")
        torch.testing.assert_close(torch.tensor(g["state"], dtype=torch.float64),
                                   torch.tensor(ref["state"], dtype=torch.float64), **STATE_TOL,
                                   msg=lambda m, r=r: f"rank {r}: method state: {m}")
    # every rank holds the same .grad, bit for bit, and the same method state
    first = got[0]
    for r, g in enumerate(got[1:], 1):
        assert g["state"] == first["state"], f"rank {r}: method state differs from rank 0's"
        for name, a in first["grads"].items():
            b = g["grads"][name]
            if a is None or b is None:
                assert a is b, name
                continue
            assert torch.equal(a.to_dense(), b.to_dense()), f"rank {r}: {name}.grad differs from rank 0's"


@pytest.mark.slow
def test_the_harness_sees_a_divergence(runs):
    """The comparison fails on a rank's .grad off by a factor, a .grad None where one process writes one, a sparse
    .grad written dense, ranks that differ, a step skipped on one rank only, and a rank that raised."""
    ref_all, dps = runs
    key, case, route = "routed|upgrad-param", "routed", "upgrad-param"
    ref = ref_all[key]
    assert_parity(ref, [d[key] for d in dps], case, route)  # as it is: passes
    name = "enc.b.weight"  # the expert only rank 1's share reaches

    def doctored(change) -> list[dict]:
        got = [copy.deepcopy(d[key]) for d in dps]
        change(got)
        return got

    def double(got):
        got[0]["grads"][name] = got[0]["grads"][name] * 2

    def unset(got):
        for g in got:
            g["grads"][name] = None

    def one_rank(got):
        got[1]["grads"][name] = got[1]["grads"][name] + 1e-3

    def skipped(got):
        got[1]["skipped"][-1] = True

    def raised(got):
        got[0]["error"], got[0]["trace"] = "RuntimeError: boom", "boom"

    for change in (double, unset, one_rank, skipped, raised):
        with pytest.raises(AssertionError):
            assert_parity(ref, doctored(change), case, route)
    skey = "sparse_embedding|ew-loss"
    dense = [copy.deepcopy(d[skey]) for d in dps]
    for g in dense:
        g["grads"]["enc.0.weight"] = g["grads"]["enc.0.weight"].to_dense()
    assert ref_all[skey]["grads"]["enc.0.weight"].layout == torch.sparse_coo
    with pytest.raises(AssertionError):
        assert_parity(ref_all[skey], dense, "sparse_embedding", "ew-loss")
    assert any(any(ref_all[k]["skipped"]) for k in ref_all if "skip" in k)


@pytest.mark.parametrize("backend,cuda,want", [
    ("gloo", True, "cpu"), ("cpu:gloo,cuda:nccl", True, "cpu"), ("mpi", True, "cpu"),
    ("nccl", True, "cuda:0"), ("nccl", False, "cpu"),
])
def test_the_engines_own_small_tensors_go_where_the_backend_takes_them(monkeypatch, backend, cuda, want):
    """The flags, checksums and masks the engine all-reduces itself: NCCL takes CUDA tensors only (a CPU tensor
    raises "No backend type associated with device type cpu"), gloo CPU ones."""
    from mtlens.engine.distributed import collective_device

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device(None) == torch.device(want)
