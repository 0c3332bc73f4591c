"""Every table and plot of docs/benchmarks.md, from one command.

    python benchmarks/run_all.py                       # publication run (~20 min on a loaded 2-core machine)
    python benchmarks/run_all.py --quick --out /tmp/b  # smoke run (tiny sizes, ≈ 1 min, most of it QM9)

Only the full command writes docs/ by default; a partial run (``--quick``, ``--sections``, ``--tasks``,
``--no-memory``) needs ``--out`` (``--out docs`` to replace the published page on purpose).

Sections (``--sections``, comma list; default all):

* ``scaling``  step time vs the number of tasks T on a synthetic conv encoder and an MLP with
  light heads: plain loop, EW, UW, MGDA at feature level, the per-task Jacobian itself (the
  floor of parameter-level methods), UPGrad and PCGrad at parameter level, EW + Rep-MTL,
  TorchJD's autojac (``mtl_backward`` + ``jac_to_grad``) and autogram
  (``Engine(encoder).compute_gramian`` + ``losses.backward(weights)``) with UPGrad; peak memory of
  every row; a log-log plot.
* ``repmtl``   EW + Rep-MTL against EW on the ResNet-18 and LeNet workloads of
  ``benchmarks/step_time.py`` and on ResNet-18 with DeepLabV3+-style (ASPP) heavy heads, with a
  ``torch.profiler`` table of where the extra time goes on the heavy heads.
* ``monitor``  FD / GDS / GMS monitoring cost per monitored step.
* ``stacked``  ``torch.stack(losses)`` against a dict at feature and parameter level.
* ``cached``   cached decisions (Nash-MTL and UPGrad at parameter level) vs k.
* ``qm9``      the QM9 MPNN (11 tasks), when ``mtlens`` provides its model/batch builder.
* ``methods``  the all-methods table of ``benchmarks/step_time.py`` (LeNet, T = 2; ``--methods-workloads``).

Timing (:func:`measure`): the rows of one table are called in turn, one step each, in a fresh
random order every cycle (seeded), so the steps of the rows a ratio compares alternate and load that comes
and goes within seconds hits them alike; a round gives each row at least ``--min-run-time``
seconds of steps, a row's time for the round is the median of its steps, and a ratio is the
median over ``--rounds`` rounds of the two rows' times *in the same round*. Memory: the peak,
over one step, of the bytes of tensor storage created during the step and alive at once — a
tracemalloc of tensor storage: a
``TorchDispatchMode`` sees every op's outputs (forward and backward) and follows each storage
by a weak reference; gradients written into ``.grad`` count, parameters and inputs do not,
kernels' internal scratch buffers are not seen.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mtlens.engine import mtl_backward  # noqa: E402
from mtlens.engine._autograd import backward_into_grad, vjp  # noqa: E402  (the engine's calls: floors pay no more)
from mtlens.engine.gradients import all_finite  # noqa: E402
from mtlens.engine.gramian import gramian_from_blocks  # noqa: E402
from mtlens.engine.saliency import channels_by_locations  # noqa: E402
from mtlens.methods import create  # noqa: E402
from mtlens.methods.rep_mtl import penalty_terms  # noqa: E402
from mtlens.models._torchvision_shim import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # PyPI's CUDA torchvision with a CPU torch: before timm imports it

# =============================================================================================
# timing and memory
# =============================================================================================


def measure(rows: dict[str, Callable[[], None]], rounds: int, min_run_time: float) -> dict[str, list[float]]:
    """Per-round median step time of every row, the rows' calls interleaved.

    Every row is warmed up (two calls; a row that raises is recorded as its error message and
    measured no further). In each round the rows are called in turn, one call each, over and over;
    a row leaves the rotation once its calls in this round add up to ``min_run_time`` (a row
    slower than that runs once per round). A row's time for the round is the median of its calls
    in that round. The calls of the rows a ratio compares thus alternate step by step (one step
    of each per cycle, in a fresh seeded random order every cycle: a step that leaves the
    allocator or the caches worse for the next one — the vmapped Jacobian's large freed blocks
    cost the next row ≈ 0.5 ms at conv T = 5 — does not always hit the same row), so load that
    comes and goes on the shared machine within seconds hits them alike; measuring each row as
    one block of ``min_run_time`` (``torch.utils.benchmark``'s ``blocked_autorange``, what this
    harness did before) put seconds between the two rows of a ratio, and a load spike in between
    moved the ratio by up to 2×. The garbage collector is off
    during each call (as ``timeit`` does)."""
    times: dict[str, list[float] | str] = {}
    for name, fn in rows.items():  # warm-up (and configuration errors)
        try:
            fn()
            fn()
            times[name] = []
        except Exception as exc:  # noqa: BLE001 - reported in the table, never hidden
            times[name] = f"{type(exc).__name__}: {exc}"[:120]
    live = [n for n in rows if isinstance(times[n], list)]
    rng = random.Random(0)
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(rounds):
            calls: dict[str, list[float]] = {n: [] for n in live}
            spent = dict.fromkeys(live, 0.0)
            todo = list(live)
            gc.collect()
            while todo:
                rng.shuffle(todo)  # a fresh order every cycle: no row always follows the same one
                for name in todo:
                    gc.disable()
                    t0 = time.perf_counter()
                    rows[name]()
                    dt = time.perf_counter() - t0
                    if gc_was_enabled:
                        gc.enable()
                    calls[name].append(dt)
                    spent[name] += dt
                todo = [n for n in todo if spent[n] < min_run_time]
            for name in live:
                times[name].append(statistics.median(calls[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _skipped(reason: str) -> Callable[[], None]:
    def fn():
        raise RuntimeError(f"not run: {reason}")

    return fn


def ratio(times, a: str, b: str) -> float:
    """Median over rounds of time(a)/time(b) measured in the same round; NaN if either failed."""
    ta, tb = times.get(a), times.get(b)
    if not isinstance(ta, list) or not isinstance(tb, list) or not ta:
        return float("nan")
    return statistics.median(x / y for x, y in zip(ta, tb))


def med(times, a: str) -> float:
    t = times.get(a)
    return statistics.median(t) if isinstance(t, list) and t else float("nan")


FLOOR = "per-task Jacobian (floor)"
FLOOR_WAYS = ("per-task Jacobian (loop)", "per-task Jacobian (batched)")


def add_floor(times: dict) -> dict:
    """Insert the ``per-task Jacobian (floor)`` row after its two exact ways of computing it: the times of
    the faster way — ``T`` backward calls (loop) or one vmapped encoder VJP (batched) — by the median over
    the rounds, so the floor is the cheapest exact per-task Jacobian measured on this machine and workload.
    (Not a per-round minimum of the two: the minimum of two noisy times is biased low.) Rows keep their
    order; a way that failed (vmap without a batching rule) is left out."""
    ways = [r for r in FLOOR_WAYS if isinstance(times.get(r), list) and times[r]]
    out: dict = {}
    for name, t in times.items():
        out[name] = t
        if name == FLOOR_WAYS[-1]:
            out[FLOOR] = (list(times[min(ways, key=lambda r: statistics.median(times[r]))]) if ways
                          else "no way of computing the Jacobian ran")
    return out


class _LiveStorages(TorchDispatchMode):
    """Bytes of the CPU tensor storages created since entering, alive at each op; their peak.

    Every op (forward and backward: the autograd engine runs under the same dispatch mode) reports
    its outputs; a storage is tracked by a weak reference to its C++ storage, so it counts exactly
    while anything (a Python tensor, the autograd graph, ``.grad``) holds it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = False
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                st = o.untyped_storage()
                key = st.data_ptr()
                if key not in self.live or self.live[key][0].expired():
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    new = True
        if new:
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[key]
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_memory(fn: Callable[[], None]) -> int:
    """Peak bytes of tensor storage allocated during one call of ``fn`` and alive at once.

    Tensors that existed before the call (parameters, inputs) do not count; gradients written
    into ``.grad`` during the call do. Kernels' internal scratch buffers are not seen."""
    with _LiveStorages() as mode:
        fn()
    return mode.peak


# =============================================================================================
# synthetic scaling workloads
# =============================================================================================


class ConvEncoder(nn.Sequential):
    """3×32×32 → 64×8×8: three 3×3 convs (stride 2, 2, 1) with GroupNorm (autogram needs no BatchNorm)."""

    def __init__(self, width: int = 64):
        super().__init__(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
        )


class MLPEncoder(nn.Sequential):
    """64 → 512 → 512 → 256 with ReLU."""

    def __init__(self):
        super().__init__(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())


class Workload:
    """An encoder, T light heads, a fixed batch; ``forward()`` → (Z, {task: loss})."""

    def __init__(self, kind: str, T: int, batch: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.kind, self.T = kind, T
        if kind == "conv":
            self.encoder = ConvEncoder()
            self.heads = nn.ModuleList(nn.Conv2d(64, 1, 1) for _ in range(T))  # dense regression, 8×8
            self.x = torch.randn(batch, 3, 32, 32, generator=g)
            self.y = torch.randn(T, batch, 1, 8, 8, generator=g)
        elif kind == "mlp":
            self.encoder = MLPEncoder()
            self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(T))  # one scalar target per task
            self.x = torch.randn(batch, 64, generator=g)
            self.y = torch.randn(T, batch, 1, generator=g)
        else:
            raise SystemExit(f"unknown workload kind {kind}")
        self.names = [f"task{t:02d}" for t in range(T)]
        self.shared = list(self.encoder.parameters())
        self.params = self.shared + list(self.heads.parameters())

    def zero(self):
        for p in self.params:
            p.grad = None

    def forward(self):
        z = self.encoder(self.x)
        return z, {n: F.mse_loss(h(z), self.y[t]) for t, (n, h) in enumerate(zip(self.names, self.heads))}

    def forward_per_sample(self) -> Tensor:
        """(B, T) per-sample losses; their mean over B is ``forward()``'s losses."""
        z = self.encoder(self.x)
        cols = [F.mse_loss(h(z), self.y[t], reduction="none").flatten(1).mean(1) for t, h in enumerate(self.heads)]
        return torch.stack(cols, dim=1)


class ModelWorkload(Workload):
    """A :class:`Workload` from an encoder, a ModuleList of heads and ``forward(encoder, heads)``."""

    def __init__(self, encoder: nn.Module, heads: nn.ModuleList, forward: Callable):
        self.encoder, self.heads, self._forward = encoder, heads, forward
        self.T = len(heads)
        self.shared = list(encoder.parameters())
        self.params = self.shared + list(heads.parameters())

    def forward(self):
        return self._forward(self.encoder, self.heads)


class JacobianFloor:
    """The arithmetic floors' parameter-level steps: the per-task Jacobian by T backwards into one ``(T, P)``
    buffer reused across steps (as the engine's workspace is), then a shared update ``Σ_t w_t g_t`` from its
    rows written, with the heads' gradients, after one finiteness check of every gradient."""

    def __init__(self, w):
        self.w = w
        self.sizes = [p.numel() for p in w.shared]
        self.J = torch.empty(w.T, sum(self.sizes), dtype=w.shared[0].dtype)

    def rows(self) -> list:
        """A fresh forward, the Jacobian into ``J``; returns per task (head parameters, their gradients)."""
        w, n = self.w, len(self.sizes)
        _, losses = w.forward()
        hg = []
        for t, L in enumerate(losses.values()):
            hp = list(w.heads[t].parameters())
            gs = vjp(L, w.shared + hp, retain_graph=t < w.T - 1)
            torch.cat([g.reshape(-1) for g in gs[:n]], out=self.J[t])
            hg.append((hp, gs[n:]))
        return hg

    def write(self, shared_flat: Tensor, hg: list) -> None:
        """Check every gradient (the engine's guarantee), then assign ``.grad``."""
        g = shared_flat.split(self.sizes)
        if not all_finite(list(g) + [x for _, gh in hg for x in gh]):
            raise FloatingPointError("non-finite gradient")
        for p, x in zip(self.w.shared, g):
            p.grad = x.view_as(p)
        for hp, gh in hg:
            for p, x in zip(hp, gh):
                p.grad = x


def ew_floor_step(w) -> None:
    """The EW floor's step (row `plain + finiteness check (EW floor)`; also fixed_cost.py's): the plain loop's
    ``backward()`` writing ``.grad`` (every ``.grad`` is ``None`` at entry and no hook runs on a write), one exact
    finiteness check of those ``.grad``, reset to ``None`` when it fails — the cheapest exact form measured
    (docs/performance.md, "EW against a plain loop"), and the engine's own when those conditions hold."""
    w.zero()
    _, losses = w.forward()
    backward_into_grad(sum(losses.values()))
    if not all_finite([p.grad for p in w.params], owned=True):  # autograd's own .grad: the fused check, as the engine
        for p in w.params:
            p.grad = None
        raise FloatingPointError("non-finite gradient")


def step_fns(w, methods: dict, batched_autogram: bool = True) -> dict[str, Callable[[], None]]:
    """The rows of the scaling table for one workload."""

    def plain():
        w.zero()
        _, losses = w.forward()
        sum(losses.values()).backward()

    def plain_twin():  # the same step under another name: its ratio to `plain loop` is the run's A/A noise
        w.zero()
        _, losses = w.forward()
        sum(losses.values()).backward()

    def floor():  # the per-task Jacobian itself: T backwards of (shared + own head), nothing else
        w.zero()
        _, losses = w.forward()
        for t, L in enumerate(losses.values()):
            vjp(L, w.shared + list(w.heads[t].parameters()), retain_graph=True)

    def floor_batched():  # the same Jacobian as TorchJD computes it: T head backwards, one vmapped encoder VJP
        w.zero()
        z, losses = w.forward()
        sal = [torch.autograd.grad(L, [z] + list(w.heads[t].parameters()), retain_graph=True)[0]
               for t, L in enumerate(losses.values())]
        torch.autograd.grad(z, w.shared, grad_outputs=torch.stack(sal), is_grads_batched=True)

    def feature_floor():  # what every feature-level method must do: T (Z + own head) backwards, one encoder VJP
        w.zero()
        z, losses = w.forward()
        sal = [vjp(L, [z] + list(w.heads[t].parameters()), retain_graph=True)[0]
               for t, L in enumerate(losses.values())]
        vjp(z, w.shared, grad_outputs=sum(sal))

    # The arithmetic floors: what any exact implementation of the row must compute, written out as raw
    # torch calls (no engine; autograd through the engine's own entry, vjp, which skips torch.autograd.grad's
    # Python argument handling — the floors pay no more call overhead than the engine does), and — like the
    # engine — writing nothing into .grad before one finiteness check
    # of every gradient (the project's guarantee: never a non-finite update written). Each target's ratio is
    # also given against its floor: what is above it is the engine's own cost.
    def transactional_plain():  # floor of EW: plain loop + the guarantee (gradients returned, checked, written)
        ew_floor_step(w)

    def mgda_arithmetic():  # floor of MGDA feature: saliencies, Gramian, decision, Σ w_t S_t, one encoder VJP
        w.zero()
        z, losses = w.forward()
        heads = [list(h.parameters()) for h in w.heads]
        out = [vjp(L, [z] + hp, retain_graph=True) for L, hp in zip(losses.values(), heads)]
        S = torch.stack([o[0] for o in out])
        L = torch.stack([L.detach() for L in losses.values()])
        wt = methods["mgda"].weights(gramian_from_blocks([S]), L)
        gs = list(vjp(z, w.shared, grad_outputs=torch.tensordot(wt.to(S.dtype), S, dims=1)))
        hg = [g for o in out for g in o[1:]]
        if not all_finite(gs + hg):
            raise FloatingPointError("non-finite gradient")
        for p, g in zip(w.shared + [p for hp in heads for p in hp], gs + hg):
            p.grad = g

    jf = JacobianFloor(w)

    def upgrad_arithmetic():  # floor of UPGrad param: per-task Jacobian (T, P), Gramian, decision, Σ w_t g_t
        w.zero()
        hg = jf.rows()
        wt = methods["upgrad"].weights(gramian_from_blocks([jf.J]))
        jf.write(wt.to(jf.J.dtype) @ jf.J, hg)

    def repmtl_arithmetic():  # floor of EW + Rep-MTL: T saliencies with their graph, the penalty, ONE backward
        w.zero()
        z, losses = w.forward()
        Ls = list(losses.values())
        rep = methods["rep_mtl"]
        S = torch.stack([vjp(L, [z], create_graph=True)[0] for L in Ls])  # S_t = ∂L_t/∂Z, attached through the heads
        tsr, csa = penalty_terms(channels_by_locations(S), rep.tau, rep.csa_form, rep.csa_task_reduction)
        total = sum(Ls) + rep.lambda_tsr * tsr + rep.lambda_csa * csa  # EW's objective + the penalty
        gs = vjp(total, w.params)
        if not all_finite(list(gs)):
            raise FloatingPointError("non-finite gradient")
        for p, g in zip(w.params, gs):
            p.grad = g

    def engine(name, lvl, regs=()):
        m = methods[name]

        def step():
            w.zero()
            z, losses = w.forward()
            mtl_backward(losses, features=z, shared_params=w.shared, method=m, level=lvl, regularizers=regs)

        return step

    rows = {"plain loop": plain, "plain loop (A/A twin)": plain_twin, "EW": engine("ew", None),
            "UW (loss weighting)": engine("uw", None),
            "per-task saliencies (feature floor)": feature_floor, "MGDA feature": engine("mgda", "feature"),
            "per-task Jacobian (loop)": floor, "per-task Jacobian (batched)": floor_batched,
            "UPGrad param": engine("upgrad", "param"), "PCGrad param": engine("pcgrad", "param"),
            "EW + Rep-MTL": engine("ew", None, [methods["rep_mtl"]]),
            "plain + finiteness check (EW floor)": transactional_plain,
            "MGDA feature arithmetic (floor)": mgda_arithmetic,
            "UPGrad param arithmetic (floor)": upgrad_arithmetic,
            "EW + Rep-MTL arithmetic (floor)": repmtl_arithmetic}
    # autogram hooks every forward of the module it is given: it gets its own copy (same weights);
    # a workload whose forward closes over its model builds its twin itself (``w.twin()``)
    twin = getattr(w, "twin", None)
    rows.update(torchjd_fns(w, twin() if twin is not None else copy.deepcopy(w), batched_autogram))
    return rows


def torchjd_fns(w, w_autogram, batched: bool = True) -> dict[str, Callable[[], None]]:
    """TorchJD 0.18 with UPGrad: autojac, autogram on the T mean losses (``batch_dim=None``, the
    direct MTL use) and autogram batched (``batch_dim=0`` on the B×T per-sample losses; the T×T
    Gramian of the mean losses is the B×B block sum of that (B·T)×(B·T) Gramian, divided by B²)."""
    try:
        from torchjd.aggregation import UPGrad, UPGradWeighting
        from torchjd.autogram import Engine
        from torchjd.autojac import jac_to_grad
        from torchjd.autojac import mtl_backward as tjd_mtl_backward
    except ImportError:
        return {}
    agg, weighting = UPGrad(), UPGradWeighting()
    if batched:  # copy before any Engine hooks the modules (deepcopy would copy the hooks)
        w_batched = copy.deepcopy(w_autogram)
        engine_b = Engine(w_batched.encoder, batch_dim=0)
    engine = Engine(w_autogram.encoder, batch_dim=None)

    def autojac():
        w.zero()
        z, losses = w.forward()
        tjd_mtl_backward(list(losses.values()), features=z)
        jac_to_grad(w.shared, agg)

    def autogram():
        w_autogram.zero()
        _, losses = w_autogram.forward()
        L = torch.stack(list(losses.values()))
        weights = weighting(engine.compute_gramian(L))
        L.backward(weights)

    def autogram_batched():
        w_batched.zero()
        per_sample = w_batched.forward_per_sample()  # (B, T)
        B, T = per_sample.shape
        G = engine_b.compute_gramian(per_sample).reshape(B, T, B, T).sum(dim=(0, 2)) / B**2
        weights = weighting(G)
        (per_sample.mean(dim=0) @ weights).backward()

    rows = {"TorchJD autojac UPGrad": autojac, "TorchJD autogram UPGrad": autogram}
    if batched:
        rows["TorchJD autogram batched UPGrad"] = autogram_batched
    return rows


SCALING_RATIOS = [  # (row, against, label)
    ("EW", "plain loop", "EW / plain"),
    ("MGDA feature", "EW", "MGDA feat / EW"),
    ("MGDA feature", "per-task saliencies (feature floor)", "MGDA feat / feature floor"),
    ("per-task saliencies (feature floor)", "EW", "feature floor / EW"),
    ("per-task Jacobian (batched)", "per-task Jacobian (loop)", "Jacobian batched / loop"),
    ("UPGrad param", "per-task Jacobian (floor)", "UPGrad / floor"),
    ("PCGrad param", "per-task Jacobian (floor)", "PCGrad / floor"),
    ("EW + Rep-MTL", "EW", "Rep-MTL / EW"),
    ("TorchJD autojac UPGrad", "UPGrad param", "autojac / UPGrad"),
    ("TorchJD autogram UPGrad", "UPGrad param", "autogram / UPGrad"),
    ("TorchJD autogram batched UPGrad", "UPGrad param", "autogram batched / UPGrad"),
    ("plain loop (A/A twin)", "plain loop", "A/A noise (twin / plain)"),
    ("plain + finiteness check (EW floor)", "plain loop", "EW floor / plain"),
    ("EW", "plain + finiteness check (EW floor)", "EW / EW floor"),
    ("MGDA feature arithmetic (floor)", "EW", "MGDA floor / EW"),
    ("MGDA feature", "MGDA feature arithmetic (floor)", "MGDA feat / MGDA floor"),
    ("UPGrad param arithmetic (floor)", "per-task Jacobian (floor)", "UPGrad floor / Jacobian"),
    ("UPGrad param", "UPGrad param arithmetic (floor)", "UPGrad / UPGrad floor"),
    ("EW + Rep-MTL arithmetic (floor)", "EW", "Rep-MTL floor / EW"),
    ("EW + Rep-MTL", "EW + Rep-MTL arithmetic (floor)", "Rep-MTL / Rep-MTL floor"),
]
# each target: (label, row, against, bound, its arithmetic floor row or None)
SCALING_TARGETS = [
    ("EW ≤ 1.03× plain loop", "EW", "plain loop", 1.03, "plain + finiteness check (EW floor)"),
    ("feature-level Gramian (MGDA) ≤ 1.15× EW, every T ≤ 40", "MGDA feature", "EW", 1.15,
     "MGDA feature arithmetic (floor)"),
    ("UPGrad param ≤ 1.10× the per-task Jacobian", "UPGrad param", "per-task Jacobian (floor)", 1.10,
     "UPGrad param arithmetic (floor)"),
    ("Rep-MTL ≤ 1.35× EW, synthetic light-head encoders", "EW + Rep-MTL", "EW", 1.35,
     "EW + Rep-MTL arithmetic (floor)"),
]


def run_scaling(cfg) -> dict:
    out = {}
    for kind in cfg.kinds:
        for T in cfg.tasks:
            w = Workload(kind, T, cfg.batch[kind])
            methods = {n: create(n) for n in ("ew", "mgda", "upgrad", "pcgrad", "rep_mtl")}
            methods["uw"] = create("uw", num_tasks=T)
            rows = step_fns(w, methods)
            if T * cfg.batch[kind] > cfg.autogram_batched_max:  # its per-module Jacobians have B·T rows
                rows["TorchJD autogram batched UPGrad"] = _skipped(
                    f"B·T = {T * cfg.batch[kind]} > {cfg.autogram_batched_max}: per-module Jacobians of B·T rows")
            t0 = time.perf_counter()
            times = add_floor(measure(rows, cfg.rounds, cfg.min_run_time))
            t1 = time.perf_counter()
            mem = {}
            if cfg.memory and T in cfg.memory_tasks:
                for name, fn in rows.items():
                    if isinstance(times[name], list):
                        w.zero()
                        mem[name] = peak_memory(fn)
            out[f"{kind}/{T}"] = {"times": times, "memory": mem}
            log(f"scaling {kind} T={T}: {t1 - t0:.0f}s + memory {time.perf_counter() - t1:.0f}s  "
                + "  ".join(f"{lab}={ratio(times, a, b):.2f}" for a, b, lab in SCALING_RATIOS))
    return out


def render_scaling(res, cfg, plot_path: Path | None) -> list[str]:
    lines = ["## Scaling with the number of tasks", "",
             "Synthetic shared encoders with one light head per task (batch "
             f"{cfg.batch['conv']} for conv, {cfg.batch['mlp']} for MLP):",
             "",
             "- **conv**: 3×32×32 → three 3×3 convs (32, 64, 64 channels, stride 2, 2, 1) with GroupNorm "
             "→ Z of 64×8×8; head t = 1×1 conv to one map, MSE.",
             "- **MLP**: 64 → 512 → 512 → 256 (ReLU) → Z of 256; head t = Linear(256, 1), MSE.",
             "",
             "Rows: `plain loop` = `sum(losses).backward()`; `EW`/`UW` = `mtl_backward` with a loss weighting; "
             "`MGDA feature` = MGDA on the saliencies; `per-task Jacobian (loop)` = T backwards "
             "`L_t → shared + head_t` and nothing else; `per-task Jacobian (batched)` = the "
             "same Jacobian as TorchJD computes it (T head backwards to `∂L_t/∂Z`, then one vmapped encoder VJP, "
             "`is_grads_batched=True`); `per-task Jacobian (floor)` = the faster of the two by its median over the "
             "rounds (the cheapest exact per-task Jacobian measured: what the `/ floor` ratios divide by); "
             "`UPGrad`/`PCGrad param` = `mtl_backward(level=\"param\")`; `EW + Rep-MTL` = EW with the Rep-MTL "
             "regulariser (defaults); `EW + Rep-MTL arithmetic (floor)` = its arithmetic floor: T head backwards "
             "`S_t = ∂L_t/∂Z` with `create_graph=True`, the penalty (`mtlens.methods.rep_mtl.penalty_terms`, TSR + "
             "CSA in one pass), ONE backward of `Σ_t L_t + λ_tsr·TSR + λ_csa·CSA` to every parameter, the check, "
             "`.grad` (the same gradients as the engine row, bit for bit); the `… arithmetic (floor)` rows and the "
             "EW floor are the targets' floors (\"Targets at a glance\"); TorchJD 0.18 "
             "`autojac` = `mtl_backward(losses, features=z)` + `jac_to_grad(encoder params, UPGrad())`, "
             "`autogram` = `Engine(encoder, batch_dim=None).compute_gramian(torch.stack(losses))` + "
             "`UPGradWeighting` + `losses.backward(weights)`; `autogram batched` = `Engine(encoder, batch_dim=0)` "
             "on the B×T per-sample losses, the T×T Gramian of the mean losses taken as the block sum / B² of "
             "that (B·T)² Gramian, then the same weighting and backward (the form autogram is optimised for).",
             ""]
    rows = None
    for kind in cfg.kinds:
        lines += [f"### {kind}: ms/step (median)", ""]
        keys = [f"{kind}/{T}" for T in cfg.tasks if f"{kind}/{T}" in res]
        rows = list(res[keys[0]]["times"]) if keys else []
        lines += ["| row | " + " | ".join(f"T={k.split('/')[1]}" for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for r in rows:
            cells = []
            for k in keys:
                t = res[k]["times"].get(r)
                cells.append(f"{med(res[k]['times'], r) * 1e3:.1f}" if isinstance(t, list) else "error")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", f"### {kind}: same-run ratios (median over rounds)", "",
                  "| ratio | target | " + " | ".join(f"T={k.split('/')[1]}" for k in keys) + " |",
                  "|---|---|" + "---:|" * len(keys)]
        targets = {"EW / plain": "≤ 1.03", "MGDA feat / EW": "≤ 1.15", "MGDA feat / feature floor": "—",
                   "feature floor / EW": "—",
                   "Jacobian batched / loop": "—", "UPGrad / floor": "≤ 1.10",
                   "PCGrad / floor": "—", "Rep-MTL / EW": "≤ 1.35", "autojac / UPGrad": "≥ 1",
                   "autogram / UPGrad": "≥ 1", "autogram batched / UPGrad": "≥ 1",
                   "A/A noise (twin / plain)": "—", "EW floor / plain": "—", "EW / EW floor": "—",
                   "MGDA floor / EW": "—",
                   "MGDA feat / MGDA floor": "—", "UPGrad floor / Jacobian": "—", "UPGrad / UPGrad floor": "—",
                   "Rep-MTL floor / EW": "—", "Rep-MTL / Rep-MTL floor": "—"}
        for a, b, lab in SCALING_RATIOS:
            lines.append(f"| {lab} | {targets[lab]} | " + " | ".join(f"{ratio(res[k]['times'], a, b):.2f}"
                                                                      for k in keys) + " |")
        lines.append("| EW − plain, ms (engine's fixed cost) | — | " + " | ".join(
            f"{(ratio(res[k]['times'], 'EW', 'plain loop') - 1) * med(res[k]['times'], 'plain loop') * 1e3:+.2f}"
            for k in keys) + " |")
        errors = {r: res[k]["times"][r] for k in keys for r in rows if isinstance(res[k]["times"][r], str)}
        for r, e in errors.items():
            lines.append(f"\n`{r}` failed: {e}")
        if cfg.memory:
            mkeys = [k for k in keys if res[k]["memory"]]
            lines += ["", f"### {kind}: peak tensor memory during one step (MiB)", "",
                      "| row | " + " | ".join(f"T={k.split('/')[1]}" for k in mkeys) + " |",
                      "|---|" + "---:|" * len(mkeys)]
            for r in rows:
                lines.append(f"| {r} | " + " | ".join(
                    f"{res[k]['memory'][r] / 2**20:.1f}" if r in res[k]["memory"] else "—" for k in mkeys) + " |")
        lines.append("")
    if plot_path is not None:
        plot_scaling(res, cfg, plot_path)
        lines += [f"![step time vs T]({plot_path.name})", ""]
    return lines


def plot_scaling(res, cfg, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.kinds), figsize=(6 * len(cfg.kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], cfg.kinds):
        keys = [(T, f"{kind}/{T}") for T in cfg.tasks if f"{kind}/{T}" in res]
        rows = list(res[keys[0][1]]["times"]) if keys else []
        for r in rows:
            pts = [(T, med(res[k]["times"], r) * 1e3) for T, k in keys if isinstance(res[k]["times"][r], list)]
            if pts:
                style = "--" if r.startswith("TorchJD") else (":" if r in ("plain loop", "per-task Jacobian (floor)")
                                                            else "-")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=r)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(cfg.tasks)
        ax.set_xticklabels([str(t) for t in cfg.tasks])
        ax.set_xlabel("number of tasks T")
        ax.set_ylabel("ms / step (median)")
        ax.set_title(f"{kind} encoder, light heads")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================
# Rep-MTL cost
# =============================================================================================


class ASPPHead(nn.Module):
    """DeepLabV3+-style decoder head: ASPP (1×1, three 3×3 atrous convs at rates 6/12/18, image
    pooling; Chen et al. 2018, arXiv:1802.02611) → 1×1 projection → 3×3 conv → classifier. The
    low-level skip of DeepLabV3+ is left out: ``features`` must be the only route from the encoder
    to the losses, and the skip would be a second shared representation."""

    def __init__(self, c_in: int, c_out: int, width: int = 128, rates=(6, 12, 18)):
        super().__init__()

        def block(k, d):
            return nn.Sequential(nn.Conv2d(c_in, width, k, padding=0 if k == 1 else d, dilation=d, bias=False),
                                 nn.BatchNorm2d(width), nn.ReLU())

        self.branches = nn.ModuleList([block(1, 1)] + [block(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, width, 1, bias=False), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(width * (len(rates) + 2), width, 1, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU())
        self.refine = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(), nn.Conv2d(width, c_out, 1))

    def forward(self, z):
        size = z.shape[-2:]
        feats = [b(z) for b in self.branches]
        feats.append(F.interpolate(self.pool(z), size=size, mode="bilinear", align_corners=False))
        return self.refine(self.project(torch.cat(feats, dim=1)))


def dense_workload(heavy: bool, size: int, batch: int):
    """ResNet-18 (timm, random init, dilated to output stride 8) + 3 dense heads (13-class
    segmentation, depth, normals) as in step_time.py; ``heavy`` swaps the light heads for ASPP."""
    import timm
    from step_time import LightHead

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    body = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(4,), output_stride=8)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x)[0]

    enc = Enc()
    head = (lambda c: ASPPHead(512, c)) if heavy else (lambda c: LightHead(512, c))
    heads = nn.ModuleDict({"seg": head(13), "depth": head(1), "normal": head(3)})
    x = torch.randn(batch, 3, size, size, generator=g)
    seg_t = torch.randint(0, 13, (batch, size, size), generator=g)
    depth_t = torch.rand(batch, 1, size, size, generator=g)
    normal_t = F.normalize(torch.randn(batch, 3, size, size, generator=g), dim=1)

    def forward():
        z = enc(x)
        up = {t: F.interpolate(h(z), size=(size, size), mode="bilinear", align_corners=False) for t, h in heads.items()}
        return z, {"seg": F.cross_entropy(up["seg"], seg_t), "depth": (up["depth"] - depth_t).abs().mean(),
                   "normal": 1 - F.cosine_similarity(F.normalize(up["normal"], dim=1), normal_t, dim=1).mean()}

    return enc, heads, list(enc.parameters()) + list(heads.parameters()), forward


def repmtl_rows(enc, params, forward):
    ew, rep = create("ew"), create("rep_mtl")
    shared = list(enc.parameters())

    def zero():
        for p in params:
            p.grad = None

    def plain():
        zero()
        _, losses = forward()
        sum(losses.values()).backward()

    def ew_step():
        zero()
        z, losses = forward()
        mtl_backward(losses, features=z, shared_params=shared, method=ew)

    def rep_step():
        zero()
        z, losses = forward()
        mtl_backward(losses, features=z, shared_params=shared, method=ew, regularizers=[rep])

    def sal_only():  # the heads' saliency pass with create_graph alone: the first half of Rep-MTL's extra cost
        zero()
        z, losses = forward()
        for L in losses.values():
            torch.autograd.grad(L, z, create_graph=True)

    return {"plain loop": plain, "EW": ew_step, "EW + Rep-MTL": rep_step, "forward + T saliencies (graph)": sal_only}


def run_repmtl(cfg) -> dict:
    from step_time import make_workload

    out = {}
    loads = {"lenet": lambda: make_workload("lenet")}
    if not cfg.quick:
        loads["resnet18 light heads"] = lambda: make_workload("resnet18")
        loads["resnet18-OS8 + ASPP heads (DeepLabV3+-style)"] = lambda: dense_workload(True, cfg.dense_size, 2)
        loads["resnet18-OS8 + light heads (same input)"] = lambda: dense_workload(False, cfg.dense_size, 2)
    for name, make in loads.items():
        enc, _heads, params, forward = make()
        rows = repmtl_rows(enc, params, forward)
        t0 = time.perf_counter()
        times = measure(rows, cfg.rounds, cfg.min_run_time)
        out[name] = {"times": times}
        if "ASPP" in name and cfg.profile:
            out[name]["profile"] = profile_table(rows["EW + Rep-MTL"], rows["EW"])
        log(f"repmtl {name}: {time.perf_counter() - t0:.0f}s Rep-MTL/EW={ratio(times, 'EW + Rep-MTL', 'EW'):.2f}")
    return out


def profile_table(fn, base, top: int = 12) -> list[tuple[str, float, float]]:
    """Self CPU time per op (ms) of one step of ``fn`` and of ``base``, the ops that differ most."""
    from torch.profiler import ProfilerActivity, profile

    def self_times(f):
        f()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            f()
        return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}

    a, b = self_times(fn), self_times(base)
    diff = sorted(((k, a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)), key=lambda r: -(r[1] - r[2]))
    return diff[:top]


def render_repmtl(res) -> list[str]:
    lines = ["## Rep-MTL cost", "",
             "EW + the Rep-MTL regulariser (TSR + CSA, defaults) against EW alone. Rep-MTL needs the saliencies "
             "`S_t = ∂L_t/∂Z` *with their graph* (T head backwards, `create_graph=True`), the penalty, and a "
             "second-order backward through every head; the encoder is still differentiated once. Its extra "
             "cost over EW is therefore ≈ 2–3 head backwards per task, which is small for light heads and "
             "dominant for heavy ones. The `forward + T saliencies (graph)` row isolates the first half.",
             "",
             "| workload | plain ms | EW ms | Rep-MTL ms | EW / plain | Rep-MTL / EW (target ≤ 1.35 light) | "
             "saliency pass / EW |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        t = r["times"]
        lines.append(f"| {name} | {med(t, 'plain loop') * 1e3:.1f} | {med(t, 'EW') * 1e3:.1f} | "
                     f"{med(t, 'EW + Rep-MTL') * 1e3:.1f} | {ratio(t, 'EW', 'plain loop'):.2f} | "
                     f"{ratio(t, 'EW + Rep-MTL', 'EW'):.2f} | {ratio(t, 'forward + T saliencies (graph)', 'EW'):.2f} |")
    for name, r in res.items():
        if "profile" in r:
            lines += ["", f"Where the extra time goes on `{name}` (one step, `torch.profiler`, self CPU ms, the ops "
                      "that grow most):", "", "| op | EW + Rep-MTL | EW | extra |", "|---|---:|---:|---:|"]
            for k, a, b in r["profile"]:
                lines.append(f"| `{k}` | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    return lines + [""]


# =============================================================================================
# monitoring cost
# =============================================================================================


def monitor_rows(w, with_tsr: bool) -> dict[str, Callable[[], None]]:
    from mtlens.diagnose import SaliencyMonitor

    ew, mgda = create("ew"), create("mgda")
    fd = SaliencyMonitor(metrics=("fd",))
    fd_tsr = SaliencyMonitor(metrics=("fd", "tsr_entropy"))
    gram = SaliencyMonitor(metrics=("gds", "gms"), level="param")

    def fwd_only():
        w.zero()
        w.forward()

    def eng(m, lvl=None, mon=None):
        def step():
            w.zero()
            z, losses = w.forward()
            kw = mon.engine_kwargs(0, m) if mon is not None else {}
            if lvl is not None:
                kw.setdefault("level", lvl)
            rec = mtl_backward(losses, features=z, shared_params=w.shared, method=m, **kw)
            if mon is not None:
                mon(rec, 0)

        return step

    def floor():
        w.zero()
        _, losses = w.forward()
        for t, L in enumerate(losses.values()):
            vjp(L, w.shared + list(w.heads[t].parameters()), retain_graph=True)

    z, losses = w.forward()
    rec = mtl_backward(losses, features=z, shared_params=w.shared, method=create("mgda"), level="feature")
    w.zero()

    def fd_alone():  # FD's own cost on a feature-level record's saliencies (what the monitor adds)
        fd(rec, 0)

    sal = rec.saliencies.detach().abs()
    scratch = torch.empty_like(sal)
    jf = JacobianFloor(w)

    def gram_floor():  # floor of EW + GDS/GMS: the per-task Jacobian, its Gramian, Σ_t g_t (EW) from its rows
        w.zero()
        hg = jf.rows()
        gramian_from_blocks([jf.J])
        jf.write(jf.J.sum(0), hg)

    def fd_logs():  # FD's arithmetic floor: the T·|Z| logarithms of its entropies (one pass, no allocation)
        torch.log(sal, out=scratch)

    rows = {"forward only": fwd_only, "FD alone": fd_alone, "T·|Z| logarithms (FD floor)": fd_logs,
            "EW": eng(ew), "EW + FD": eng(ew, None, fd),
            "EW + GDS/GMS (param)": eng(ew, None, gram), "per-task Jacobian (floor)": floor,
            "Jacobian + Gramian + Σ g_t (GDS/GMS floor)": gram_floor,
            "MGDA feature": eng(mgda, "feature"), "MGDA feature + FD": eng(mgda, "feature", fd)}
    if with_tsr:
        rows["MGDA feature + FD + TSR entropy"] = eng(mgda, "feature", fd_tsr)
    return rows


def run_monitor(cfg) -> dict:
    out = {}
    for kind, T in cfg.monitor_loads:
        w = Workload(kind, T, cfg.batch[kind])
        t0 = time.perf_counter()
        out[f"{kind}/{T}"] = measure(monitor_rows(w, kind == "conv"), cfg.rounds, cfg.min_run_time)
        log(f"monitor {kind} T={T}: {time.perf_counter() - t0:.0f}s")
    return out


def render_monitor(res) -> list[str]:
    lines = ["## Monitoring cost (FD, GDS, GMS)", "",
             "Cost of a monitored step (`SaliencyMonitor`, metrics as named, every step) against the same step "
             "unmonitored. FD reads the saliencies: free for a gradient method at feature level (they are "
             "computed anyway), T head backwards for a loss weighting (`keep_saliencies=True`). GDS/GMS read the "
             "parameter-level Gramian: for a loss weighting that is the per-task Jacobian (T encoder backwards), "
             "so the last column compares the monitored step's extra time with the per-task Jacobian's own "
             "cost above a forward pass (1.00 = costs exactly what the Jacobian costs).",
             "",
             "`FD alone / MGDA step` times the monitor's own work (FD on a recorded feature-level step's "
             "saliencies) against the MGDA feature step in the same rounds: the direct measure of what FD adds, "
             "robust to the jitter that the difference of two step times carries. `FD floor / MGDA step` times "
             "`torch.log` of the T·|Z| saliency magnitudes alone (one pass into a reused buffer): the logarithms "
             "FD's entropies cannot do without, i.e. FD's arithmetic floor on this step.",
             "",
             "| workload | FD on MGDA feature (target ≤ 5 %) | FD alone / MGDA step | FD floor (T·\\|Z\\| logs) / MGDA "
             "step | FD + TSR on MGDA feature | FD on EW | GDS/GMS on EW: extra / Jacobian cost | "
             "EW + GDS/GMS / its floor (Jacobian + Gramian + Σ g_t) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, t in res.items():
        fd_feat = (ratio(t, "MGDA feature + FD", "MGDA feature") - 1) * 100
        tsr = (ratio(t, "MGDA feature + FD + TSR entropy", "MGDA feature") - 1) * 100
        fd_ew = (ratio(t, "EW + FD", "EW") - 1) * 100
        extra = (ratio(t, "EW + GDS/GMS (param)", "EW") - 1) * med(t, "EW")
        jac = med(t, "per-task Jacobian (floor)") - med(t, "forward only")
        tsr_cell = f"{tsr:+.1f} %" if tsr == tsr else "—"
        alone = ratio(t, "FD alone", "MGDA feature") * 100
        logs = ratio(t, "T·|Z| logarithms (FD floor)", "MGDA feature") * 100
        lines.append(f"| {key.replace('/', ', T=')} | {fd_feat:+.1f} % | {alone:.1f} % | {logs:.1f} % | {tsr_cell} | "
                     f"{fd_ew:+.1f} % | {extra / jac:.2f} | "
                     f"{ratio(t, 'EW + GDS/GMS (param)', 'Jacobian + Gramian + Σ g_t (GDS/GMS floor)'):.2f} |")
    return lines + [""]


# =============================================================================================
# stacked losses
# =============================================================================================


def run_stacked(cfg) -> dict:
    from step_time import make_workload

    out = {}
    loads = {"conv, T=11": None}
    if not cfg.quick:
        loads["resnet18 light heads, T=3"] = "resnet18"
    for name, wl in loads.items():
        if wl is None:
            w = Workload("conv", 3 if cfg.quick else 11, cfg.batch["conv"])
            enc, params, forward, shared = w.encoder, w.params, w.forward, w.shared
        else:
            enc, _h, params, forward = make_workload(wl)
            shared = list(enc.parameters())

        def zero(params=params):
            for p in params:
                p.grad = None

        def mk(form, m, lvl, zero=zero, forward=forward, shared=shared):
            def step():
                zero()
                z, losses = forward()
                if form == "stack":
                    losses = torch.stack(list(losses.values()))
                elif form == "vector":  # not a stack: no exact split, warns once
                    losses = torch.stack(list(losses.values())) * 1.0
                mtl_backward(losses, features=z, shared_params=shared, method=m, level=lvl)
            return step

        mg, up, ew = create("mgda"), create("upgrad"), create("ew")
        rows = {"EW dict": mk("dict", ew, None),
                "MGDA feature dict": mk("dict", mg, "feature"), "MGDA feature stack": mk("stack", mg, "feature"),
                "MGDA feature other vector": mk("vector", mg, "feature"),
                "UPGrad param dict": mk("dict", up, "param"), "UPGrad param stack": mk("stack", up, "param")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out[name] = measure(rows, cfg.rounds, cfg.min_run_time)
        log(f"stacked {name}: {time.perf_counter() - t0:.0f}s")
    return out


def render_stacked(res) -> list[str]:
    lines = ["## Stacked losses", "",
             "`mtl_backward(torch.stack(losses), ...)` against `mtl_backward({task: loss}, ...)`. The lean steps start "
             "each task's backward at the stack's input t, below its node; the general path hooks the stack's backward "
             "node for its per-task backwards (then removes the hook) so that a task's backward skips every branch "
             "that receives an exactly-zero gradient (exact; `mtlens.engine.stacked`). A loss vector made any other "
             "way (`other vector` = `torch.stack(losses) * 1.0`) has no exact split: it runs every head for every "
             "task and warns once, naming the fix (pass a dict or list).",
             "",
             "| workload | MGDA feature dict / EW | stack / EW | other vector / EW | UPGrad param stack / dict |",
             "|---|---:|---:|---:|---:|"]
    for name, t in res.items():
        lines.append(f"| {name} | {ratio(t, 'MGDA feature dict', 'EW dict'):.2f} | "
                     f"{ratio(t, 'MGDA feature stack', 'EW dict'):.2f} | "
                     f"{ratio(t, 'MGDA feature other vector', 'EW dict'):.2f} | "
                     f"{ratio(t, 'UPGrad param stack', 'UPGrad param dict'):.2f} |")
    return lines + [""]


# =============================================================================================
# cached decisions
# =============================================================================================


def _decision_cache():
    """The engine's ``DecisionCache`` (``mtl_backward(..., cache=DecisionCache(k))``), if this build has it."""
    try:
        from mtlens.engine.backward import DecisionCache
    except ImportError:
        return None
    return DecisionCache if "cache" in inspect.signature(mtl_backward).parameters else None


def _engine_update_every() -> bool:
    return _decision_cache() is not None


def run_cached(cfg) -> dict:
    """Mean step time over k consecutive steps with a decision every k steps."""
    out = {}
    kind, T = cfg.cached_load
    w = Workload(kind, T, cfg.batch[kind])
    cache_cls = _decision_cache()
    for mname in ("nash_mtl", "upgrad"):
        rows = {}
        for k in cfg.ks:
            m, state = create(mname), {}

            def block(k=k, m=m, state=state):  # k steps: one decision, k - 1 cached
                if cache_cls is not None:
                    state["cache"] = cache_cls(k)
                for i in range(k):
                    w.zero()
                    z, losses = w.forward()
                    if cache_cls is not None:
                        mtl_backward(losses, features=z, shared_params=w.shared, method=m, level="param",
                                     cache=state["cache"])
                    elif i == 0:
                        rec = mtl_backward(losses, features=z, shared_params=w.shared, method=m, level="param")
                        state["w"] = rec.weights.to(torch.float32)
                    else:  # what a cached step must cost: one backward of Σ_t w_t L_t
                        (torch.stack(list(losses.values())) @ state["w"]).backward()

            rows[f"k={k}"] = block
        t0 = time.perf_counter()
        times = measure(rows, cfg.rounds, cfg.min_run_time)
        for k in cfg.ks:  # per step
            if isinstance(times[f"k={k}"], list):
                times[f"k={k}"] = [t / k for t in times[f"k={k}"]]
        out[mname] = times
        log(f"cached {mname}: {time.perf_counter() - t0:.0f}s")
    return out


def render_cached(res, cfg) -> list[str]:
    how = ("the engine's `mtl_backward(..., cache=DecisionCache(k))`" if _engine_update_every() else
           "decisions cached by hand (`mtl_backward` on step 0 of each block of k, then k − 1 steps of one "
           "backward of `Σ_t w_t L_t` with the last weights — the cost any cached step has; the engine's own "
           "`update_every` was not available in this build)")
    kind, T = cfg.cached_load
    lines = ["## Cached decisions", "",
             f"Mean step time over blocks of k steps with one decision per block ({how}), parameter level, "
             f"{kind} workload, T = {T}. Speed-up = time at k = 1 / time at k, same run. The Nash-MTL paper "
             "(Navon et al., ICML 2022, arXiv:2202.01017) reports 3.7× at k = 5 and 9.8× at k = 50 for its own "
             "cost when the weights are updated every k steps; the speed-up bound is (full step) / (one weighted "
             "backward), reached as k grows.", "",
             "| method | " + " | ".join(f"k={k}" for k in cfg.ks) + " |", "|---|" + "---:|" * len(cfg.ks)]
    for m, t in res.items():
        lines.append(f"| {m} ms/step | " + " | ".join(f"{med(t, f'k={k}') * 1e3:.1f}" for k in cfg.ks) + " |")
        lines.append(f"| {m} speed-up | " + " | ".join(f"{ratio(t, f'k={cfg.ks[0]}', f'k={k}'):.2f}×"
                                                      for k in cfg.ks) + " |")
    return lines + [""]


# =============================================================================================
# QM9 (real model, T = 11)
# =============================================================================================


def qm9_builder():
    """(encoder, heads, forward(encoder, heads) → (Z, losses)) for QM9's MPNN on one training batch
    (:func:`mtlens.bench.qm9_workload.qm9_workload`), or None when this build of mtlens has none."""
    try:
        from mtlens.bench.qm9_workload import qm9_workload
    except ImportError:
        return None

    def build(batch: int = 120):  # the papers' batch size
        enc, heads, _params, forward = qm9_workload(batch)
        # forward() returns the 11 losses in the order of ``heads`` (QM9_TASKS)
        return enc, nn.ModuleList(heads.values()), lambda _enc, _heads: forward()

    return build


def run_qm9(cfg) -> dict:
    build = qm9_builder()
    if build is None:
        log("qm9: no builder in this build; skipped")
        return {}
    t0 = time.perf_counter()

    def make():  # same seed: same weights and batch (the autogram row's twin, see step_fns)
        torch.manual_seed(0)
        return ModelWorkload(*build(cfg.qm9_batch))

    w = make()
    w.twin = make
    methods = {n: create(n) for n in ("ew", "mgda", "upgrad", "pcgrad", "rep_mtl")}
    methods["uw"] = create("uw", num_tasks=len(w.heads))
    rows = step_fns(w, methods, batched_autogram=False)  # batch_dim=0: no GRU, and graphs are not a batch dim
    for r in ("UW (loss weighting)", "PCGrad param"):  # time: one parameter-level step takes seconds here
        rows.pop(r)
    times = add_floor(measure(rows, min(2, cfg.rounds), cfg.min_run_time))  # a parameter-level step takes seconds
    log(f"qm9: {time.perf_counter() - t0:.0f}s")
    return {"times": times, "batch": cfg.qm9_batch}


def render_qm9(res) -> list[str]:
    if not res:
        return ["## QM9 (T = 11, real model)", "", "Not measured: this build has no QM9 model/batch builder.", ""]
    t = res["times"]
    lines = ["## QM9 (T = 11, real model)", "",
             f"The MPNN of Nash-MTL/LibMTL (`mtlens.bench.qm9_workload`: `mpnn-qm9`, NNConv + GRU + Set2Set, "
             f"complete graphs with distances) with 11 linear heads, on one batch of {res['batch']} training molecules "
             "(the papers use 120; the edge network's per-edge 64×64 matrices make one CPU step take seconds at "
             "120). TorchJD autogram runs with `batch_dim=None` (its batched mode rejects the GRU).", "",
             "| row | ms/step | × EW | × per-task Jacobian |", "|---|---:|---:|---:|"]
    lines.extend(f"| {r} | {med(t, r) * 1e3:.1f} | {ratio(t, r, 'EW'):.2f} | "
                 f"{ratio(t, r, 'per-task Jacobian (floor)'):.2f} |" if isinstance(t[r], list)
                 else f"| {r} | error: {t[r]} | | |" for r in t)
    return lines + [""]


# =============================================================================================
# targets
# =============================================================================================


NOISE = 0.02
"""Points above their bound by at most this much (relative: 2 % of the bound) while their floor is within it are
counted apart, as *within noise*: the run's A/A pair (``plain loop (A/A twin)`` / ``plain loop``) and repeated runs
move a ratio by about this much (docs/performance.md, "Noise"). They are not counted as met."""


def classify(points: list[tuple[float, float, str]], bound: float, higher_is_better: bool = False) -> dict:
    """Verdict over the points ``(value, floor, where)`` of one target.

    Each point is *met* (within the bound); *floor* (beyond it, and the arithmetic floor measured in the same
    round is beyond it too: no exact implementation meets the target there); *noise* (beyond it by at most
    :data:`NOISE` relative to the bound, with the floor within it); *engine* (beyond it by more, with the floor
    within it: the engine's own cost); *no floor* (beyond it, and the target has no floor row: the cause is not
    measured here); or *not measured* (NaN: an error or a skipped row). Returns the lists of
    places per category and the verdict: ``yes`` (all met), ``floor`` (none *engine*/*noise*/*not measured*, at
    least one *floor*), ``**no**`` otherwise."""
    out: dict = {"met": [], "floor": [], "noise": [], "engine": [], "no floor": [], "not measured": []}
    for v, f, where in points:
        if v != v:
            out["not measured"].append(where)
            continue
        beyond = (v < bound) if higher_is_better else (v > bound)
        if not beyond:
            out["met"].append(where)
        elif f == f and ((f < bound) if higher_is_better else (f > bound)):
            out["floor"].append(where)
        elif abs(v - bound) <= NOISE * bound:
            out["noise"].append(where)
        elif f != f:  # no floor row for this target: beyond it, cause not measured here
            out["no floor"].append(where)
        else:
            out["engine"].append(where)
    bad = out["engine"] or out["noise"] or out["no floor"] or out["not measured"]
    out["verdict"] = "**no**" if bad or not points else ("floor" if out["floor"] else "yes")
    return out


def _detail(c: dict) -> str:
    parts = [f"met {len(c['met'])}"]
    for k, label in (("floor", "floor beyond the target"), ("noise", f"within {NOISE:.0%} (noise)"),
                     ("engine", "engine's own cost"), ("no floor", "beyond it, no floor row"),
                     ("not measured", "not measured")):
        if c[k]:
            parts.append(f"{label} {len(c[k])} ({', '.join(c[k])})")
    return "; ".join(parts)


def render_targets(results) -> list[str]:
    """One row per target of the performance issue: the worst same-run value, where, the arithmetic floor's value
    there and the largest ratio of the engine row to its floor over the points (what the engine adds), and the
    per-point verdict (:func:`classify`)."""
    rows = []  # (name, worst, where, floor there, engine/floor worst, classification)

    def where(key: str) -> str:
        return key.replace("/", " T=")

    def worst(pts, higher_is_better=False):
        pts = [p for p in pts if p[0] == p[0]]
        if not pts:
            return float("nan"), float("nan"), "not measured"
        return (min if higher_is_better else max)(pts, key=lambda p: p[0])

    def engine_over_floor(pts):
        r = [v / f for v, f, _ in pts if v == v and f == f and f > 0]
        return max(r) if r else float("nan")

    sc = results.get("scaling", {})
    for name, row, against, bound, floor_row in SCALING_TARGETS if sc else []:
        pts = [(ratio(r["times"], row, against), ratio(r["times"], floor_row, against), where(k))
               for k, r in sc.items()]
        v, f, w = worst(pts)
        rows.append((name, v, w, f, engine_over_floor(pts), classify(pts, bound)))
    for name, other in (("UPGrad param ≤ TorchJD autojac (autojac / mtlens ≥ 1)", "TorchJD autojac UPGrad"),
                        ("UPGrad param ≤ TorchJD autogram (autogram / mtlens ≥ 1)", "TorchJD autogram UPGrad")):
        if not sc:
            break
        pts = [(ratio(r["times"], other, "UPGrad param"), float("nan"), where(k)) for k, r in sc.items()]
        v, f, w = worst(pts, higher_is_better=True)
        rows.append((name, v, w, f, float("nan"), classify(pts, 1.0, higher_is_better=True)))
    rp = results.get("repmtl", {})
    if rp:
        pts = [(ratio(r["times"], "EW + Rep-MTL", "EW"), float("nan"), n) for n, r in rp.items() if "ASPP" not in n]
        v, f, w = worst(pts)
        rows.append(("Rep-MTL ≤ 1.35× EW, light heads (fixed workloads)", v, w, f, float("nan"), classify(pts, 1.35)))
    mo = results.get("monitor", {})
    if mo:
        pts = [(ratio(t, "FD alone", "MGDA feature") * 100, ratio(t, "T·|Z| logarithms (FD floor)", "MGDA feature")
                * 100, where(k)) for k, t in mo.items()]
        v, f, w = worst(pts)
        rows.append(("FD monitor ≤ 5 % (FD's own time / the MGDA feature step, in %)", v, w, f,
                     engine_over_floor(pts), classify(pts, 5.0)))
        pts = [(ratio(t, "EW + GDS/GMS (param)", "Jacobian + Gramian + Σ g_t (GDS/GMS floor)"), 1.0, where(k))
               for k, t in mo.items()]
        v, f, w = worst(pts)
        rows.append(("GDS/GMS cost the Jacobian (+ its Gramian) and no more: EW + GDS/GMS / its floor ≤ 1.10", v, w,
                     f, float("nan"), classify(pts, 1.10)))
    lines = ["## Targets at a glance", "",
             "Worst same-run value over the points of this run (details in the sections below). **Floor**: every "
             "target has an *arithmetic floor* row — the same result computed by bare torch calls with no engine "
             "(the cheapest exact way measured; rows `… (floor)` below) — timed in the same rounds. Each point is "
             "**met**; **floor beyond the target** (its floor is beyond the bound too: no exact implementation "
             f"measured meets it there); **within {NOISE:.0%} (noise)** of the bound with its floor within it; or "
             "**the engine's own cost**. `engine / floor` is the largest ratio of the engine row to its floor over "
             "the points (what the engine adds). Verdict: `yes` = every point met; `floor` = every other point is "
             "floor-bound; otherwise **no**. The floors and the per-task Jacobian (loop) call autograd's engine "
             "as mtlens does (`mtlens.engine._autograd.vjp`: `torch.autograd.grad` without its Python argument "
             "handling, the same gradients), so the engine is not credited with skipping that wrapper against "
             "them; the `plain loop` is `sum(losses).backward()` as users write it.", "",
             "| target | worst measured | where | floor there | engine / floor (max) | verdict | points |",
             "|---|---:|---|---:|---:|---|---|"]
    for name, v, w, f, ef, c in rows:
        fcell = f"{f:.3f}" if f == f else "—"
        efcell = f"{ef:.3f}" if ef == ef else "—"
        lines.append(f"| {name} | {v:.3f} | {w} | {fcell} | {efcell} | {c['verdict']} | {_detail(c)} |")
    return lines + ["", "Why a target is missed, and the floor each cost has, is analysed in "
                    "[performance.md](performance.md).", "", ""]


# =============================================================================================
# main
# =============================================================================================

SECTIONS = ("scaling", "repmtl", "monitor", "stacked", "cached", "qm9", "methods")
_t_start = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} threads used), "
            f"load average {load[0]:.1f} at start, torch {torch.__version__}, Python {platform.python_version()}")


def noise_line(load_start: float, load_end: float, cores: int) -> str:
    """The page's noise statement, from the load averages measured around the run (not assumed)."""
    busy = max(load_start, load_end)
    if busy < 0.75 * cores:
        return (f"- **Noise**: the machine was otherwise idle (load average {load_start:.1f} at the start and "
                f"{load_end:.1f} at the end on {cores} cores, this run's own thread included). Ratios still carry "
                "per-step jitter: `plain loop (A/A twin)` runs the very step of `plain loop` under another name, so "
                "its ratio to it (`A/A noise` in the ratio tables) is the run's own measure of how far a ratio "
                "strays from 1 by noise.")
    return (f"- **Noise**: the machine was shared during this run (load average {load_start:.1f} at the start, "
            f"{load_end:.1f} at the end on {cores} cores). Under such load absolute times move by up to 2× between "
            "rounds and a single same-run ratio by ±0.2–0.3 (see `A/A noise`: one step timed under two names); trends "
            "over T and differences of 2× or more are what such a run shows. Rerun on an idle machine (more "
            "`--rounds`) for verdicts near a target.")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config(args):
    c = argparse.Namespace()
    c.quick = args.quick
    c.kinds = ["conv", "mlp"]
    c.tasks = [2, 3] if args.quick else [2, 3, 5, 11, 20, 40]
    if args.tasks:
        c.tasks = [int(t) for t in args.tasks.split(",")]
    c.batch = {"conv": 8, "mlp": 32 if args.quick else 256}
    c.autogram_batched_max = 256
    c.rounds = args.rounds or (1 if args.quick else 5)
    c.min_run_time = args.min_run_time or (0.01 if args.quick else 0.1)
    c.memory = not args.no_memory
    c.memory_tasks = c.tasks
    c.profile = not args.quick
    c.dense_size = 96
    c.monitor_loads = [("mlp", 3)] if args.quick else [("conv", 3), ("conv", 11), ("mlp", 11)]
    c.cached_load = ("mlp", 3) if args.quick else ("mlp", 11)
    c.ks = [1, 5] if args.quick else [1, 5, 50]
    c.qm9_batch = 4 if args.quick else 8
    return c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run, not a measurement")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per table (default 5, QM9 2; quick 1)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds of steps per row and round (default 0.1; quick 0.01)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared, loaded machine)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--methods-workloads", default="lenet",
                    help="workloads of the all-methods table (step_time.py's: lenet, resnet18)")
    ap.add_argument("--tasks", default=None, help="comma list of T for the scaling study (default 2,3,5,11,20,40)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for benchmarks.md and plots (default docs/, for the full run only: a partial run "
                         "needs it)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if args.out is None:
        partial = [flag for flag, on in (("--quick", args.quick), ("--sections", set(sections) != set(SECTIONS)),
                                         ("--tasks", args.tasks is not None), ("--no-memory", args.no_memory)) if on]
        if partial:  # docs/benchmarks.md is the published page: only the full command replaces it
            ap.error(f"{' '.join(partial)} without --out would replace the published docs/benchmarks.md with a "
                     "partial page; pass --out DIR (e.g. --out /tmp/bench), or --out docs to replace it on purpose")
        args.out = HERE.parent / "docs"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    header_machine = machine()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results: dict = {}
    body: list[str] = []
    if "scaling" in sections:
        results["scaling"] = run_scaling(cfg)
        body += render_scaling(results["scaling"], cfg, args.out / "benchmarks_scaling.png")
    if "repmtl" in sections:
        results["repmtl"] = run_repmtl(cfg)
        body += render_repmtl(results["repmtl"])
    if "monitor" in sections:
        results["monitor"] = run_monitor(cfg)
        body += render_monitor(results["monitor"])
    if "stacked" in sections:
        results["stacked"] = run_stacked(cfg)
        body += render_stacked(results["stacked"])
    if "cached" in sections:
        results["cached"] = run_cached(cfg)
        body += render_cached(results["cached"], cfg)
    if "qm9" in sections:
        results["qm9"] = run_qm9(cfg)
        body += render_qm9(results["qm9"])
    if "methods" in sections:
        import step_time

        st_args = argparse.Namespace(jacobian="loop")
        wls = args.methods_workloads.split(",")
        meths = ["ew", "mgda", "upgrad"] if cfg.quick else ["ew"] + step_time.available("gradient")
        res = {w: step_time.run(w, meths, cfg.min_run_time, True, "loop", 2) for w in wls}
        text = step_time.render(res, st_args).split("\n")
        body += [f"## Every method ({', '.join(wls)})", ""] + [
            ln.replace("## ", "### ") for ln in text if not ln.startswith(("# Benchmarks", "Command:", "Measured"))]
        results["methods"] = {w: r[1] for w, r in res.items()}
    elapsed = time.perf_counter() - _t_start
    cmd = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = ["# Benchmarks", "",
            "Generated by one command; every table and plot below comes from this run:", "",
            f"    {cmd.strip()}", "",
            f"- **Date**: {started.strftime('%Y-%m-%d %H:%M UTC')}, {elapsed / 60:.1f} min, mtlens commit "
            f"`{git_rev()}`.",
            f"- **Machine**: {header_machine}; load average {os.getloadavg()[0]:.1f} at the end.",
            "- **Method**: the rows of a table are called in turn, one step each (a fresh seeded random order "
            f"every cycle), so the steps of any two rows alternate; {cfg.rounds} rounds in which every row runs "
            f"≥ {cfg.min_run_time} s of steps; a row's time is the median of its steps in a round, every ratio the "
            "median over rounds of the two rows' times in the same round (`measure` in `benchmarks/run_all.py`). "
            "Peak memory: tensor storage created during one step and alive at once, tracked per op by a "
            "`TorchDispatchMode` with weak references to the storages "
            "(a tracemalloc of tensor storage; see `benchmarks/run_all.py`).",
            noise_line(load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
                       os.cpu_count() or 1),
            ""]
    text = "\n".join(head + render_targets(results) + body) + "\n"
    (args.out / "benchmarks.md").write_text(text)
    (args.out / "benchmarks.json").write_text(json.dumps(_jsonable(results), indent=1))
    log(f"wrote {args.out / 'benchmarks.md'} in {elapsed / 60:.1f} min")
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    return x if isinstance(x, (int, float, str, type(None))) else str(x)


if __name__ == "__main__":
    main()
