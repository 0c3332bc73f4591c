"""Worker of the data-parallel differential harness (``test_ddp_parity.py``; 2 gloo processes, one spawn).

For every (construct, route) pair of :func:`plan`, each rank runs the route twice on a fresh model (same seed):

* the reference: ``mtl_backward(..., distributed=False)`` in this one process on the **global** batch;
* data-parallel: ``mtl_backward(..., distributed=<group>)`` on this rank's half of it;

and keeps what each wrote into ``.grad`` (every parameter of the model and of the method), the method's state, the
steps' ``skipped`` flags and any error, for the test to compare. The constructs are test_grad_parity's (its builder
functions, with their fixed inputs made twice as large — the global batch — and halved per rank by patching its
input helpers ``_x``/``_tokens``), plus three of this module that only data parallelism makes interesting:
``routed`` (an encoder expert and a head reached only by samples that sit on one rank), ``nan_grad`` (a finite loss
whose gradient is not finite on one rank's share only) and ``nan_loss`` (a non-finite loss on one rank only).

Every step goes through ``STEPS`` calls (micro-batches accumulated into ``.grad``). The references are split between
the ranks (a reference needs no collective). Each data-parallel run uses a process group of its own (``new_group``)
with a short timeout, the default group carrying only this worker's bookkeeping: a run that desynchronises the ranks
(one rank raising before a collective its peer waits in) fails that run alone, not every later one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import test_grad_parity as gp
import torch
import torch.distributed as dist
from _spawn import leave
from torch import Tensor, nn

from mtlens.engine import DecisionCache, LookAhead, TaskGradients, apply_decision, compute_task_gradients, mtl_backward
from mtlens.engine.distributed import resolve
from mtlens.methods import create

WORLD = 2
STEPS = 3  # mtl_backward calls accumulated into .grad
T = 3
# a desynchronised run fails after this, not the whole module; not shorter: a rank the scheduler stalls (a loaded CI
# machine) or that compiles while its peer waits (compiled_ragged: dynamo recompiles in every run) is not out of step
RUN_TIMEOUT = datetime.timedelta(seconds=30)


# ---- the global batch and its shards ---------------------------------------------------------------------------
_SHARD: dict[str, int | None] = {"rank": None}  # None: the whole global batch (the reference)
_orig_x, _orig_tokens = gp._x, gp._tokens


def _take(full: Tensor) -> Tensor:
    """This rank's half of a global batch (dimension 0), or all of it for the reference."""
    r = _SHARD["rank"]
    if r is None:
        return full
    b = full.shape[0] // WORLD
    return full[r * b:(r + 1) * b]


def _x(i: int, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return _take(_orig_x(i, shape[0] * WORLD, *shape[1:], dtype=dtype))


def _tokens(i: int, *shape: int, high: int = 11) -> Tensor:
    return _take(_orig_tokens(i, shape[0] * WORLD, *shape[1:], high=high))


gp._x, gp._tokens = _x, _tokens  # the builders read them by their module's global names at every step


# ---- constructs of this module ---------------------------------------------------------------------------------
class _Routed(nn.Module):
    """A mixture of two experts: every sample goes through ``a``; ``b`` runs only when some sample is flagged
    (``x[:, 0] > 1``), as mixture-of-experts layers skip an expert no token was routed to."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        out = self.a(h)
        sel = x[:, 0] > 1.0
        if bool(sel.any()):
            out = out.clone()
            out[sel] = out[sel] + self.b(h[sel])
        return torch.tanh(out)


def _routed_x_full(i: int) -> Tensor:
    """8 samples (the global batch); the flagged ones (4 and 6) both sit in rank 1's half."""
    x = _orig_x(i, 4 * WORLD, 5).clone()
    x[:, 0] = -5.0
    x[4, 0] = x[6, 0] = 5.0
    return x


def routed(T: int) -> gp.Built:
    """Data-dependent reach: the expert ``enc.b`` (shared) and the head ``rare`` (task 0's) are reached only by the
    flagged samples, all of them on rank 1: on rank 0 no loss reaches them, in the global batch some does."""
    enc, heads, rare = _Routed(), gp._mlp_heads(T), nn.Linear(6, 1)
    net = nn.ModuleDict({"enc": enc, "heads": heads, "rare": rare})

    def step(i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = built.inputs(i)  # type: ignore[attr-defined]
        z = enc(x)
        losses = {f"t{t}": (h(z) ** 2).mean() for t, h in enumerate(heads)}
        sel = x[:, 0] > 1.0
        if bool(sel.any()):  # a mean over this share's samples, as every loss
            losses["t0"] = losses["t0"] + (rare(z[sel]) ** 2).sum() / x.shape[0]
        return z, losses

    built = gp.Built(net, step, lambda: list(enc.parameters()))
    built.task_params = lambda: [*heads.parameters(), *rare.parameters()]  # type: ignore[attr-defined]
    built.inputs = lambda i: _take(_routed_x_full(i))  # type: ignore[attr-defined]
    return built


def routed_found(T: int) -> gp.Built:
    """``routed`` without ``task_params``: the heads are found from each rank's graph, which differs between the
    ranks (``rare`` only on rank 1); the engine refuses it, naming the fix (``task_params``)."""
    built = routed(T)
    del built.task_params  # type: ignore[attr-defined]
    return built


class _SqrtAbs(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.abs().sqrt()  # d/dh = inf at h = 0: a finite loss, a non-finite gradient


def nan_grad(T: int) -> gp.Built:
    """A finite loss whose gradient is not finite on rank 1's share of micro-batch 1 only (a zero input row through
    a bias-free layer and ``sqrt|h|``: 0 · inf)."""
    enc = nn.Sequential(nn.Linear(5, 6, bias=False), _SqrtAbs(), nn.Linear(6, 6), nn.Tanh())

    def inp(i: int) -> Tensor:
        x = _orig_x(i, 4 * WORLD, 5).clone()
        if i == 1:
            x[6] = 0.0
        return _take(x)

    return gp._simple(enc, gp._mlp_heads(T), inp)


def nan_loss(T: int) -> gp.Built:
    """A non-finite input on rank 1's share of micro-batch 1 only: every loss there is NaN on that rank."""
    def inp(i: int) -> Tensor:
        x = _orig_x(i, 4 * WORLD, 5).clone()
        if i == 1:
            x[5, 2] = float("nan")
        return _take(x)

    return gp._simple(nn.Sequential(nn.Linear(5, 6), nn.Tanh()), gp._mlp_heads(T), inp)


def routed_nan(T: int) -> gp.Built:
    """``routed`` with a non-finite gradient on rank 0's share of micro-batch 1 (a zero input row through a
    bias-free ``sqrt|h|`` layer added to the encoder's input): the step overflows (or is skipped) where rank 0 does
    not reach the expert ``enc.b`` and rank 1 does."""
    built = routed(T)
    enc = built.net["enc"]
    gate = nn.Linear(5, 5, bias=False)
    built.net["gate"] = gate
    inner = enc.forward

    def forward(x: Tensor) -> Tensor:
        return inner(x + gate(x).abs().sqrt())

    enc.forward = forward  # type: ignore[method-assign]
    shared = built.shared
    built.shared = lambda: [*gate.parameters(), *shared()]

    def x_nan(i: int) -> Tensor:
        x = _routed_x_full(i)
        if i == 1:
            x[1] = 0.0  # in rank 0's half, unflagged
        return _take(x)

    built.inputs = x_nan  # type: ignore[attr-defined]
    return built


def missing_task(T: int) -> gp.Built:
    """A training loop that leaves out a task with no labelled sample in the batch: rank 1's share of micro-batch 1
    has none for task ``t2`` (the global batch has), so that rank passes one loss fewer. Refused on every rank."""
    built = gp.plain(T)
    step = built.step

    def dropping(i: int) -> tuple[Tensor, dict[str, Tensor]]:
        z, losses = step(i)
        if i == 1 and _SHARD["rank"] == 1:
            del losses[f"t{T - 1}"]
        return z, losses

    built.step = dropping
    return built


# ---- what runs -------------------------------------------------------------------------------------------------
# test_grad_parity's constructs left out, and why (asserted to be its whole list minus these by the test module)
EXCLUDED = {
    # its task 0's loss is a SUM over the batch; data parallelism's contract is per-task losses that are MEANS over
    # each rank's share (docs/engine.md, "Data parallelism"): its gradient is 1/W of the global batch's by design
    "broadcast": "a sum loss, not a mean over the share",
    # dropout: each rank draws the masks of its own share (same seed, half the rows), not the global batch's
    "dropout": "dropout masks drawn per rank",
    "compiled": "dropout masks drawn per rank (a compiled encoder with dropout)",
    "lstm_deep": "dropout masks drawn per rank (between the LSTM's layers)",
}
BUILDERS: dict[str, Callable[[int], gp.Built]] = {
    **{n: f for n, f in gp.CASES.items() if n not in EXCLUDED},
    "routed": routed,
    "routed_found": routed_found,
    "missing_task": missing_task,
}
NONFINITE_CASES = {"nan_grad": nan_grad, "nan_loss": nan_loss, "routed_nan": routed_nan}
ALL_BUILDERS = {**BUILDERS, **NONFINITE_CASES}


@dataclass(frozen=True)
class Route:
    id: str
    method: str
    level: str | None = None
    kw: tuple[tuple[str, Any], ...] = ()
    jacobian: str = "loop"
    rep_mtl: bool = False
    features: bool = True
    update_every: int = 1
    nonfinite: str = "raise"
    scaler: bool = False
    retain: bool = False  # each micro-batch: one step with retain_graph=True, then a second on the same graph
    wrap: bool = False  # data-parallel run: forward through nn.parallel.DistributedDataParallel under no_sync()
    sync: bool = False  # with wrap: the forward outside no_sync() (DDP prepares a reduction the engine never fires)
    ddp_backward: bool = False  # data-parallel run: DDP's own loss.backward() of the sum (EW), no mtl_backward
    transform: str | None = None  # loss_transform
    lookahead: bool = False  # a bilevel method: method.meta_step(LookAhead(...)) over the step's process group first
    accumulate: bool = False  # the STEPS micro-batches: compute_task_gradients each, TaskGradients.accumulate, one
    # decision and apply_decision (docs/engine.md, "Gradient accumulation"), with the step's process group
    keep_saliencies: bool = False


ROUTES = [
    Route("ew-loss", "ew"),
    Route("uw-loss", "uw"),
    Route("mgda-feature", "mgda", "feature"),
    Route("upgrad-param", "upgrad", "param"),
    Route("upgrad-param-batched", "upgrad", "param", jacobian="batched"),
    Route("upgrad-param-no-features", "upgrad", "param", features=False),
    Route("pcgrad-param", "pcgrad", "param", kw=(("seed", 0),)),
    Route("upgrad-param-cached", "upgrad", "param", update_every=2),
]
REP_ROUTES = [
    Route("ew-loss-rep_mtl", "ew", rep_mtl=True),
    Route("mgda-feature-rep_mtl", "mgda", "feature", rep_mtl=True),
]
DDP_ROUTES = [
    Route("ddp-backward", "ew", ddp_backward=True),
    Route("ew-loss-ddp-wrap", "ew", wrap=True),
    Route("upgrad-param-ddp-wrap", "upgrad", "param", wrap=True),
    Route("ew-loss-ddp-wrap-sync", "ew", wrap=True, sync=True),
    Route("upgrad-param-ddp-wrap-sync", "upgrad", "param", wrap=True, sync=True),
]
DDP_CASES = ["plain", "unreached", "frozen", "sparse_embedding", "float64", "routed", "routed_found"]
RETAIN_ROUTES = [
    Route("ew-loss-retain", "ew", retain=True),
    Route("mgda-feature-retain", "mgda", "feature", retain=True),
    Route("upgrad-param-retain", "upgrad", "param", retain=True),
]
RETAIN_CASES = ["plain", "unreached", "routed", "routed_found"]
SKIP_ROUTES = [
    Route("ew-loss-skip", "ew", nonfinite="skip"),
    Route("dwa-loss-skip", "dwa", nonfinite="skip"),
    Route("mgda-feature-skip", "mgda", "feature", nonfinite="skip"),
    Route("upgrad-param-skip", "upgrad", "param", nonfinite="skip"),
]
SCALER_ROUTES = [
    Route("ew-loss-scaler", "ew", scaler=True),
    Route("mgda-feature-scaler", "mgda", "feature", scaler=True),
    Route("upgrad-param-scaler", "upgrad", "param", scaler=True),
]
SCALER_CASES = ["plain", "sparse_embedding", "routed", "nan_grad", "routed_nan"]
OPTION_ROUTES = [
    Route("ew-loss-log", "ew", transform="log"),  # the general loss-level path: losses valued at the global mean
    Route("upgrad-param-log", "upgrad", "param", transform="log"),
    Route("mgda-feature-log", "mgda", "feature", transform="log"),
    Route("ew-loss-saliencies", "ew", keep_saliencies=True),
    Route("gradnorm-loss", "gradnorm"),  # per-task gradient norms reduced over the ranks
    Route("dwa-loss", "dwa"),  # a loss weighting with a loss history (UW, with learnable weights, runs everywhere)
]
LOOKAHEAD_ROUTES = [Route("auto_lambda-loss", "auto_lambda", kw=(("lr", 0.05),), lookahead=True)]
ACCUMULATE_ROUTES = [
    Route("ew-loss-accumulated", "ew", accumulate=True),
    Route("mgda-feature-accumulated", "mgda", "feature", accumulate=True),
    Route("upgrad-param-accumulated", "upgrad", "param", accumulate=True),
]
OPTION_CASES = ["plain", "unreached", "sparse_embedding", "complex_param", "float64", "mixed_dtypes", "routed",
                "head_two_tasks", "lstm"]
ROUTE_BY_ID = {r.id: r for r in ROUTES + REP_ROUTES + DDP_ROUTES + RETAIN_ROUTES + SKIP_ROUTES + SCALER_ROUTES
               + OPTION_ROUTES + ACCUMULATE_ROUTES + LOOKAHEAD_ROUTES}
THREE_D = set(gp.THREE_D)


# Constructs run on one route per level only: torch.compile compiles again in every run (≈ 0.3 s each), and data
# parallelism meets the compiled graph only where each level's step splits at features and reduces
FEW_ROUTES = {c: ("ew-loss", "mgda-feature", "upgrad-param") for c in BUILDERS if c.startswith("compiled")}


def plan() -> list[tuple[str, str]]:
    """Every (construct, route id) the harness runs."""
    keys = [(c, r.id) for c in BUILDERS for r in ROUTES if c not in FEW_ROUTES or r.id in FEW_ROUTES[c]]
    keys += [(c, r.id) for c in BUILDERS if c in THREE_D for r in REP_ROUTES]
    keys += [(c, r.id) for c in DDP_CASES for r in DDP_ROUTES]
    keys += [(c, r.id) for c in RETAIN_CASES for r in RETAIN_ROUTES]
    keys += [(c, r.id) for c in NONFINITE_CASES for r in SKIP_ROUTES]
    keys += [(c, r.id) for c in SCALER_CASES for r in SCALER_ROUTES]
    keys += [(c, r.id) for c in OPTION_CASES for r in OPTION_ROUTES + ACCUMULATE_ROUTES + LOOKAHEAD_ROUTES]
    return keys


@dataclass
class Outcome:
    grads: dict[str, Tensor | None] = field(default_factory=dict)
    state: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    error: str | None = None  # "ExceptionType: message"
    trace: str | None = None


class _Steps(nn.Module):
    """The model as one module whose forward is micro-batch ``i``'s, for DistributedDataParallel to wrap."""

    def __init__(self, built: gp.Built):
        super().__init__()
        self.net = built.net
        self._step = built.step

    def forward(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self._step(i)


def _eval_batchnorm(net: nn.Module) -> None:
    """BatchNorm in eval mode (running statistics): batch statistics are per rank, exact only with SyncBatchNorm
    (docs/engine.md), which has no CPU kernel; the constructs with BatchNorm are here for their layouts."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run(case: str, route: Route, group: Any | None, rank: int) -> Outcome:
    """``route`` on a fresh model of ``case``: ``group=None`` the reference (global batch, one process), else
    data-parallel over ``group`` on this rank's half."""
    _SHARD["rank"] = None if group is None else rank
    out = Outcome()
    try:
        torch.manual_seed(0)
        built = ALL_BUILDERS[case](T)
        _eval_batchnorm(built.net)
        method = create(route.method, **dict(route.kw))
        steps: Callable[[int], tuple[Tensor, dict[str, Tensor]]] = built.step
        ddp: nn.parallel.DistributedDataParallel | None = None
        if group is not None and (route.wrap or route.ddp_backward):
            ddp = nn.parallel.DistributedDataParallel(_Steps(built), process_group=group,
                                                      find_unused_parameters=route.ddp_backward)
            steps = ddp
        opts: dict[str, Any] = {"jacobian": route.jacobian, "nonfinite": route.nonfinite}
        if route.rep_mtl:
            opts["regularizers"] = [create("rep_mtl")]
        if route.transform is not None:
            opts["loss_transform"] = route.transform
        if route.keep_saliencies:
            opts["keep_saliencies"] = True
        if route.update_every > 1:
            opts["cache"] = DecisionCache(route.update_every)
        if route.scaler:
            opts["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        if route.accumulate:
            dist_ = resolve(False if group is None else group)
            parts = []
            for i in range(STEPS):
                z, losses = steps(i)
                parts.append(compute_task_gradients(losses, level=route.level or "loss", features=z,
                                                    shared_params=built.shared(), task_params=_task_params(built),
                                                    dist=dist_))
            grads = TaskGradients.accumulate(parts)
            problem = apply_decision(grads, method.decide(grads), name=method.name)
            out.skipped.append(bool(problem))
        for i in range(0 if route.accumulate else STEPS):
            if route.ddp_backward and ddp is not None:
                _, losses = steps(i)
                sum(losses.values()).backward()
                out.skipped.append(False)
                continue
            if route.lookahead:  # the look-ahead's own batches: micro-batch i (training) and i + 7 (validation)
                la_params = [p for p in built.net.parameters() if p.requires_grad]
                method.meta_step(LookAhead(la_params, lambda i=i: list(built.step(i)[1].values()),
                                           lambda i=i: list(built.step(i + 7)[1].values()), lr=0.1,
                                           distributed=False if group is None else group))
            with ddp.no_sync() if ddp is not None and not route.sync else contextlib.nullcontext():
                z, losses = steps(i)
            calls = [True, False] if route.retain else [False]
            for retain in calls:
                rec = mtl_backward(losses, features=z if route.features else None, shared_params=built.shared(),
                                   method=method, level=route.level, distributed=False if group is None else group,
                                   retain_graph=retain, task_params=_task_params(built), **opts)
                out.skipped.append(bool(rec.skipped))
        out.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in built.net.named_parameters()}
        for k, p in enumerate(method.parameters()):
            out.grads[f"method.{k}"] = None if p.grad is None else p.grad.detach().clone()
        out.state = _flat_state(method.state_dict())
    except Exception as exc:  # compared by the test: the data-parallel run must raise what the reference raises
        out.error = f"{type(exc).__name__}: {exc}"
        out.trace = traceback.format_exc()
    return out


def _task_params(built: gp.Built) -> list[Tensor] | None:
    given = getattr(built, "task_params", None)
    return None if given is None else given()


def _flat_state(state: Any) -> list[float]:
    flat: list[float] = []

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            flat.extend(v.detach().double().reshape(-1).tolist())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat.append(float(v))

    walk(state)
    return flat


def worker(rank: int, port: int, outdir: str, keys: list[tuple[str, str]]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {"ref": {}, "dp": {}}
    try:
        for k, (case, rid) in enumerate(keys):  # the references, split between the ranks (no collective)
            if k % WORLD == rank:
                results["ref"][f"{case}|{rid}"] = run(case, ROUTE_BY_ID[rid], None, rank).__dict__
        group = dist.new_group(backend="gloo", timeout=RUN_TIMEOUT)
        for case, rid in keys:
            res = run(case, ROUTE_BY_ID[rid], group, rank)
            results["dp"][f"{case}|{rid}"] = res.__dict__
            failed: list[Any] = [None] * WORLD
            dist.all_gather_object(failed, res.error is not None)
            if any(failed):  # the run's group may be out of step: the next run gets a fresh one
                group = dist.new_group(backend="gloo", timeout=RUN_TIMEOUT)
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    leave()  # after the results are written: both ranks leave the group, no interpreter teardown
