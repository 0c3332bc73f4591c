"""Standalone timing of MGDA's exact min-norm solver, ``mtlens.methods._solvers.min_norm_simplex``.

    python benchmarks/min_norm_solver.py
    python benchmarks/min_norm_solver.py --reference /tmp/old_solvers.py   # A/B against another version

``--reference`` takes a copy of another version of ``src/mtlens/methods/_solvers.py`` (e.g.
``git show <commit>:src/mtlens/methods/_solvers.py > /tmp/old_solvers.py``) and times its
``min_norm_simplex`` on the same Gramians in the same process, alternating with the current one.

Gramian families, for T = 2, 3, 5, 11, 20, 40:

* ``conv`` / ``mlp``: the saliency Gramian ``S Sᵀ`` of the synthetic scaling workloads of
  ``benchmarks/run_all.py`` (what MGDA at feature level solves there; float64);
* ``random``: ``J Jᵀ`` of T standard normal gradients in R^(2T);
* ``ill``: gradients with singular values spread over 1e5 (Gramian condition number 1e10), a shared
  direction and norms spread over 1e6 (the property test's family, tests/methods/test_solver_certificates.py);
* ``rank5``: T gradients in R^5 (rank-deficient from T = 6 on).

Each cell is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` (≥ ``--min-run-time`` s);
rounds alternate the two solvers; the ratio is the median over rounds of reference / current. Every
result is checked: both solvers' KKT gaps and min-norm values are printed as agreeing.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

HERE = Path(__file__).resolve().parent
TS = (2, 3, 5, 11, 20, 40)


def load_reference(path: str):
    import mtlens.methods  # noqa: F401  (the package the copy's relative imports resolve in)

    name = "mtlens.methods._solvers_reference"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.min_norm_simplex


def saliency_gramian(kind: str, T: int) -> np.ndarray:
    sys.path.insert(0, str(HERE))
    from run_all import Workload

    w = Workload(kind, T, 8 if kind == "conv" else 256)
    z, losses = w.forward()
    S = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0].reshape(-1) for L in losses.values()])
    S = S.double()
    return (S @ S.T).numpy()


def ill_gramian(T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    P = T + 3
    A = rng.standard_normal((T, P))
    U, _, Vt = np.linalg.svd(A, full_matrices=False)
    A = (U * np.logspace(0, -5, T)) @ Vt
    A = A / np.linalg.norm(A, axis=1, keepdims=True) + 1.0 * rng.standard_normal(P) / math.sqrt(P)
    A = A / np.linalg.norm(A, axis=1, keepdims=True) * np.logspace(0, 6, T)[rng.permutation(T)][:, None]
    return A @ A.T


def gramian(family: str, T: int) -> np.ndarray:
    rng = np.random.default_rng(T)
    if family in ("conv", "mlp"):
        return saliency_gramian(family, T)
    if family == "random":
        J = rng.standard_normal((T, 2 * T))
        return J @ J.T
    if family == "ill":
        return ill_gramian(T)
    if family == "rank5":
        J = rng.standard_normal((T, 5))
        return J @ J.T
    raise SystemExit(f"unknown family {family}")


def time_us(fn, G, min_run_time: float) -> float:
    t = benchmark.Timer("fn(G)", globals={"fn": fn, "G": G}, num_threads=1)
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", help="path of another _solvers.py to time against")
    ap.add_argument("--families", default="conv,mlp,random,ill,rank5")
    ap.add_argument("--tasks", default=",".join(map(str, TS)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mtlens.methods._solvers import min_norm_simplex as current

    ref = load_reference(args.reference) if args.reference else None
    Ts = [int(t) for t in args.tasks.split(",")]
    head = "| family | T | iterations | support | KKT gap | current µs |"
    if ref is not None:
        head += " reference µs | reference / current | reference iterations | \\|value − ref\\| / value |"
    print(head)
    print("|" + "---|" * (head.count("|") - head.count("\\|") - 1))  # escaped pipes are in a cell
    for fam in args.families.split(","):
        for T in Ts:
            G = gramian(fam, T)
            r = current(G)
            cur, rat, old = [], [], []
            for _ in range(args.rounds):
                c = time_us(current, G, args.min_run_time)
                cur.append(c)
                if ref is not None:
                    o = time_us(ref, G, args.min_run_time)
                    old.append(o)
                    rat.append(o / c)
            line = (f"| {fam} | {T} | {r.iterations} | {int((r.weights > 0).sum())} | {r.kkt_gap:.1e} | "
                    f"{statistics.median(cur):.0f} |")
            if ref is not None:
                rr = ref(G)
                dv = abs(rr.value - r.value) / max(r.value, 1e-300)
                line += (f" {statistics.median(old):.0f} | {statistics.median(rat):.1f} | {rr.iterations} | "
                         f"{dv:.1e} |")
            print(line, flush=True)


if __name__ == "__main__":
    main()
