"""Sharded data parallelism (FSDP2, ``fully_shard``) is refused with the fix named, on every entry of the engine.

Two gloo processes (``torch.multiprocessing.spawn``; FSDP2 runs on the CPU). Before the refusal, ``mtl_backward``
left every sharded encoder parameter without a gradient under EW and UPGrad (the engine writes ``.grad`` itself,
so FSDP's reduce-scatter never ran) and said nothing. A replicated model in the same processes still trains."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _spawn import free_port, leave, spawn  # noqa: E402


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(3))

    def forward(self, x):
        z = self.enc(x)
        return z, {f"t{i}": (h(z) ** 2).mean() for i, h in enumerate(self.heads)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from mtlens.engine import compute_task_gradients, mtl_backward
    from mtlens.errors import ConfigurationError
    from mtlens.methods import create

    warnings.simplefilter("ignore")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
    try:
        torch.manual_seed(0)
        net = _Net()
        z, losses = net(x)
        mtl_backward(losses, method=create("ew"), features=z, shared_params=net.enc.parameters())
        results["replicated"] = all(p.grad is not None for p in net.parameters())
        sharded = _Net()
        fully_shard(sharded.enc)
        fully_shard(sharded)
        calls = {
            "ew": lambda z, L: mtl_backward(L, method=create("ew"), features=z),
            "ew_not_distributed": lambda z, L: mtl_backward(L, method=create("ew"), features=z, distributed=False),
            "upgrad_param": lambda z, L: mtl_backward(L, method=create("upgrad"), features=z, level="param",
                                                      shared_params=sharded.enc.parameters()),
            "mgda_feature": lambda z, L: mtl_backward(L, method=create("mgda"), features=z, level="feature",
                                                      shared_params=sharded.enc.parameters()),
            "compute_task_gradients": lambda z, L: compute_task_gradients(
                L, level="param", features=z, shared_params=list(sharded.enc.parameters())),
        }
        for name, call in calls.items():
            z, losses = sharded(x)
            try:
                call(z, losses)
                results[name] = "no error"
            except ConfigurationError as exc:
                results[name] = str(exc)
        results["grads_after"] = [p.grad is None for p in sharded.parameters()]
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    leave()  # after the results are written: both ranks leave the group, no interpreter teardown


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, (2, free_port(), str(out)), 2, [out / f"rank{r}.json" for r in range(2)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["ew", "ew_not_distributed", "upgrad_param", "mgda_feature",
                                   "compute_task_gradients"])
def test_fully_shard_is_refused_with_the_fix_named(results, entry):
    for res in results:
        assert "error" not in res, res.get("error")
        msg = res[entry]
        assert "FSDP" in msg and "not supported" in msg and "distributed=True" in msg, msg


@pytest.mark.slow
def test_a_replicated_model_trains_and_the_refused_steps_write_nothing(results):
    for res in results:
        assert res["replicated"] is True
        assert all(res["grads_after"])  # every .grad of the sharded model still None


def test_sharded_parameters_are_recognised_without_a_process_group():
    """DTensor shards (and subclasses) and FSDP1 flat parameters are refused when given; a plain parameter is not."""
    from mtlens.engine.sharded import _is_sharded, refuse_sharded
    from mtlens.errors import ConfigurationError

    class DTensor(torch.Tensor):  # stands for torch.distributed.tensor.DTensor (recognised by name, in the MRO)
        pass

    class Sub(DTensor):
        pass

    flat = nn.Parameter(torch.zeros(3))
    flat._is_flat_param = True  # FSDP1's FlatParameter marks itself so
    plain = nn.Parameter(torch.zeros(3))
    assert not _is_sharded(plain) and not _is_sharded(torch.zeros(2))
    assert _is_sharded(torch.zeros(2).as_subclass(Sub)) and _is_sharded(flat)
    refuse_sharded([plain])
    with pytest.raises(ConfigurationError, match="sharded parameter.*not supported"):
        refuse_sharded([plain, flat])
