"""Methods are torch.nn.Modules: state through buffers, parameters and extra state; hparams recorded once."""

from __future__ import annotations

import pytest
import torch

from mtlens.engine import GramianWeighting, Method
from mtlens.errors import CheckpointError
from mtlens.methods import available, create, defaults, get
from mtlens.methods._utils import Seeded


def _losses(k: int = 0) -> torch.Tensor:
    return torch.tensor([0.9, 1.4, 0.6], dtype=torch.float64) * (1.0 - 0.1 * k)


def test_every_method_is_a_module_with_the_constructors_hparams():
    for name in available():
        m = create(name)
        assert isinstance(m, torch.nn.Module) and isinstance(m, Method)
        assert set(m.hparams()) == set(defaults(name)), name
        assert isinstance(m.parameters(), list), name


def test_seeded_methods_report_the_effective_seed_drawn_from_torchs_rng():
    for name in [n for n in available() if issubclass(get(n), Seeded)]:
        torch.manual_seed(3)
        a = create(name)
        torch.manual_seed(3)
        b = create(name)
        assert isinstance(a.hparams()["seed"], int) and a.hparams()["seed"] == b.hparams()["seed"], name
        assert torch.equal(a.generator.get_state(), b.generator.get_state()), name


def test_state_dict_is_a_copy_and_lazily_created_state_restores_to_none():
    m = create("famo")
    fresh = m.state_dict()
    assert fresh["logits"] is None and fresh["prev_losses"] is None
    m.weights(_losses())
    m.after_step(_losses(1))
    saved = m.state_dict()
    logits = saved["logits"].clone()
    m.weights(_losses(1))
    m.after_step(_losses(2))  # the internal Adam updates the buffer in place: the saved copy must not move
    assert torch.equal(saved["logits"], logits)
    m.load_state_dict(fresh)  # "not created yet" is state too
    assert m.state_dict()["logits"] is None and m.log_values() == {}


def test_learnable_scalars_keep_their_identity_across_loads():
    m = create("uw", num_tasks=3)
    (p,) = m.parameters()
    m.load_state_dict({"log_vars": torch.tensor([0.1, 0.2, 0.3])})
    assert m.parameters()[0] is p and torch.equal(p.detach(), torch.tensor([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("name,other", [("gradvac", "famo"), ("dwa", "stch"), ("imtl", "gradnorm")])
def test_a_foreign_state_raises_checkpoint_error_naming_the_method(name, other):
    a, b = create(name), create(other)
    with pytest.raises(CheckpointError, match=f"'{name}'"):
        a.load_state_dict(b.state_dict())


def test_extra_state_is_named_once_in_state_attrs():
    m = create("gradvac", seed=0)
    m.weights(torch.eye(3, dtype=torch.float64), _losses())
    state = m.state_dict()
    assert set(state) == {"phi_hat", "_extra_state"}
    assert set(state["_extra_state"]) == {"generator", "steps"} and state["_extra_state"]["steps"] == 1


def test_a_subclass_without_super_init_is_a_working_module():
    class Half(GramianWeighting):
        name = "_half_test"
        stateful = True
        state_attrs = ("calls",)

        def __init__(self, scale: float = 0.5):
            self.scale = scale
            self.calls = 0

        def weights(self, gramian, losses):
            self.calls += 1
            return torch.full((gramian.shape[0],), self.scale, dtype=torch.float64)

    m = Half()
    m.weights(torch.eye(2, dtype=torch.float64), torch.ones(2))
    assert m.hparams() == {"scale": 0.5} and repr(m) == "Half(scale=0.5)"
    n = Half()
    n.load_state_dict(m.state_dict())
    assert n.calls == 1
