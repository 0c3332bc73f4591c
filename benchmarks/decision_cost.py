"""The decision step of every Gramian weighting: ``method.weights(G, losses)`` against the number of tasks.

Usage::

    python benchmarks/decision_cost.py                          # every GramianWeighting, T = 2, 3, 5, 11, 20, 40
    python benchmarks/decision_cost.py --tasks 5,40 --methods pcgrad,gradvac --rounds 50
    mkdir /tmp/ref && git archive <rev> src/mtlens | tar -x -C /tmp/ref
    mv /tmp/ref/src/mtlens /tmp/ref/src/mtlens_ref
    python benchmarks/decision_cost.py --reference /tmp/ref/src  # the same decisions of revision <rev>, same rounds

What is timed: one call of ``weights`` on a fixed T×T float64 Gramian with conflicts, the hot loop of a training
step (each method object is called again and again, so stateful methods — GradVac's targets, IMTL's scales,
the generators of PCGrad / GradVac / RGW — carry their state over from call to call, as in training). The Gramian
is that of ``J = 0.6·b + N(0, 1)`` (T × 4096, one shared direction ``b``) with the first T // 3 rows scaled by
−0.3 (``torch.manual_seed(0)``), the losses ``U(0.5, 1.5)``. Every registered
:class:`~mtlens.engine.protocols.GramianWeighting` is measured with its default hyper-parameters (``seed=0``
where it has one), except those whose default object cannot make a decision from a Gramian and losses alone
(listed as skipped, with the error); warnings of the first call are listed under the tables (PIVRG: without
``on_task_scores`` calls it decides at equal priorities, which is what is timed).

Against what: ``Gramian`` is :func:`mtlens.engine.gramian.gramian_from_blocks` of a float32 (T, 57 000) block
(``--columns``; the conv workload's parameter count), the product a step computes before deciding; ``decision /
Gramian`` tells how much a decision adds to it. With ``--reference DIR`` the same methods of another revision,
imported from ``DIR`` as package ``mtlens_ref`` (its ``mtlens`` folder renamed; mtlens imports itself only
relatively), are timed in the same rounds: ``decision / reference`` is the before/after ratio.

How: per T, all rows (every method, its reference, the Gramian) are called in turn, one call each, in a fresh
seeded random order every round (``fixed_cost.alternate``), after a warm-up; the tables give medians over the
rounds of the times and of the same-round ratios, so slow drift of a shared machine cancels. The clock is the
thread's CPU time by default (``--clock cpu``; torch and numpy run one thread here), which leaves out the time
other processes hold the core; ``--clock wall`` for the wall clock.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy's BLAS: one thread, as torch below
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_cost import CLOCK, alternate  # noqa: E402  (the house way to time rows against each other)

from mtlens.engine.gramian import gramian_from_blocks  # noqa: E402
from mtlens.engine.protocols import GramianWeighting  # noqa: E402
from mtlens.methods import available, get  # noqa: E402

TASKS = (2, 3, 5, 11, 20, 40)
COLUMNS = 57_000


def problem(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gramian (T, T) float64 with conflicts and the losses (T,) float64 every decision is timed on."""
    torch.manual_seed(0)
    base = torch.randn(1, 4096)
    J = 0.6 * base + torch.randn(T, 4096)
    J[: T // 3] *= -0.3
    return (J @ J.T).double(), torch.rand(T).double() + 0.5


def build(package: str, names: list[str]) -> tuple[dict[str, Callable[..., object]], dict[str, str], dict[str, str]]:
    """``(factories, skipped, notes)`` for the GramianWeightings of ``package`` (``mtlens`` or ``mtlens_ref``).

    A factory makes a fresh method object with its defaults (``seed=0`` where the constructor takes a seed).
    A method is skipped, with the error, when that object's first decision on a T = 3 problem raises;
    ``notes`` holds the warnings of that first call.
    """
    methods = importlib.import_module(f"{package}.methods")
    base = importlib.import_module(f"{package}.engine.protocols").GramianWeighting
    factories: dict[str, Callable[..., object]] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    G, losses = problem(3)
    for name in names:
        if name not in methods.available():
            continue
        cls = methods.get(name)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            continue
        kwargs = {"seed": 0} if "seed" in inspect.signature(cls.__init__).parameters else {}

        def factory(name: str = name, kwargs: dict = kwargs) -> object:
            return methods.create(name, **kwargs)

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                factory().weights(G, losses)
        except Exception as e:  # a method that needs more than a Gramian: listed, never timed
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        if caught:
            notes[name] = "; ".join(sorted({_first_sentence(str(w.message)) for w in caught}))
        factories[name] = factory
    return factories, skipped, notes


def _first_sentence(message: str) -> str:
    return message.split(": ", 1)[-1].split(":")[0][:160]


def rows_for(T: int, new: dict, ref: dict, columns: int) -> dict[str, Callable[[], object]]:
    """One callable per row at T tasks: every method (``name``), its reference (``name@ref``), the Gramian."""
    G, losses = problem(T)
    block = torch.randn(T, columns, generator=torch.Generator().manual_seed(1))
    rows: dict[str, Callable[[], object]] = {"Gramian": lambda: gramian_from_blocks([block])}
    for suffix, factories in (("", new), ("@ref", ref)):
        for name, factory in factories.items():
            m = factory()
            rows[name + suffix] = lambda m=m: m.weights(G, losses)
    return rows


def ratio(ts: dict[str, list[float]], a: str, b: str) -> float:
    """Median of the same-round ratios of rows ``a`` and ``b``."""
    return statistics.median(x / y for x, y in zip(ts[a], ts[b]))


def table(title: str, names: list[str], tasks: list[int], cell: Callable[[str, int], str]) -> None:
    print(f"\n{title}\n")
    print("| method | " + " | ".join(f"T = {T}" for T in tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for name in names:
        print(f"| {name} | " + " | ".join(cell(name, T) for T in tasks) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(map(str, TASKS)))
    ap.add_argument("--methods", default="", help="comma-separated names (default: every GramianWeighting)")
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per row and T (after 3 warm-up rounds)")
    ap.add_argument("--columns", type=int, default=COLUMNS, help="columns of the float32 block of the Gramian row")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu", help="thread CPU time (default) or wall clock")
    ap.add_argument("--reference", default=None, help="a folder holding another revision as package mtlens_ref")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tasks = [int(t) for t in args.tasks.split(",")]
    wanted = [n.strip() for n in args.methods.split(",") if n.strip()] or [
        n for n in available() if issubclass(get(n), GramianWeighting)
    ]
    unknown = sorted(set(wanted) - set(available()))
    if unknown:
        raise SystemExit(f"decision_cost: unknown methods {unknown}; registered: {available()}")
    new, skipped, notes = build("mtlens", wanted)
    ref: dict = {}
    if args.reference:
        sys.path.insert(0, args.reference)
        ref, _, _ = build("mtlens_ref", list(new))
    print(
        f"torch {torch.__version__}, 1 thread, {args.clock} clock, {args.rounds} rounds per T (rows alternating in "
        f"a fresh order each round), Gramian of a float32 (T, {args.columns}) block"
        + (f", reference {args.reference}" if args.reference else "")
    )
    times: dict[int, dict[str, list[float]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # listed once below from the first call of each method
        for T in tasks:
            times[T] = alternate(rows_for(T, new, ref, args.columns), args.rounds, CLOCK[args.clock])
    last = tasks[-1]
    names = sorted(new, key=lambda n: -statistics.median(times[last][n]))

    def ms(row: str) -> Callable[[str, int], str]:
        return lambda name, T: (f"{statistics.median(times[T][name + row]) * 1e3:.3f}"
                                if name + row in times[T] else "—")

    table("Decision time, ms (median)", [*names, "Gramian"], tasks, ms(""))
    if ref:
        table("Reference decision time, ms (median)", names, tasks, ms("@ref"))
        table("decision / reference (median of same-round ratios)", names, tasks,
              lambda n, T: f"{ratio(times[T], n, n + '@ref'):.2f}" if n in ref else "—")
    table("decision / Gramian (median of same-round ratios)", names, tasks,
          lambda n, T: f"{ratio(times[T], n, 'Gramian'):.3f}")
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")
    for name, what in notes.items():
        print(f"\n{name} warns on its first call: {what}")


if __name__ == "__main__":
    main()
