"""Rep-MTL's per-step cost against EW on the scaling study's synthetic workloads (small T).

Usage::

    python benchmarks/rep_mtl_cost.py                     # conv T = 2, 3, 5, 11; MLP T = 2, 3
    python benchmarks/rep_mtl_cost.py --steps 40 --loads conv:2,conv:3
    mkdir /tmp/ref_repmtl && git archive <rev> src/mtlens | tar -x -C /tmp/ref_repmtl
    mv /tmp/ref_repmtl/src/mtlens /tmp/ref_repmtl/src/mtlens_ref
    python benchmarks/rep_mtl_cost.py --reference /tmp/ref_repmtl/src   # adds `EW + Rep-MTL old`, same rounds

Rows (a full training step each: forward, ``mtl_backward``, gradients written): ``EW`` (loss level, no
regulariser), ``EW + Rep-MTL`` (``regularizers=[create("rep_mtl")]``, defaults), ``EW + ⟨R, S⟩ (floor)`` (a
linear saliency penalty: what any saliency regulariser pays before its own arithmetic) and, with ``--reference``,
the same step with another revision's engine and Rep-MTL, imported from ``DIR`` as ``mtlens_ref`` (its
package renamed; mtlens imports itself only relatively). Rows are timed step by step, alternating in a fresh
seeded order every round (fixed_cost.py's :func:`alternate`), so every ratio is the median over rounds of
same-round ratios; the clock is the thread's CPU time by default (``--clock wall`` for the wall clock).
``--profile`` also prints each row's operator counts per step (``torch.profiler``): what the step dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_cost import CLOCK, alternate, paired  # noqa: E402
from run_all import Workload  # noqa: E402  (the scaling study's synthetic workloads)

from mtlens.engine import Regularizer, mtl_backward  # noqa: E402
from mtlens.methods import create  # noqa: E402

BATCH = {"conv": 8, "mlp": 256}
LOADS = "conv:2,conv:3,conv:5,conv:11,mlp:2,mlp:3"


class LinearSaliencyPenalty(Regularizer):
    """``Σ ⟨R, S⟩`` for a fixed random ``R`` (scaled by 1e-3): the cheapest saliency penalty there is. A step with
    it pays what every saliency regulariser pays before its own arithmetic — the T heads' backwards with
    ``create_graph``, the heads' double backward, the engine's regulariser path — its ratio to EW is Rep-MTL's
    floor on the workload."""

    name = "linear_saliency"
    uses = "saliency"

    def __init__(self) -> None:
        self.R: Tensor | None = None

    def loss(self, grads, losses):  # noqa: ARG002  (the protocol's signature)
        S = grads[0]
        if self.R is None:
            self.R = torch.randn(S.shape, generator=torch.Generator().manual_seed(0), dtype=S.dtype) * 1e-3
        return (S * self.R).sum(), {}


def rows(w: Workload, reference=None) -> dict:
    """``EW``, ``EW + Rep-MTL``, ``EW + ⟨R, S⟩ (floor)`` (and ``EW + Rep-MTL old`` with
    ``reference = (mtl_backward, create)``)."""

    def step(backward, make, regs: bool | Regularizer):
        ew = make("ew")
        reg = [regs] if isinstance(regs, Regularizer) else [make("rep_mtl")] if regs else []

        def f():
            w.zero()
            z, losses = w.forward()
            backward(losses, features=z, shared_params=w.shared, method=ew, regularizers=reg)

        return f

    out = {"EW": step(mtl_backward, create, False), "EW + Rep-MTL": step(mtl_backward, create, True),
           "EW + ⟨R, S⟩ (floor)": step(mtl_backward, create, LinearSaliencyPenalty())}
    if reference is not None:
        out["EW + Rep-MTL old"] = step(reference[0], reference[1], True)
    return out


def op_counts(f, steps: int = 3) -> Counter:
    """Operators dispatched per call of ``f`` (``torch.profiler``, aten ops only), averaged over ``steps``."""
    from torch.profiler import ProfilerActivity, profile

    f()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            f()
    c: Counter = Counter()
    for e in p.key_averages():
        if e.key.startswith("aten::"):
            c[e.key] = e.count // steps
    return c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--loads", default=LOADS, help="kind:T,... (kind conv or mlp)")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    ap.add_argument("--reference", default=None, help="a folder holding another revision as package mtlens_ref")
    ap.add_argument("--profile", action="store_true", help="also print operator counts per step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = None
    if args.reference:
        sys.path.insert(0, args.reference)
        reference = (importlib.import_module("mtlens_ref.engine").mtl_backward,
                     importlib.import_module("mtlens_ref.methods").create)
    print(f"torch {torch.__version__}, 1 thread, {args.clock} clock, {args.steps} alternating steps per row; "
          "medians of same-round ratios")
    old = " Rep-MTL old ms | old / EW | new / old |" if reference else ""
    print(f"\n| workload | EW ms | Rep-MTL ms | Rep-MTL / EW (target ≤ 1.35) | floor / EW |{old}")
    print("|---|" + "---:|" * (4 + (3 if reference else 0)))
    counts = {}
    for load in args.loads.split(","):
        kind, T = load.split(":")
        w = Workload(kind, int(T), BATCH[kind])
        fs = rows(w, reference)
        ts = alternate(fs, args.steps, CLOCK[args.clock])
        med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
        line = f"| {kind}, T = {T} | {med['EW']:.2f} | {med['EW + Rep-MTL']:.2f} | " \
               f"{paired(ts, 'EW + Rep-MTL', 'EW')[0]:.2f} | {paired(ts, 'EW + ⟨R, S⟩ (floor)', 'EW')[0]:.2f} |"
        if reference:
            line += f" {med['EW + Rep-MTL old']:.2f} | {paired(ts, 'EW + Rep-MTL old', 'EW')[0]:.2f} | " \
                    f"{paired(ts, 'EW + Rep-MTL', 'EW + Rep-MTL old')[0]:.2f} |"
        print(line, flush=True)
        if args.profile:
            counts[load] = {k: op_counts(f) for k, f in fs.items()}
    for load, per_row in counts.items():
        print(f"\naten operators per step, {load}:")
        for k, c in per_row.items():
            top = ", ".join(f"{n.removeprefix('aten::')} {m}" for n, m in c.most_common(8))
            print(f"- {k}: {sum(c.values())} ({top})")


if __name__ == "__main__":
    main()
