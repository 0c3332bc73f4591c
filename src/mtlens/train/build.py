"""A run's parts built from their own configuration sections: device, model, optimiser, schedule.

Each builder takes the section it needs (the model from a :class:`~mtlens.train.config.ModelConfig`,
the optimiser from an :class:`~mtlens.train.config.OptimConfig`, ...), not the whole run
configuration, so that evaluation (:mod:`mtlens.train.evaluate`) builds a model without a run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError
from ..methods import get as get_method
from ..models import HPSModel
from ..models import create as create_model
from .config import ModelConfig, OptimConfig, RunConfig, ScheduleConfig

__all__ = [
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "compile_encoder",
    "config_differences",
    "default_out_dir",
    "first_dim",
    "init_distributed",
    "is_main_process",
    "resolve_device",
    "run_label",
    "shard",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA → ConfigurationError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("train.device='cuda' but torch.cuda.is_available() is False; use cpu or auto")
    return torch.device(name)


def build_model(model: ModelConfig, spec: Any, tasks: Sequence[str]) -> HPSModel:
    """The :class:`~mtlens.models.HPSModel` of the model section with one head per task in ``tasks``.

    ``spec`` is the :class:`~mtlens.tasks.BenchmarkSpec` (the heads' output channels, the input
    channels and the benchmark's default preset when ``model.preset`` is unset)."""
    return create_model(
        model.preset or spec.default_model,
        {t: spec.tasks[t] for t in tasks},
        in_channels=spec.in_channels,
        pretrained=model.pretrained or model.weights is not None,
        weights=model.weights,
        **model.kwargs,
    )


def compile_encoder(model: HPSModel, backend: str, device: torch.device) -> None:
    """``torch.compile`` the model's encoder's ``forward`` in place, with ``backend`` (the module stays the module:
    its state-dict keys, hence checkpoints, stay those of the eager model; ``nn.Module.compile`` would keep them too,
    but on torch 2.13 it compiles nothing for a stack of torch's own modules, ``nn.Sequential`` of ``nn.Linear``,
    whose frames dynamo skips); the heads stay eager, so every method and regulariser runs
    (saliency regularisers differentiate the heads twice, which compiled graphs cannot; docs/engine.md,
    "torch.compile"). ``"off"`` does nothing.

    Also turns off aot_autograd's donated buffers for the process (``torch._functorch.config.donated_buffer``):
    the per-task Jacobian (parameter level, ``compute_gramian="param"`` monitors) runs the encoder's backward once
    per task, which a backward that donates its saved tensors refuses; the cost is that memory.

    Raises:
        ConfigurationError: an unknown backend (the known ones named), or inductor on the CPU without a C++
            compiler (its generated kernels are C++; install one, e.g. ``apt-get install g++``, or use
            ``train.compile: aot_eager``).
    """
    if backend == "off":
        return
    import shutil

    import torch._dynamo
    import torch._functorch.config

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigurationError(f"train.compile: unknown torch.compile backend '{backend}'; use 'off' or one of "
                                 f"{sorted(known)}")
    if backend == "inductor" and device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise ConfigurationError("train.compile: inductor on the CPU generates C++ kernels and no C++ compiler was "
                                 "found on PATH: install one (apt-get install g++) or set train.compile: aot_eager "
                                 "(no generated code) or off")
    torch._functorch.config.donated_buffer = False
    encoder = model.encoder
    encoder.forward = torch.compile(encoder.forward, backend=backend)


def build_optimizer(
    optim: OptimConfig, model: torch.nn.Module, method_params: Sequence[torch.Tensor]
) -> torch.optim.Optimizer:
    """Adam/AdamW/SGD over the model, plus a weight-decay-free group for the method's parameters."""
    o = optim
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    mp = [p for p in method_params if p.requires_grad]
    if mp:
        groups.append({"params": mp, "weight_decay": 0.0})
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    return torch.optim.SGD(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov)


def build_scheduler(schedule: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int) -> Any:
    """The learning-rate schedule (None for ``none``); ``plateau`` is stepped on the selection score."""
    s = schedule
    if s.name == "none":
        return None
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "plateau":
        # ReduceLROnPlateau on the epoch's validation selection score (higher is better), stepped
        # after validation: Nash-MTL's QM9 schedule (factor 0.7, patience 5, min_lr 1e-5) on val Δm.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=s.gamma, patience=s.patience, min_lr=s.min_lr
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=s.eta_min)


def default_out_dir(cfg: RunConfig) -> Path:
    """``runs/<name or benchmark>-<method or stl-task>-<timestamp>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    what = f"stl-{cfg.stl_task}" if cfg.stl_task else cfg.method.name
    return Path("runs") / f"{cfg.name or cfg.data.benchmark}-{what}-{stamp}"


def run_label(cfg: RunConfig) -> str:
    """Short name of what is trained ("STL left", "ew + rep_mtl", "mgda (feature)")."""
    if cfg.stl_task:
        return f"STL {cfg.stl_task}"
    s = cfg.method.name + (f" ({cfg.method.level})" if cfg.method.level else "")
    return s + "".join(f" + {r.name}" for r in cfg.regularizers)


def is_main_process(cfg: RunConfig) -> bool:
    """Whether this process is rank 0 of ``cfg``'s run (always, unless ``train.distributed``)."""
    if not cfg.train.distributed:
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(cfg: RunConfig, device: torch.device) -> tuple[int, int, torch.device]:
    """Join the torchrun process group; return ``(rank, world size, this rank's device)``.

    Every rank trains on its equal share of each global batch (``train.batch_size``)."""
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigurationError(
                "train.distributed=true needs the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR): launch "
                "with `torchrun --standalone --nproc_per_node=N -m mtlens.cli.main train ... --set "
                "train.distributed=true`"
            )
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.train.batch_size % world:
        raise ConfigurationError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
            f"{world} processes; each takes an equal share"
        )
    if get_method(cfg.method.name).needs_second_batch:
        raise ConfigurationError(
            f"'{cfg.method.name}' draws two extra batches for its cross-Gramian (needs_second_batch); that is not "
            "data-parallel yet: train it in one process"
        )
    return rank, world, device


def shard(batch: Any, rank: int, world: int) -> Any:
    """This rank's equal share (along dim 0) of every tensor in a batch."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        n = batch.shape[0] // world
        return batch[rank * n:(rank + 1) * n]
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, rank, world) for v in batch)
    return batch


def first_dim(batch: Any) -> int:
    """The leading size of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return first_dim(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return first_dim(batch[0])
    return 0


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any],
                       ignore: Sequence[str] = ("out_dir", "name")) -> list[str]:
    """``"key: old -> new"`` for every setting that differs between two dumped configurations."""
    fa = {k: v for k, v in _flatten(a).items() if k.split(".")[0] not in ignore}
    fb = {k: v for k, v in _flatten(b).items() if k.split(".")[0] not in ignore}
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
