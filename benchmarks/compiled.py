"""The engine with a ``torch.compile``'d encoder: what a step costs against the same compiled model's plain loop.

Usage::

    python benchmarks/compiled.py                        # conv and MLP at T = 3 and 11, inductor
    python benchmarks/compiled.py --kinds conv --tasks 3 --backend aot_eager

The scaling study's synthetic workloads (``run_all.py``'s ``Workload``: a conv or MLP encoder, T light heads), each
built twice from one seed: eager, and with the encoder compiled as its own module (docs/engine.md,
"torch.compile"; the heads stay eager). Rows, all interleaved step by step in a fresh random order every cycle
(``run_all.measure``): ``plain`` = ``sum(losses).backward()``; ``EW`` = ``mtl_backward`` at loss level; ``MGDA
feature``; ``UPGrad param`` (``features=Z``, the default loop Jacobian). Donated buffers are switched off before the
first compiled call (``torch._functorch.config.donated_buffer = False``), which the loop Jacobian needs (it
differentiates the encoder once per task). Ratios are medians over rounds of same-round times; the compile itself
(first calls) is outside the timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch._functorch.config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_all import Workload, measure, ratio  # noqa: E402

from mtlens.engine import mtl_backward  # noqa: E402
from mtlens.methods import create  # noqa: E402

BATCH = {"conv": 8, "mlp": 256}


def rows_for(w: Workload, tag: str) -> dict:
    ew, mgda, upgrad = create("ew"), create("mgda"), create("upgrad")

    def plain():
        w.zero()
        _, losses = w.forward()
        sum(losses.values()).backward()

    def step(method, level):
        def run():
            w.zero()
            z, losses = w.forward()
            mtl_backward(losses, method=method, features=z, shared_params=w.shared, level=level)
        return run

    return {f"{tag} plain": plain, f"{tag} EW": step(ew, None), f"{tag} MGDA feature": step(mgda, "feature"),
            f"{tag} UPGrad param": step(upgrad, "param")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--tasks", default="3,11")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch._functorch.config.donated_buffer = False  # the loop Jacobian runs the encoder's backward T times
    out = []
    for kind in args.kinds.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            eager = Workload(kind, T, BATCH[kind])
            comp = Workload(kind, T, BATCH[kind])
            comp.encoder = torch.compile(comp.encoder, backend=args.backend)
            t0 = time.perf_counter()
            comp.forward()[0].sum().backward()  # compile the forward and the backward outside the timing
            compile_s = time.perf_counter() - t0
            rows = {**rows_for(eager, "eager"), **rows_for(comp, "compiled")}
            times = measure(rows, args.rounds, args.min_run_time)
            ms = {n: (statistics.median(v) * 1e3 if not isinstance(v, str) else v) for n, v in times.items()}
            out.append((kind, T, compile_s, ms, {
                "compiled plain / eager plain": ratio(times, "compiled plain", "eager plain"),
                "EW / plain, eager": ratio(times, "eager EW", "eager plain"),
                "EW / plain, compiled": ratio(times, "compiled EW", "compiled plain"),
                "MGDA feature / EW, eager": ratio(times, "eager MGDA feature", "eager EW"),
                "MGDA feature / EW, compiled": ratio(times, "compiled MGDA feature", "compiled EW"),
                "UPGrad param / plain, eager": ratio(times, "eager UPGrad param", "eager plain"),
                "UPGrad param / plain, compiled": ratio(times, "compiled UPGrad param", "compiled plain"),
                "compiled UPGrad / eager UPGrad": ratio(times, "compiled UPGrad param", "eager UPGrad param"),
            }))
            print(f"{kind} T={T}: compiled in {compile_s:.1f} s", file=sys.stderr)
    print(f"torch {torch.__version__}, backend {args.backend}, 1 thread, {args.rounds} rounds; ms/step (median) "
          "and same-round ratios (median over rounds)\n")
    cols = [f"{k} T={T}" for k, T, *_ in out]
    print("| row | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in out[0][3]:
        cells = [f"{o[3][name]:.2f}" if not isinstance(o[3][name], str) else o[3][name][:40] for o in out]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name in out[0][4]:
        print(f"| {name} | " + " | ".join(f"{o[4][name]:.3f}" for o in out) + " |")
    print("| compile time, s | " + " | ".join(f"{o[2]:.1f}" for o in out) + " |")


if __name__ == "__main__":
    main()
