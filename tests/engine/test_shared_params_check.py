"""Encoder parameters left out of ``shared_params`` are named once per method object (engine/gradients.py::
warn_parameters_outside_shared): at a gradient level with ``features`` the step writes them no gradient."""

from __future__ import annotations

import warnings

import pytest
import torch

from mtlens.engine import mtl_backward
from mtlens.methods import create

_MSG = "upstream of features are not in shared_params"


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.body = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        z = self.body(torch.relu(self.stem(x)))
        return z, {f"t{i}": h(z).pow(2).mean() for i, h in enumerate(self.heads)}


def _step(net, method, shared, level, x=None):
    z, losses = net(torch.randn(5, 4) if x is None else x)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        mtl_backward(losses, method=method, features=z, shared_params=shared, level=level)
    return [str(w.message) for w in got if _MSG in str(w.message)]


@pytest.mark.parametrize(("name", "level"), [("upgrad", "feature"), ("mgda", "param"), ("upgrad", "param"),
                                             ("pcgrad", "param"), ("graddrop", "feature"), ("cagrad", "feature")])
def test_a_stem_left_out_of_shared_params_is_named_once_per_method(name, level):
    net, method = _Net(), create(name)
    got = _step(net, method, list(net.body.parameters()), level)
    assert len(got) == 1 and "2 trainable parameter(s)" in got[0] and "(8, 4)" in got[0] and "(8,)" in got[0]
    assert net.stem.weight.grad is None  # what the warning says: the method is applied to shared_params only
    assert _step(net, method, list(net.body.parameters()), level) == []  # once per method object
    assert len(_step(net, create(name), list(net.body.parameters()), level)) == 1  # a new method: warned again


@pytest.mark.parametrize(("name", "level"), [("upgrad", "feature"), ("mgda", "param"), ("ew", None), ("uw", None)])
def test_no_warning_for_the_whole_encoder_a_frozen_stem_an_input_that_requires_grad_or_a_loss_weighting(name, level):
    net = _Net()
    assert _step(net, create(name), [*net.stem.parameters(), *net.body.parameters()], level) == []
    x = torch.randn(5, 4, requires_grad=True)  # an input leaf (adversarial training), not a parameter
    assert _step(net, create(name), [*net.stem.parameters(), *net.body.parameters()], level, x=x) == []
    net.stem.requires_grad_(False)
    assert _step(net, create(name), list(net.body.parameters()), level) == []
    net.stem.requires_grad_(True)
    if level is None:  # a loss weighting writes every parameter the objective reaches: nothing is left out
        assert _step(net, create(name), list(net.body.parameters()), level) == []
        assert net.stem.weight.grad is not None
