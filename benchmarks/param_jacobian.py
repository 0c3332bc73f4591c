"""Parameter-level UPGrad against the per-task Jacobian it is built on, step by step (A/B).

    python benchmarks/param_jacobian.py                         # conv and MLP, T = 2 3 5 11 20 40
    python benchmarks/param_jacobian.py --kinds mlp --tasks 5 --steps 60
    python benchmarks/param_jacobian.py --steady --tasks 2,11,40 --steps 8  # training-loop order
    python benchmarks/param_jacobian.py --against 74a28aa --clock thread     # + the engine of another commit

The workloads are ``run_all.py``'s synthetic scaling encoders. Rows, called in turn one step
each (in a fresh seeded random order every cycle; ``--steps`` cycles; every ratio is the median
over cycles of the two rows' times in the same cycle, so load that comes and goes hits them
alike; ``/ floor`` divides by the faster of the two Jacobian rows by median, as ``run_all.py``'s
floor):

* ``Jacobian loop``: T calls of ``torch.autograd.grad(L_t, shared + head_t)``, the gradients discarded
  (``run_all.py``'s ``per-task Jacobian (loop)``);
* ``Jacobian batched``: T head backwards, then one vmapped encoder VJP (``is_grads_batched=True``),
  as TorchJD computes it;
* ``Jacobian loop, rows kept``: the loop, holding all T rows until the step ends (what any method
  deciding from the whole Jacobian must hold);
* ``UPGrad loop`` / ``UPGrad batched``: ``mtl_backward(level="param", jacobian=...)``;
* ``TorchJD autojac``: ``torchjd.autojac.mtl_backward`` + ``jac_to_grad(shared, UPGrad())``.

``--against REV`` adds ``UPGrad loop`` and ``PCGrad loop`` rows run by the engine of commit ``REV`` (its
``src/mtlens`` extracted with ``git archive`` and imported as a second package in the same process) and prints
this tree's / REV's ratio of each. ``--clock thread`` times with ``time.thread_time`` (CPU time of the
thread: a step preempted by another process is not charged for the wait) instead of ``perf_counter``.

``--phases`` instead times UPGrad's step function by function from inside (:func:`phases`).

``--steady`` instead times blocks of consecutive steps of one variant (the order of a training loop;
see :func:`steady`). Each row also gives its minor page faults per step (``getrusage``): fresh allocations above glibc's
mmap threshold (at most 32 MiB) are mapped anew and faulted in page by page on every step.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import Workload, torchjd_fns  # noqa: E402

from mtlens.engine import mtl_backward  # noqa: E402
from mtlens.methods import create  # noqa: E402


def engine_of(rev: str):
    """``(mtl_backward, create)`` of commit ``rev``'s engine, imported as the package ``mtlens_<rev>``."""
    import importlib
    import io
    import subprocess
    import tarfile
    import tempfile

    root = Path(__file__).resolve().parent.parent
    blob = subprocess.run(["git", "archive", "--format=tar", rev, "src/mtlens"], cwd=root, check=True,
                          capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="param_jacobian_"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(tmp, filter="data")
        else:  # our own repository's archive
            tar.extractall(tmp)  # noqa: S202
    name = f"mtlens_{rev.replace('-', '_').replace('.', '_')}"
    (tmp / "src" / "mtlens").rename(tmp / name)
    sys.path.insert(0, str(tmp))
    engine = importlib.import_module(f"{name}.engine")
    methods = importlib.import_module(f"{name}.methods")
    return engine.mtl_backward, methods.create


def rows_for(w: Workload, against: str | None = None) -> dict:
    upgrad = create("upgrad")
    kept: list = []

    def loop():
        w.zero()
        _, losses = w.forward()
        for t, L in enumerate(losses.values()):
            torch.autograd.grad(L, w.shared + list(w.heads[t].parameters()), retain_graph=True)

    def loop_kept():
        w.zero()
        _, losses = w.forward()
        kept[:] = [torch.autograd.grad(L, w.shared + list(w.heads[t].parameters()), retain_graph=True)
                   for t, L in enumerate(losses.values())]
        kept.clear()

    def batched():
        w.zero()
        z, losses = w.forward()
        sal = [torch.autograd.grad(L, [z] + list(w.heads[t].parameters()), retain_graph=True)[0]
               for t, L in enumerate(losses.values())]
        torch.autograd.grad(z, w.shared, grad_outputs=torch.stack(sal), is_grads_batched=True)

    def engine(jacobian):
        def step():
            w.zero()
            z, losses = w.forward()
            mtl_backward(losses, features=z, shared_params=w.shared, method=upgrad, level="param", jacobian=jacobian)

        return step

    def engine_with(backward, method):
        def step():
            w.zero()
            z, losses = w.forward()
            backward(losses, features=z, shared_params=w.shared, method=method, level="param")

        return step

    rows = {"Jacobian loop": loop, "Jacobian batched": batched, "Jacobian loop, rows kept": loop_kept,
            "UPGrad loop": engine("loop"), "UPGrad batched": engine("batched")}
    if against is not None:
        old_backward, old_create = engine_of(against)
        rows["PCGrad loop"] = engine_with(mtl_backward, create("pcgrad"))
        rows[f"UPGrad loop @{against}"] = engine_with(old_backward, old_create("upgrad"))
        rows[f"PCGrad loop @{against}"] = engine_with(old_backward, old_create("pcgrad"))
    tjd = torchjd_fns(w, w, batched=False)
    if "TorchJD autojac UPGrad" in tjd:
        rows["TorchJD autojac"] = tjd["TorchJD autojac UPGrad"]
    return rows


def run(kind: str, T: int, steps: int, against: str | None = None, clock=time.perf_counter) -> None:
    w = Workload(kind, T, 8 if kind == "conv" else 256)
    rows = rows_for(w, against)
    for fn in rows.values():  # warm-up
        fn()
        fn()
    times = {n: [] for n in rows}
    faults = {n: [] for n in rows}
    gc.collect()
    gc.disable()
    try:
        order = list(rows)
        rng = random.Random(0)
        for _ in range(steps):
            rng.shuffle(order)  # a fresh order every cycle, as run_all.measure
            for name in order:
                fn = rows[name]
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    finally:
        gc.enable()
    # the floor: the faster exact way by its median (as run_all.add_floor)
    floor = min((times["Jacobian loop"], times["Jacobian batched"]), key=statistics.median)
    for name in rows:
        r = statistics.median(x / f for x, f in zip(times[name], floor))
        print(f"{kind:4s} T={T:2d}  {name:26s} {statistics.median(times[name]) * 1e3:8.2f} ms  "
              f"/ floor {r:5.3f}  minor faults/step {statistics.median(faults[name]):7.0f}", flush=True)
    if "TorchJD autojac" in times:
        r = statistics.median(a / b for a, b in zip(times["TorchJD autojac"], times["UPGrad loop"]))
        print(f"{kind:4s} T={T:2d}  autojac / UPGrad loop {r:.3f}")
    if against is not None:
        for m in ("UPGrad", "PCGrad"):
            r = statistics.median(a / b for a, b in zip(times[f"{m} loop"], times[f"{m} loop @{against}"]))
            print(f"{kind:4s} T={T:2d}  {m} loop this tree / @{against} {r:.3f}", flush=True)


def steady(kind: str, T: int, blocks: int, per: int) -> None:
    """Training-loop order: blocks of ``per`` consecutive steps (each followed by ``SGD.step``) of the
    floor, of UPGrad with the rows kept as separate autograd outputs (the engine before the reused
    workspace) and of UPGrad as it is, the blocks alternating; medians over the steps after each block's
    first two. Here a step follows a step of its own kind, as in training, so glibc's heap is in the
    state a training loop leaves it in."""
    import mtlens.engine.gradients as gradients

    w = Workload(kind, T, 8 if kind == "conv" else 256)
    upgrad = create("upgrad")
    opt = torch.optim.SGD(w.params, lr=1e-7)

    def floor():
        w.zero()
        _, losses = w.forward()
        for t, L in enumerate(losses.values()):
            torch.autograd.grad(L, w.shared + list(w.heads[t].parameters()), retain_graph=True)

    def engine():
        w.zero()
        z, losses = w.forward()
        mtl_backward(losses, features=z, shared_params=w.shared, method=upgrad, level="param")

    def no_workspace(*_):
        return None

    workspace = gradients.jacobian_workspace
    variants = {"floor": (floor, workspace), "UPGrad, rows kept": (engine, no_workspace),
                "UPGrad": (engine, workspace)}
    times: dict = {n: [] for n in variants}
    faults: dict = {n: [] for n in variants}
    try:
        for _ in range(blocks):
            for name, (fn, ws) in variants.items():
                gradients.jacobian_workspace = ws
                for i in range(per):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    fn()
                    opt.step()
                    dt = time.perf_counter() - t0
                    if i >= 2:
                        times[name].append(dt)
                        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    finally:
        gradients.jacobian_workspace = workspace
    fl = statistics.median(times["floor"])
    for name in variants:
        m = statistics.median(times[name])
        print(f"{kind:4s} T={T:2d}  steady  {name:18s} {m * 1e3:8.2f} ms  / floor {m / fl:5.3f}  "
              f"minor faults/step {statistics.median(faults[name]):7.0f}", flush=True)


def phases(kind: str, T: int, steps: int, clock=time.thread_time) -> None:
    """Where UPGrad's parameter-level step spends its time: the engine's functions timed from inside (each
    wrapped with ``clock``), per step, next to the loop floor (``Jacobian loop``) and the forward alone,
    alternating step by step. ``heads pass`` + ``encoder rows`` minus (floor − forward) is what the engine's
    per-task gradients cost above the floor's backward."""
    import collections

    import mtlens.engine.backward as backward_mod
    import mtlens.engine.gradients as gradients_mod

    w = Workload(kind, T, 8 if kind == "conv" else 256)
    upgrad = create("upgrad")
    acc: dict = collections.defaultdict(float)
    saved = []

    def timed(owner, name, label):
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def wrapper(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[label] += clock() - t0

        setattr(owner, name, wrapper)

    for owner, name, label in [(gradients_mod, "_heads_pass", "heads pass"),
                               (gradients_mod, "_encoder_rows", "encoder rows"),
                               (gradients_mod.TaskGradients, "gramian", "Gramian"),
                               (type(upgrad), "decide", "decision (UPGrad)"),
                               (backward_mod, "check_decision", "check_decision"),
                               (backward_mod, "apply_decision", "apply_decision"),
                               (backward_mod, "compute_task_gradients", "step 1 (compute_task_gradients)")]:
        timed(owner, name, label)
    total: dict = collections.defaultdict(float)
    try:
        def floor():
            w.zero()
            _, losses = w.forward()
            for t, L in enumerate(losses.values()):
                torch.autograd.grad(L, w.shared + list(w.heads[t].parameters()), retain_graph=True)

        for i in range(steps + 3):
            if i == 3:
                acc.clear()
                total.clear()
            t0 = clock()
            floor()
            t1 = clock()
            w.zero()
            z, losses = w.forward()
            t2 = clock()
            mtl_backward(losses, features=z, shared_params=w.shared, method=upgrad, level="param")
            t3 = clock()
            total["Jacobian loop (floor)"] += t1 - t0
            total["forward"] += t2 - t1
            total["mtl_backward"] += t3 - t2
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    for label, v in [*total.items(), *acc.items()]:
        print(f"{kind:4s} T={T:2d}  phases  {label:34s} {v / steps * 1e3:8.3f} ms/step", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--tasks", default="2,3,5,11,20,40")
    ap.add_argument("--steps", type=int, default=20, help="cycles (one step of every row each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steady", action="store_true",
                    help="training-loop order instead (blocks of consecutive steps of one variant; see steady())")
    ap.add_argument("--blocks", type=int, default=4, help="--steady: blocks per variant")
    ap.add_argument("--phases", action="store_true",
                    help="instead: UPGrad's step timed function by function from inside (see phases())")
    ap.add_argument("--against", default=None, help="a git revision whose engine to time in the same process")
    ap.add_argument("--clock", choices=("perf", "thread"), default="perf",
                    help="perf: time.perf_counter (wall); thread: time.thread_time (this thread's CPU time)")
    args = ap.parse_args(argv)
    if args.steady and not args.phases and args.steps < 3:
        ap.error(f"--steady times each block's steps after its first two: --steps {args.steps} leaves none; "
                 "give 3 or more")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    for kind in args.kinds.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            if args.phases:
                phases(kind, T, args.steps, clock)
            elif args.steady:
                steady(kind, T, args.blocks, args.steps)
            else:
                run(kind, T, args.steps, args.against, clock)


if __name__ == "__main__":
    main()
