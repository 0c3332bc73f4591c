"""Worker for the data-parallel equivalence tests (2 gloo processes via torch.multiprocessing.spawn).

Each case trains the same small model for a few steps twice: in one process on the global
batch (``distributed=False``, the reference) and data-parallel on this rank's half of every
batch (``distributed=True``); it reports the largest parameter difference and whether the
method's state is identical on every rank.
"""

from __future__ import annotations

import json
import os
import traceback

import torch
import torch.distributed as dist
from _spawn import leave
from torch import nn

from mtlens.engine import (
    DecisionCache,
    LookAhead,
    TaskGradients,
    apply_decision,
    compute_task_gradients,
    mtl_backward,
)
from mtlens.methods import create

F64 = torch.float64
B, STEPS = 8, 3

# case -> (method, level, regularisers, method kwargs, extra)
CASES = {
    "ew": ("ew", None, [], {}, {}),
    "gradnorm": ("gradnorm", None, [], {}, {}),
    "upgrad_param": ("upgrad", "param", [], {}, {}),
    "mgda_param": ("mgda", "param", [], {}, {}),
    "mgda_feature": ("mgda", "feature", [], {}, {}),
    "nash_mtl_feature": ("nash_mtl", "feature", [], {}, {}),
    "pcgrad_param": ("pcgrad", "param", [], {"seed": 0}, {}),
    "db_mtl_param": ("db_mtl", "param", [], {}, {}),
    "ew_rep_mtl": ("ew", None, ["rep_mtl"], {}, {}),
    "mgda_feature_rep_mtl": ("mgda", "feature", ["rep_mtl"], {}, {}),
    "upgrad_param_ddp_wrapper": ("upgrad", "param", [], {}, {"wrap": True}),
    "mgda_param_batched": ("mgda", "param", [], {}, {"jacobian": "batched"}),
    "upgrad_param_update_every": ("upgrad", "param", [], {}, {"update_every": 2}),
    # ConsMTL: its head term is reduced over ranks before its clipping; bilevel methods: a LookAhead
    # over the ranks' shares of the step's batch and of an independent batch
    "consmtl_param": ("consmtl", "param", [], {"infeasible": "least_squares"}, {}),
    "consmtl_feature": ("consmtl", "feature", [], {"infeasible": "least_squares"}, {}),
    "auto_lambda": ("auto_lambda", None, [], {"lr": 0.05}, {"lookahead": True}),
    "moml": ("moml", None, [], {"outer_lr": 0.05}, {"lookahead": True}),
    "forum": ("forum", None, [], {}, {"lookahead": True}),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])

    def forward(self, x, y):
        z = self.enc(x)
        return z, {f"t{i}": ((h(z) - y[:, i:i + 1]) ** 2).mean() + 0.1 for i, h in enumerate(self.heads)}


def _train(case: str, distributed: bool, rank: int, world: int):
    name, level, regs, kw, extra = CASES[case]
    torch.manual_seed(123)
    xs = [torch.randn(B, 5, dtype=F64) for _ in range(STEPS)]
    ys = [torch.randn(B, 3, dtype=F64) for _ in range(STEPS)]
    xvs = [torch.randn(B, 5, dtype=F64) for _ in range(STEPS)]  # the look-ahead's independent batches
    yvs = [torch.randn(B, 3, dtype=F64) for _ in range(STEPS)]
    torch.manual_seed(0)
    net = Net().double()
    model = net
    if extra.get("wrap") and distributed:
        model = nn.parallel.DistributedDataParallel(net)
    method = create(name, **kw)
    regularizers = [create(r) for r in regs]
    opt = torch.optim.SGD(list(net.parameters()) + method.parameters(), lr=0.1)
    cache = DecisionCache(extra["update_every"]) if "update_every" in extra else None
    b = B // world
    for s in range(STEPS):
        x, y = xs[s], ys[s]
        if distributed:
            x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
        if extra.get("lookahead"):
            xv, yv = xvs[s], yvs[s]
            if distributed:
                xv, yv = xv[rank * b:(rank + 1) * b], yv[rank * b:(rank + 1) * b]
            method.meta_step(LookAhead(list(net.parameters()), _closure(net, x, y), _closure(net, xv, yv), lr=0.1,
                                       distributed=distributed))
        opt.zero_grad(set_to_none=True)
        if extra.get("wrap") and distributed:
            with model.no_sync():
                z, losses = model(x, y)
        else:
            z, losses = model(x, y)
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=method, level=level,
                     regularizers=regularizers, distributed=distributed, jacobian=extra.get("jacobian", "loop"),
                     cache=cache)
        opt.step()
    params = [p.detach().clone() for p in net.parameters()]
    return params, method.state_dict()


def _closure(net, x, y):
    return lambda: list(net(x, y)[1].values())


def _flat_state(state) -> list[float]:
    out: list[float] = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.extend(v.detach().double().reshape(-1).tolist())
        elif isinstance(v, dict):
            for k in sorted(v):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))

    walk(state)
    return out


def _accumulation(rank: int, world: int) -> dict:
    """K = 2 micro-batches, one step == one step on the concatenated batch (single process)."""
    out = {}
    for name, level, tf in (("mgda", "param", None), ("mgda", "feature", None), ("ew", "loss", None),
                            ("pcgrad", "param", None), ("db_mtl", "param", "log"), ("mgda", "feature", "log"),
                            ("ew", "loss", "log"), ("upgrad", "param", "log")):
        torch.manual_seed(5)
        x, y = torch.randn(B, 5, dtype=F64), torch.randn(B, 3, dtype=F64)
        torch.manual_seed(0)
        ref_net = Net().double()
        torch.manual_seed(0)
        acc_net = Net().double()
        kw = {"seed": 0} if name == "pcgrad" else {}
        z, losses = ref_net(x, y)
        mtl_backward(losses, features=z, shared_params=ref_net.enc.parameters(), method=create(name, **kw),
                     level=None if level == "loss" else level, distributed=False, loss_transform=tf)
        parts = []
        for k in range(2):
            z, losses = acc_net(x[k * 4:(k + 1) * 4], y[k * 4:(k + 1) * 4])
            parts.append(compute_task_gradients(losses, level=level, features=z, loss_transform=tf,
                                                shared_params=list(acc_net.enc.parameters()), dist=None))
        grads = TaskGradients.accumulate(parts)
        method = create(name, **kw)
        apply_decision(grads, method.decide(grads))
        err = max(float((a.grad - r.grad).abs().max()) for a, r in zip(acc_net.parameters(), ref_net.parameters()))
        out[f"{name}_{level}_{tf or 'none'}"] = err
    return out


def _refused(rank: int, world: int) -> str:
    """A feature-level Jacobian aggregator cannot decide from one rank's share: a clear error."""
    from mtlens.errors import ConfigurationError

    net = Net().double()
    z, losses = net(torch.randn(4, 5, dtype=F64), torch.randn(4, 3, dtype=F64))
    try:
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("graddrop", seed=0),
                     level="feature", distributed=True)
    except ConfigurationError as exc:
        return str(exc)
    return ""


def _refused_consmtl_log(rank: int, world: int) -> str:
    """ConsMTL's head term with log losses couples the ranks: a clear error."""
    from mtlens.errors import ConfigurationError

    net = Net().double()
    z, losses = net(torch.randn(4, 5, dtype=F64), torch.randn(4, 3, dtype=F64))
    try:
        mtl_backward(losses, features=z, shared_params=net.enc.parameters(),
                     method=create("consmtl", infeasible="least_squares"), level="param", loss_transform="log",
                     distributed=True)
    except ConfigurationError as exc:
        return str(exc)
    return ""


def worker(rank: int, world: int, port: int, outdir: str, cases: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    try:
        for case in cases:
            if case == "accumulation":
                results[case] = _accumulation(rank, world)
                continue
            if case == "refused":
                results[case] = _refused(rank, world)
                continue
            if case == "refused_consmtl_log":
                results[case] = _refused_consmtl_log(rank, world)
                continue
            try:
                ref, ref_state = _train(case, False, rank, world)
                got, state = _train(case, True, rank, world)
                err = max(float((a - b).abs().max()) for a, b in zip(got, ref))
                flat = _flat_state(state)
                gathered: list = [None] * world
                dist.all_gather_object(gathered, flat)
                same_state = all(g == gathered[0] for g in gathered)
                ref_flat = _flat_state(ref_state)
                state_err = max([abs(a - b) for a, b in zip(flat, ref_flat)] or [0.0])
                results[case] = {"err": err, "same_state": same_state, "state_err": state_err,
                                 "state_len": [len(flat), len(ref_flat)]}
            except Exception:  # reported to the test, which fails with the traceback
                results[case] = {"error": traceback.format_exc()}
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    leave()  # after the results are written: both ranks leave the group, no interpreter teardown
