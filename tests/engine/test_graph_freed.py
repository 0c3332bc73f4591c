"""A freed graph gets the engine's message naming both causes (engine/_autograd.py::freed_graph_error): the losses
were differentiated before, or a loss reaches the encoder around ``features``. Nothing is written either way."""

from __future__ import annotations

import pytest
import torch

from mtlens.engine import mtl_backward
from mtlens.engine._autograd import freed_graph_error
from mtlens.errors import GraphFreedError, MTLensError
from mtlens.methods import create


class _Net(torch.nn.Module):
    def __init__(self, around: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 1) for _ in range(3))
        self.around = around

    def forward(self, x):
        a = torch.relu(self.l1(x))
        z = self.l2(a)
        read = torch.cat([z, a if self.around else z], 1)  # a head reading an encoder intermediate: around z
        return z, {f"t{i}": h(read).pow(2).mean() for i, h in enumerate(self.heads)}


def _grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad", "graddrop", "cagrad"])
def test_a_head_reading_an_encoder_intermediate_at_feature_level_is_named_and_writes_nothing(name):
    net = _Net(around=True)
    z, losses = net(torch.randn(5, 4))
    with pytest.raises(GraphFreedError, match="route around them") as info:
        mtl_backward(losses, method=create(name), features=z, shared_params=list(net.l2.parameters()),
                     level="feature")
    assert "shared_params" in str(info.value) and "retain_graph=True" in str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, MTLensError)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(("name", "level"), [("ew", None), ("uw", None), ("upgrad", "param"), ("upgrad", "feature"),
                                             ("mgda", "feature"), ("pcgrad", "param")])
@pytest.mark.parametrize("with_features", [True, False])
def test_a_second_step_on_the_same_losses_is_named_and_leaves_the_first_steps_grads(name, level, with_features):
    if level == "feature" and not with_features:
        pytest.skip("feature level needs features")
    net = _Net(around=False)
    z, losses = net(torch.randn(5, 4))
    kw = {"method": create(name), "shared_params": [*net.l1.parameters(), *net.l2.parameters()],
          "features": z if with_features else None}
    if level:
        kw["level"] = level
    mtl_backward(losses, **kw)
    first = _grads(net)
    with pytest.raises(GraphFreedError, match="differentiated before") as info:
        mtl_backward(losses, **kw)
    assert "backward through the graph a second time" in str(info.value)  # autograd's words, kept
    for a, b in zip(first, _grads(net)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_only_autograds_freed_graph_message_is_translated():
    assert freed_graph_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    err = freed_graph_error(RuntimeError("Trying to backward through the graph a second time (or ...)\nmore"))
    assert isinstance(err, GraphFreedError) and str(err).endswith("a second time (or ...)")
