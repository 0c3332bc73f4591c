"""The parameter-level Gramian inside a training step: ``gramian_from_matrix`` of the engine's ``(T, P)`` workspace.

Usage::

    python benchmarks/gramian_cost.py                          # conv and MLP at T = 2, 3, 5, 11, 20, 40
    python benchmarks/gramian_cost.py --kinds conv --tasks 3 --steps 200
    mkdir /tmp/ref && git archive <rev> src/mtlens | tar -x -C /tmp/ref
    mv /tmp/ref/src/mtlens /tmp/ref/src/mtlens_ref
    python benchmarks/gramian_cost.py --reference /tmp/ref/src  # revision <rev>'s Gramian in the same steps

Each step runs the scaling study's workload (``run_all.Workload``: a forward, then the per-task Jacobian by T
backwards, each task's row written into the ``(T, P)`` matrix :func:`mtlens.engine.gramian.jacobian_workspace`
returns, as the engine's parameter-level step writes it), then times one call of one row on that matrix — right
after the backwards, where the interpreter's code and the op dispatcher's are cold, which is where the Gramian runs
in training (a tight loop of Gramians measures ≈ half of it: docs/performance.md, "The Gramian inside a step").
Rows, in a fresh seeded order every step:

* ``Gramian``: :func:`mtlens.engine.gramian.gramian_from_matrix` (float64, exactly symmetric, float32 products on
  column chunks of at most ``CHUNK``, summed in float64);
* ``reference`` (with ``--reference DIR``): the same function of another revision, imported from ``DIR`` as
  ``mtlens_ref`` (its package renamed; mtlens imports itself only relatively), on its own workspace;
* ``mm``: ``torch.mm(J, J.T)`` in float32, one product over all P columns — outside the precision contract (its
  error grows with √P), the one-op floor.

``Jacobian`` is the T backwards and row writes of the same steps (the issue's floor for parameter-level
methods); ``Gramian / Jacobian`` the median of the per-step ratios. The clock is the compute thread's CPU time
(``--clock cpu``, torch runs one thread) or the wall clock. ``error`` is the largest ``|G − G64| / (‖g_s‖‖g_t‖)``
of each row against the float64 product of the same matrix.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import Workload  # noqa: E402  (the scaling study's synthetic workloads)

from mtlens.engine import gramian as gram  # noqa: E402
from mtlens.engine._autograd import vjp  # noqa: E402
from mtlens.engine.gradients import _write_row  # noqa: E402

BATCH = {"conv": 8, "mlp": 256}
CLOCK = {"cpu": time.thread_time, "wall": time.perf_counter}


def fill(w: Workload, J: Tensor) -> None:
    """A forward, then every task's shared-parameter gradient into row ``t`` of ``J`` (the engine's row writer)."""
    _, losses = w.forward()
    for t, L in enumerate(losses.values()):
        _write_row(J, t, vjp(L, w.shared, retain_graph=t < w.T - 1), w.shared)


def error(G: Tensor, J: Tensor) -> float:
    """Largest ``|G − G64|`` over ``‖g_s‖‖g_t‖`` (the precision contract's scale) against float64 ``J Jᵀ``."""
    J64 = J.double()
    ref = J64 @ J64.T
    d = ref.diagonal().sqrt()
    return float(((G.double() - ref).abs() / (d[:, None] * d[None, :])).max())


def measure(kind: str, T: int, steps: int, clock: Callable[[], float], ref=None, seed: int = 0) -> dict:
    """Per row: seconds per call (one call per step, after 3 warm-up steps), the Jacobian's seconds in the same
    steps, and the row's error on the last step's matrix."""
    torch.manual_seed(seed)
    w = Workload(kind, T, BATCH[kind])
    J = gram.jacobian_workspace(T, w.shared)  # held for the whole run: one buffer, written every step
    assert J is not None
    rows: dict[str, tuple[Tensor, Callable[[Tensor], Tensor]]] = {
        "Gramian": (J, gram.gramian_from_matrix),
        "mm": (J, lambda m: torch.mm(m, m.T)),
    }
    if ref is not None:
        J_ref = ref.jacobian_workspace(T, w.shared)
        rows["reference"] = (J_ref, ref.gramian_from_matrix)
    times: dict[str, list[float]] = {k: [] for k in rows}
    jac: dict[str, list[float]] = {k: [] for k in rows}
    rng = random.Random(seed)
    for step in range(steps + 3):
        for name in rng.sample(list(rows), len(rows)):
            m, f = rows[name]
            w.zero()
            t0 = clock()
            fill(w, m)
            t1 = clock()
            f(m)
            t2 = clock()
            if step >= 3:
                jac[name].append(t1 - t0)
                times[name].append(t2 - t1)
    out = {
        "P": float(J.shape[1]),
        "Jacobian": statistics.median(x for v in jac.values() for x in v),
        "Gramian / Jacobian": statistics.median(g / j for g, j in zip(times["Gramian"], jac["Gramian"])),
    }
    for name, (m, f) in rows.items():
        out[name] = statistics.median(times[name])
        out[f"error {name}"] = error(f(m), m)
    if ref is not None:
        out["reference / Gramian"] = statistics.median(r / g for r, g in zip(times["reference"], times["Gramian"]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--tasks", default="2,3,5,11,20,40")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per row and point (after 3 warm-up steps)")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu", help="thread CPU time (default) or wall clock")
    ap.add_argument("--reference", default=None, help="a folder holding another revision as package mtlens_ref")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = None
    if args.reference:
        sys.path.insert(0, args.reference)
        ref = importlib.import_module("mtlens_ref.engine.gramian")
    kinds, tasks = args.kinds.split(","), [int(t) for t in args.tasks.split(",")]
    print(
        f"torch {torch.__version__}, 1 thread, {args.clock} clock, {args.steps} steps per point (rows in a fresh "
        f"order every step, each timed right after its own Jacobian), CHUNK = {gram.CHUNK}"
        + (f", reference {args.reference}" if ref else "")
        + "\n"
    )
    head = "| workload | T | P | Jacobian, ms | Gramian, µs | Gramian / Jacobian | mm (float32, no contract), µs |"
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if ref:
        head += " reference, µs | reference / Gramian |"
        sep += "---:|---:|"
    print(head + " error Gramian | error mm |")
    print(sep + "---:|---:|")
    for kind in kinds:
        for T in tasks:
            r = measure(kind, T, args.steps, CLOCK[args.clock], ref)
            line = (
                f"| {kind} | {T} | {r['P']:.0f} | {r['Jacobian'] * 1e3:.2f} | {r['Gramian'] * 1e6:.0f} | "
                f"{r['Gramian / Jacobian'] * 100:.1f} % | {r['mm'] * 1e6:.0f} |"
            )
            if ref:
                line += f" {r['reference'] * 1e6:.0f} | {r['reference / Gramian']:.2f} |"
            print(line + f" {r['error Gramian']:.1e} | {r['error mm']:.1e} |")


if __name__ == "__main__":
    main()
