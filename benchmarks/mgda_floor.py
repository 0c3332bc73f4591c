"""The floor of feature-level MGDA against EW: what each part of a step costs, same process.

    python benchmarks/mgda_floor.py                 # conv and MLP, T = 2, 3, 5, 11, 20, 40
    python benchmarks/mgda_floor.py --tasks 2,40 --rounds 3

On the synthetic scaling workloads of ``benchmarks/run_all.py`` it times, round-robin in one process
(``torch.utils.benchmark`` medians; a ratio is the median over rounds of two rows of the same round):

* ``EW`` (``mtl_backward`` with equal weights), ``feature floor`` (T head backwards to ``∂L_t/∂Z`` and
  one encoder VJP, nothing else) and ``MGDA feature`` steps;
* the three things MGDA adds to the floor, each alone on that workload's saliencies:
  the T×T Gramian of the saliencies (``mtlens.engine.gramian.gramian_from_blocks`` on the
  (T, |Z|) float32 block: ``T²·|Z|`` multiply-adds), MGDA's decision from the Gramian
  (``MGDA.weights``: validation + the exact min-norm solver) and the combination ``Σ_t w_t S_t``
  (``tensordot``, ``T·|Z|``);

and prints, per T, the multiply-adds of the Gramian against the encoder's forward + backward
(≈ 3 × its forward multiply-adds), and the bound ``floor/EW + (Gramian + decision + combination)/EW``
that no implementation of MGDA at feature level goes below on this machine (each added part is
timed at its own best: one BLAS call or the solver alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_all import Workload  # noqa: E402

from mtlens.engine import mtl_backward  # noqa: E402
from mtlens.engine.gramian import gramian_from_blocks  # noqa: E402
from mtlens.methods import create  # noqa: E402


def encoder_macs(w: Workload) -> float:
    """Forward multiply-adds of the encoder on the workload's batch (convs and linears)."""
    total = 0.0

    def hook(mod, _inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out.numel() * k
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in w.encoder.modules()]
    with torch.no_grad():
        w.encoder(w.x)
    for h in hs:
        h.remove()
    return total


def rows_for(w: Workload) -> dict:
    ew, mgda = create("ew"), create("mgda")
    z, losses = w.forward()
    S = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0] for L in losses.values()]).detach()
    G = gramian_from_blocks([S])
    ones = torch.ones(w.T, dtype=torch.float64)
    wts = mgda.weights(G, ones).to(S.dtype)

    def step(method, level):
        def f():
            w.zero()
            z, losses = w.forward()
            mtl_backward(losses, features=z, shared_params=w.shared, method=method, level=level)
        return f

    def floor():
        w.zero()
        z, losses = w.forward()
        sal = [torch.autograd.grad(L, [z] + list(w.heads[t].parameters()), retain_graph=True)[0]
               for t, L in enumerate(losses.values())]
        torch.autograd.grad(z, w.shared, grad_outputs=sum(sal))

    return {
        "EW": step(ew, None),
        "feature floor": floor,
        "MGDA feature": step(mgda, "feature"),
        "Gramian S Sᵀ": lambda: gramian_from_blocks([S]),
        "MGDA decision (weights from G)": lambda: mgda.weights(G, ones),
        "combination Σ w_t S_t": lambda: torch.tensordot(wts, S, dims=1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="2,3,5,11,20,40")
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| workload | T | Gramian MACs T²·\\|Z\\| | encoder fwd+bwd MACs | MAC ratio | EW ms | floor / EW | "
          "Gramian ms | decision ms | combination ms | bound on MGDA / EW | measured MGDA / EW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in args.kinds.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            w = Workload(kind, T, 8 if kind == "conv" else 256)
            rows = rows_for(w)
            times: dict[str, list[float]] = {k: [] for k in rows}
            for _ in range(args.rounds):
                for name, fn in rows.items():
                    t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=1)
                    times[name].append(t.blocked_autorange(min_run_time=args.min_run_time).median * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}

            def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
                return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

            z, _ = w.forward()
            zsize = z[0].numel() * z.shape[0]
            gram_macs = T * T * zsize
            enc = 3 * encoder_macs(w)
            extra = (med["Gramian S Sᵀ"] + med["MGDA decision (weights from G)"] + med["combination Σ w_t S_t"])
            bound = ratio("feature floor", "EW") + extra / med["EW"]
            print(f"| {kind} | {T} | {gram_macs / 1e6:.1f} M | {enc / 1e6:.0f} M | {gram_macs / enc:.3f} | "
                  f"{med['EW']:.1f} | {ratio('feature floor', 'EW'):.2f} | {med['Gramian S Sᵀ']:.2f} | "
                  f"{med['MGDA decision (weights from G)']:.2f} | {med['combination Σ w_t S_t']:.2f} | "
                  f"{bound:.2f} | {ratio('MGDA feature', 'EW'):.2f} |", flush=True)


if __name__ == "__main__":
    main()
