"""The engine's fixed per-step cost (EW / UW against a plain loop) and the FD monitor's cost.

Usage::

    python benchmarks/fixed_cost.py            # conv and MLP at T = 3, 11, 40; FD at T = 3, 11
    python benchmarks/fixed_cost.py --steps 40 --kinds conv --tasks 11
    python benchmarks/fixed_cost.py --parts --kinds conv,mlp --tasks 3,11   # EW's fixed cost, part by part
    python benchmarks/fixed_cost.py --lines --kinds conv,mlp --tasks 2      # ... statement by statement
    python benchmarks/fixed_cost.py --fd-tasks 3,11 --fd-fused inductor      # FD also as one compiled function
    mkdir /tmp/ref && git archive <rev> src/mtlens | tar -x -C /tmp/ref
    mv /tmp/ref/src/mtlens /tmp/ref/src/mtlens_ref
    python benchmarks/fixed_cost.py --reference /tmp/ref/src --kinds conv,mlp --tasks 11,20 --fd-tasks ""

Rows are timed step by step, alternating (plain, floor, EW, UW, ... in a fresh seeded order every
round), so every ratio is the median over steps of the same round: slow drift of a shared machine cancels, per-step
jitter does not (see docs/performance.md, "EW against a plain loop" and "Monitoring"). The
clock is the compute thread's CPU time by default (``--clock cpu``; torch runs one thread), which
leaves out the time other processes hold the core — on a shared machine the wall clock
(``--clock wall``) moves by 2× between rounds.

* ``EW / plain``: a full step (forward + backward) of ``mtl_backward`` with EW at loss level
  against ``sum(losses).backward()``; ``EW − plain`` the median paired difference in ms.
  ``EW / floor``: against ``run_all.py``'s ``plain + finiteness check (EW floor)`` (the same backward
  through ``torch.autograd.grad``, one exact finiteness check, ``.grad`` assigned), the engine's own
  cost; ``floor / plain`` what the guarantee costs.
* ``contract / plain``: the contract floor (:func:`contract_floor_step`): the EW floor plus what any step handed
  only the losses must do to keep the engine's promise — the losses as one tensor (checked with the gradients) and
  the walk that finds the leaves and verifies that a refusal can undo the write; ``EW / contract`` is what the
  engine's options, validation and record cost (docs/performance.md, "The contract floor").
* ``--reference DIR``: also EW with another revision's engine, imported from ``DIR`` as ``mtlens_ref``
  (its package renamed; mtlens imports itself only relatively), in the same rounds: ``EW / EW ref``.
* ``--parts``: the EW step's own work timed part by part inside the training loop (each engine
  function the loss-level step calls wrapped by a timer, ≈ 1 µs per wrapper), against a plain
  loop's ``backward()`` in the same round: what each remaining microsecond buys.
* ``--lines``: the lean loss step (EW) statement by statement inside the training loop (:func:`ew_lines`).
* ``FD / MGDA step``: :func:`mtlens.diagnose.feature_disentanglement` on a feature-level MGDA
  step's record, against that step; ``monitored / MGDA`` the step with a ``SaliencyMonitor(("fd",))``
  call against the step without; ``logs / MGDA`` the floor: ``torch.log`` of T·|Z| numbers; with
  ``--fd-fused BACKEND`` also FD's arithmetic as one ``torch.compile``'d function (:func:`fused_fd`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import random
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import Workload, ew_floor_step  # noqa: E402  (the scaling study's synthetic workloads)

from mtlens.diagnose import SaliencyMonitor, feature_disentanglement  # noqa: E402
from mtlens.engine import mtl_backward  # noqa: E402
from mtlens.engine._autograd import backward_into_grad  # noqa: E402
from mtlens.engine.gradients import all_finite  # noqa: E402
from mtlens.engine.graph import objective_leaves_direct  # noqa: E402
from mtlens.methods import create  # noqa: E402

BATCH = {"conv": 8, "mlp": 256}


CLOCK = {"cpu": time.thread_time, "wall": time.perf_counter}


def alternate(rows: dict, steps: int, clock=time.thread_time, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of every row, the rows called in turn ``steps`` times (after a warm-up), in a fresh
    seeded random order every round (no row always follows the same one)."""
    out: dict[str, list[float]] = {k: [] for k in rows}
    order, rng = list(rows), random.Random(0)
    for i in range(warmup + steps):
        rng.shuffle(order)
        for k in order:
            f = rows[k]
            t0 = clock()
            f()
            dt = clock() - t0
            if i >= warmup:
                out[k].append(dt)
    return out


def paired(ts: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    """Median ratio and median difference (ms) of adjacent calls of rows ``a`` and ``b``."""
    return (
        statistics.median(x / y for x, y in zip(ts[a], ts[b])),
        statistics.median(x - y for x, y in zip(ts[a], ts[b])) * 1e3,
    )


def contract_floor_step(w: Workload) -> None:
    """EW's floor for a step that is handed only the losses, as ``mtl_backward`` is (row ``contract``): the EW floor
    (``backward()`` writing ``.grad``, one exact finiteness check, reset on refusal) plus what any such step must do
    to keep the engine's promise — the losses as one tensor (the record's losses, checked with the gradients: a
    non-finite loss is refused even where its gradients are finite), and the walk of the objective's graph that
    finds the leaves it reaches and verifies that a refusal can undo the write (every ``.grad`` ``None``, no hook,
    no custom ``autograd.Function``): the engine's own functions, with none of its options, validation or record."""
    w.zero()
    _, losses = w.forward()
    stacked = torch.stack(list(losses.values()))
    objective = stacked.sum()
    leaves, direct, owned = objective_leaves_direct(objective)
    if not direct:
        raise RuntimeError("the contract floor needs every .grad None and no hook (the benchmark's own set-up)")
    backward_into_grad(objective)
    if not all_finite([*(p.grad for p in leaves), stacked.detach()], owned):
        for p in leaves:
            p.grad = None
        raise FloatingPointError("non-finite gradient")


def engine_rows(w: Workload, reference=None) -> dict:
    """plain, EW floor, the contract floor, EW, UW (and ``EW ref`` with ``reference = (mtl_backward, create)`` of
    another revision)."""
    ew, uw = create("ew"), create("uw", num_tasks=w.T)

    def plain():
        w.zero()
        _, losses = w.forward()
        sum(losses.values()).backward()

    def floor():  # run_all.py's `plain + finiteness check (EW floor)`
        ew_floor_step(w)

    def step(m, backward=mtl_backward):
        def f():
            w.zero()
            z, losses = w.forward()
            backward(losses, features=z, shared_params=w.shared, method=m)

        return f

    rows = {"plain": plain, "floor": floor, "contract": lambda: contract_floor_step(w), "EW": step(ew), "UW": step(uw)}
    if reference is not None:
        rows["EW ref"] = step(reference[1]("ew"), reference[0])
    return rows


def _fd_terms(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FD's arithmetic on a ``(T, n)`` saliency block as one function for ``torch.compile`` (``--fd-fused``):
    ``Σ_j Σ_t p log p`` with ``p = |S_t[j]| / Σ_t |S_t[j]|`` and ``0 log 0 = 0``, and the active count (``Σ_t > 0``).
    FD is ``−total / (count · log T)``, as :func:`mtlens.diagnose.feature_disentanglement` (ratio form)."""
    a = S.abs()
    s = a.sum(dim=0)
    p = a / s
    total = torch.where(p > 0, p * torch.log(p), 0.0).sum()
    return total, (s > 0).sum()


def fused_fd(backend: str = "inductor"):
    """``_fd_terms`` compiled (one fused loop with inductor, which needs a C++ compiler at run time), returning FD."""
    import math

    terms = torch.compile(_fd_terms, backend=backend, dynamic=False)

    def fd(S: torch.Tensor) -> float:
        total, count = terms(S)
        return -float(total) / (int(count) * math.log(S.shape[0]))

    return fd


def monitor_rows(w: Workload, fused=None) -> dict:
    """The MGDA feature step, with and without the FD monitor, FD alone on its record and its logarithms (the floor);
    with ``fused`` (``fused_fd()``), also FD's arithmetic as one compiled kernel on the same saliencies."""
    mgda, mon = create("mgda"), SaliencyMonitor(metrics=("fd",))

    def step():
        w.zero()
        z, losses = w.forward()
        return mtl_backward(losses, features=z, shared_params=w.shared, method=mgda, level="feature")

    rec = step()
    a = rec.saliencies.abs()  # the floor: one logarithm per element of the (T, *Z) block
    out = torch.empty_like(a)
    rows = {
        "MGDA feature": step,
        "MGDA feature + monitor(FD)": lambda: mon(step(), 0),
        "FD alone": lambda: feature_disentanglement(rec),
        "logs alone": lambda: torch.log(a, out=out),
    }
    if fused is not None:
        block = rec.saliencies.reshape(w.T, -1)
        got, want = fused(block), feature_disentanglement(rec)
        if abs(got - want) > 1e-5 * max(1.0, abs(want)):
            raise SystemExit(f"the compiled FD gave {got}, the library's {want}: not the same measure")
        rows["FD fused (compiled)"] = lambda: fused(block)
    return rows


def ew_parts(w: Workload, steps: int, clock) -> dict[str, list[float]]:
    """Seconds per step of each part of the EW step (``mtl_backward`` at loss level), timed in place: the
    functions ``mtlens.engine.backward`` calls are wrapped by timers for the duration of the measurement.
    Plain steps alternate with EW steps, so both see the same machine."""
    import mtlens.engine.backward as B

    ew = create("ew")
    out: dict[str, list[float]] = {}
    acc: dict[str, float] = {}
    wrapped = {  # module attribute -> what it does in the step
        "_loss_step": "",
        "_lean_losses": "validate the losses (names, scalars, graphs)",
        "StepRecord": "the record",
        "objective_leaves": "graph walk: the leaves to write",
        "objective_leaves_direct": "graph walk: the leaves to write",
        "all_finite": "finiteness of losses, weights and every gradient (one fused read)",
        "_accumulate": "write .grad",
        "vjp": "",  # the backward itself (engine/_autograd.vjp, or backward_into_grad when it writes .grad itself),
        "backward_into_grad": "",  # reported against the plain loop's below
    }
    backward_parts = ("vjp", "backward_into_grad")
    originals = {name: getattr(B, name) for name in wrapped}
    steps_seen: list[tuple[dict[str, float], float, float]] = []

    def timer(name, f):
        def g(*a, **k):
            t0 = clock()
            r = f(*a, **k)
            acc[name] = acc.get(name, 0.0) + clock() - t0
            return r
        return g

    for name, f in originals.items():  # installed once: plain steps call none of them
        setattr(B, name, timer(name, f))
    try:
        for i in range(3 + steps):
            w.zero()
            _, losses = w.forward()
            t0 = clock()
            sum(losses.values()).backward()
            plain = clock() - t0
            w.zero()
            z, losses = w.forward()
            acc.clear()
            t0 = clock()
            mtl_backward(losses, features=z, shared_params=w.shared, method=ew)
            total = clock() - t0
            if i >= 3:
                steps_seen.append((acc.copy(), plain, total))
    finally:
        for name, f in originals.items():
            setattr(B, name, f)
    for acc, plain, total in steps_seen:
        step = acc.pop("_loss_step")
        parts = {"mtl_backward's option checks (the lean path's conditions)": total - step}
        for k, v in acc.items():
            if k not in backward_parts:
                parts[wrapped[k]] = parts.get(wrapped[k], 0.0) + v
        parts["the backward (engine/_autograd.vjp or backward_into_grad) − the plain loop's sum(losses).backward()"] = \
            sum(acc.get(k, 0.0) for k in backward_parts) - plain
        parts["the rest: stack, EW's combine, weights, snapshot, record fields, features"] = step - sum(acc.values())
        parts["EW − plain (the mtl_backward call − sum(losses).backward())"] = total - plain
        for k, v in parts.items():
            out.setdefault(k, []).append(v)
    return out


def ew_lines(w: Workload, steps: int) -> list[tuple[int, str, float]]:
    """Microseconds per step of every statement of the lean loss step (``mtlens.engine.backward._loss_step``, EW at
    loss level), timed in place: a copy of its source with a wall-clock checkpoint (``time.perf_counter_ns``, ≈ 0.1 µs;
    the thread CPU clock is a system call) before each statement, run in the training loop on fresh losses. A
    statement's time runs to the next checkpoint reached, so a compound statement's line holds its condition and
    whatever runs before its body's first statement. Returns ``(line, source text, median µs)`` per line reached on
    at least half of the steps, in source order; line ``0`` is ``mtl_backward`` up to the step's first statement (its
    option checks and the call), and the step's last line runs until ``mtl_backward`` has returned."""
    import mtlens.engine.backward as B

    src = textwrap.dedent(inspect.getsource(B._loss_step))
    lines = src.split("\n")
    fn = ast.parse(src).body[0]
    doc = fn.body[0] if isinstance(fn.body[0], ast.Expr) else None  # the docstring stays one
    starts = sorted({n.lineno for n in ast.walk(fn) if isinstance(n, ast.stmt) and n is not fn and n is not doc
                     and lines[n.lineno - 1][:n.col_offset].strip() == ""  # statements that begin their line
                     and not lines[n.lineno - 1].lstrip().startswith("elif ")})  # (an elif is an If in the AST)
    out: list[str] = []
    for i, text in enumerate(lines, 1):
        if i in starts:
            out.append(" " * (len(text) - len(text.lstrip())) + f"_checkpoint({i})")
        out.append(text)
    acc: dict[int, list[float]] = {}
    last = [0, 0]  # (time, line) of the last checkpoint

    def _checkpoint(i: int) -> None:
        t = time.perf_counter_ns()
        acc.setdefault(last[1], []).append((t - last[0]) / 1e3)
        last[0], last[1] = t, i

    namespace = dict(vars(B), _checkpoint=_checkpoint)
    exec(compile("\n".join(out), B.__file__, "exec"), namespace)  # noqa: S102  (the step's own source)
    original, ew = B._loss_step, create("ew")
    B._loss_step = namespace["_loss_step"]  # mtl_backward calls it by its module name
    try:
        for i in range(3 + steps):
            w.zero()
            z, losses = w.forward()
            if i == 3:
                acc.clear()
            last[:] = [time.perf_counter_ns(), 0]
            mtl_backward(losses, features=z, shared_params=w.shared, method=ew)
            _checkpoint(0)  # back in the caller: mtl_backward's return
    finally:
        B._loss_step = original
    return [(i, lines[i - 1].strip() if i else "(mtl_backward: its option checks and the call)",
             statistics.median(v)) for i, v in sorted(acc.items()) if len(v) * 2 >= steps]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--tasks", default="3,11,40")
    ap.add_argument("--fd-tasks", default="3,11")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu", help="thread CPU time (default) or wall clock")
    ap.add_argument("--parts", action="store_true", help="time EW's fixed cost part by part instead")
    ap.add_argument("--fd-fused", default=None, metavar="BACKEND",
                    help="also time FD's arithmetic as one torch.compile'd function (inductor needs a C++ compiler)")
    ap.add_argument("--lines", action="store_true",
                    help="time the lean loss step (EW) statement by statement instead (wall clock)")
    ap.add_argument("--reference", default=None, help="a folder holding another revision as package mtlens_ref")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    clock = CLOCK[args.clock]
    print(
        f"torch {torch.__version__}, 1 thread, {args.clock} clock, {args.steps} alternating steps per row; "
        "medians of same-round ratios"
    )
    if args.parts:
        kinds = args.kinds.split(",")
        tasks = [int(t) for t in args.tasks.split(",")]
        cols = [(k, T) for k in kinds for T in tasks]
        res = {c: ew_parts(Workload(c[0], c[1], BATCH[c[0]]), args.steps, clock) for c in cols}
        print("\n| part (µs per step, medians) | " + " | ".join(f"{k}, T = {T}" for k, T in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for part in res[cols[0]]:
            print(f"| {part} | " + " | ".join(f"{statistics.median(res[c][part]) * 1e6:.0f}" for c in cols) + " |")
        return
    if args.lines:
        for kind in args.kinds.split(","):
            for T in (int(t) for t in args.tasks.split(",")):
                rows = ew_lines(Workload(kind, T, BATCH[kind]), args.steps)
                print(f"\n{kind}, T = {T}: the lean loss step statement by statement (µs per step, medians)\n")
                print("| line | statement | µs |\n|---:|---|---:|")
                for i, text, us in rows:
                    cell = text[:80].replace("|", "\\|")  # a pipe inside a code span still splits a Markdown cell
                    print(f"| {i} | `{cell}` | {us:.1f} |")
                print(f"| | sum of the medians | {sum(us for _, _, us in rows):.1f} |")
        return
    reference = None
    if args.reference:
        sys.path.insert(0, args.reference)
        reference = (importlib.import_module("mtlens_ref.engine").mtl_backward,
                     importlib.import_module("mtlens_ref.methods").create)
    ref_cols = " EW / EW ref | EW − EW ref ms |" if reference else ""
    print("\n| workload | plain ms | EW ms | EW / plain | EW − plain ms | floor / plain | EW / floor | EW − floor ms "
          f"| contract / plain | EW / contract | EW − contract ms | UW / plain | UW − plain ms |{ref_cols}")
    print("|---|" + "---:|" * (12 + (2 if reference else 0)))
    for kind in args.kinds.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            ts = alternate(engine_rows(Workload(kind, T, BATCH[kind]), reference), args.steps, clock)
            (r_ew, d_ew), (r_uw, d_uw) = paired(ts, "EW", "plain"), paired(ts, "UW", "plain")
            (r_fl, _), (r_ef, d_ef) = paired(ts, "floor", "plain"), paired(ts, "EW", "floor")
            (r_co, _), (r_ec, d_ec) = paired(ts, "contract", "plain"), paired(ts, "EW", "contract")
            ref = ""
            if reference:
                r_ref, d_ref = paired(ts, "EW", "EW ref")
                ref = f" {r_ref:.3f} | {d_ref:+.3f} |"
            print(
                f"| {kind}, T={T} | {statistics.median(ts['plain']) * 1e3:.2f} | "
                f"{statistics.median(ts['EW']) * 1e3:.2f} | {r_ew:.3f} | {d_ew:+.3f} | {r_fl:.3f} | {r_ef:.3f} | "
                f"{d_ef:+.3f} | {r_co:.3f} | {r_ec:.3f} | {d_ec:+.3f} | {r_uw:.3f} | {d_uw:+.3f} |{ref}"
            )
    fd_tasks = [int(t) for t in args.fd_tasks.split(",") if t]
    if not fd_tasks:  # --fd-tasks "": the EW table only
        return
    fused = fused_fd(args.fd_fused) if args.fd_fused else None
    fused_cols = " FD fused ms | FD fused / step |" if fused else ""
    print(
        "\n| workload | MGDA step ms | FD ms | FD / step | monitored / step | T·\\|Z\\| logs ms | logs / step "
        f"| step for FD ≤ 5 % (ms) |{fused_cols}"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if fused else ""))
    for kind in args.kinds.split(","):
        for T in fd_tasks:
            ts = alternate(monitor_rows(Workload(kind, T, BATCH[kind]), fused), args.steps, clock)
            fd = statistics.median(ts["FD alone"]) * 1e3
            extra = ""
            if fused:
                extra = (f" {statistics.median(ts['FD fused (compiled)']) * 1e3:.3f} | "
                         f"{paired(ts, 'FD fused (compiled)', 'MGDA feature')[0] * 100:.1f} % |")
            print(
                f"| {kind}, T={T} | {statistics.median(ts['MGDA feature']) * 1e3:.2f} | {fd:.3f} | "
                f"{paired(ts, 'FD alone', 'MGDA feature')[0] * 100:.1f} % | "
                f"{(paired(ts, 'MGDA feature + monitor(FD)', 'MGDA feature')[0] - 1) * 100:+.1f} % | "
                f"{statistics.median(ts['logs alone']) * 1e3:.3f} | "
                f"{paired(ts, 'logs alone', 'MGDA feature')[0] * 100:.1f} % | {fd / 0.05:.1f} |{extra}"
            )


if __name__ == "__main__":
    main()
