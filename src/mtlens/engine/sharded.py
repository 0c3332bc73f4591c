"""Sharded data parallelism (FSDP) is refused, loudly: the engine cannot honour it.

``torch.distributed.fsdp.fully_shard`` (FSDP2) swaps each module's sharded parameters (``DTensor`` shards) for
unsharded ones during the forward, and turns the gradients of those back into sharded ``.grad`` by a reduce-scatter
that ``loss.backward()`` triggers through its hooks. The engine computes gradients with ``torch.autograd.grad`` and
writes ``.grad`` itself, so that reduce-scatter never runs: measured with two gloo processes, EW and UPGrad left
every sharded encoder parameter without a gradient (the encoder never trained) and said nothing. Rather than that
silent step, :func:`refuse_sharded` raises, naming what works: replicated parameters, reduced by the engine
(``distributed=True`` or an initialised process group; docs/engine.md, "Data parallelism").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigurationError

__all__ = ["refuse_sharded", "sharded_modules"]

_MESSAGE = (
    "{what}: mtl_backward computes every gradient with torch.autograd.grad and writes .grad itself, so FSDP's "
    "reduce-scatter, which backward() runs through its hooks, never runs and the sharded parameters would get no "
    "gradient (or a wrong one). Sharded data parallelism is not supported: keep the parameters replicated (no "
    "fully_shard / FullyShardedDataParallel) and let the engine reduce the gradients over ranks "
    "(distributed=True or an initialised process group; docs/engine.md, 'Data parallelism')"
)


def sharded_modules() -> list[Any]:
    """The modules of this process that ``fully_shard`` (FSDP2) manages (none where torch lacks it)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return []
    out = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref() if not isinstance(ref, FSDPState) and callable(ref) else ref
        if isinstance(state, FSDPState):
            out.append(module)
    return out


def _is_sharded(p: Tensor) -> bool:
    """A DTensor shard (FSDP2, tensor parallelism) or FSDP1's flat parameter."""
    return bool(getattr(p, "_is_flat_param", False)) or any(c.__name__ == "DTensor" for c in type(p).__mro__)


def refuse_sharded(params: Iterable[Tensor] | None = None) -> None:
    """Raise :class:`ConfigurationError` when the step would train sharded parameters: ``params`` (the caller's
    ``shared_params``/``task_params`` lists, when given) holding a ``DTensor`` or FSDP1 flat parameter, or a
    module managed by ``fully_shard`` in this process (checked only when ``torch.distributed`` is initialised,
    which FSDP needs).

    Raises:
        ConfigurationError: naming the sharded module or parameter and what works instead.
    """
    if params is not None:
        for p in params:
            if _is_sharded(p):
                raise ConfigurationError(_MESSAGE.format(
                    what=f"a sharded parameter ({type(p).__name__}, shape {tuple(p.shape)}) was given"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        mods = sharded_modules()
        if mods:
            raise ConfigurationError(_MESSAGE.format(
                what=f"{len(mods)} module(s) of this process are sharded by fully_shard (FSDP2: "
                     f"{type(mods[0]).__name__}, ...)"))
