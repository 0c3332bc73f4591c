"""``train.compile``: the trainer compiles the encoder in place (docs/engine.md, "torch.compile").

The same tiny runs with the encoder compiled (``aot_eager``: aot_autograd's graphs without generated code, so no
compiler is needed) and eager give the same results; checkpoints keep the eager model's keys; a backend that
cannot run is refused before training, naming the fix."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_bench import tiny_config

from mtlens.errors import ConfigurationError
from mtlens.train import Trainer, run, validate_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Fresh dynamo caches, and aot_autograd's donated-buffer setting (which ``train.compile`` turns off for the
    process) put back for the tests that follow."""
    import torch._functorch.config as functorch_config

    donated = functorch_config.donated_buffer
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    functorch_config.donated_buffer = donated


def test_compile_turns_off_donated_buffers(tmp_path):
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = True
    Trainer(validate_config(tiny_config(tmp_path, train={"compile": "aot_eager"})), quiet=True)
    assert functorch_config.donated_buffer is False


def _run(tmp_path, name: str, compile_: str, **over):
    cfg = tiny_config(tmp_path / name, train={"epochs": 1, "max_steps_per_epoch": 4, "compile": compile_}, **over)
    return run(validate_config(cfg), quiet=True)


@pytest.mark.parametrize("over", [
    {},
    {"method": {"name": "mgda", "level": "feature"}},
    {"method": {"name": "upgrad", "level": "param"}},
    {"regularizers": [{"name": "rep_mtl"}]},
    {"monitor": {"every": 2}},
], ids=["ew", "mgda-feature", "upgrad-param", "rep_mtl", "monitor"])
def test_a_compiled_encoder_trains_as_the_eager_one(tmp_path, over):
    eager = _run(tmp_path, "eager", "off", **over)
    compiled = _run(tmp_path, "compiled", "aot_eager", **over)
    assert compiled["steps"] == eager["steps"] == 4
    for split in ("val", "test"):
        for task, metrics in eager["metrics"][split].items():
            for k, v in metrics.items():
                assert compiled["metrics"][split][task][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (split, task, k)


def test_the_encoder_is_compiled_in_place_and_checkpoints_keep_the_eager_keys(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 2,
                                                       "compile": "aot_eager"}))
    tr = Trainer(cfg, quiet=True)
    eager = validate_config(tiny_config(tmp_path / "e", train={"epochs": 1, "max_steps_per_epoch": 2}))
    assert list(tr.model.state_dict()) == list(Trainer(eager, quiet=True).model.state_dict())
    z = tr.model.encode(torch.randn(4, 8))
    assert z.grad_fn is not None and "CompiledFunction" in z.grad_fn.name()
    tr.fit()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert list(ck["model"]) == list(tr.model.state_dict()) and not any("_orig_mod" in k for k in ck["model"])


def test_a_stack_of_torch_layers_is_compiled_too():
    """An encoder made of torch's own modules only (``nn.Sequential`` of ``nn.Linear``): ``nn.Module.compile()``
    leaves it eager on torch 2.13; ``compile_encoder`` compiles it."""
    from mtlens.models import HPSModel
    from mtlens.train.build import compile_encoder

    model = HPSModel(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), {"a": torch.nn.Linear(8, 1)},
                     dense=False)
    keys = list(model.state_dict())
    compile_encoder(model, "aot_eager", torch.device("cpu"))
    z = model.encode(torch.randn(3, 4))
    assert z.grad_fn is not None and "CompiledFunction" in z.grad_fn.name()
    assert list(model.state_dict()) == keys


def test_an_unknown_backend_is_refused_with_the_known_ones(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, train={"compile": "no_such_backend"}))
    with pytest.raises(ConfigurationError, match="unknown torch.compile backend 'no_such_backend'.*inductor"):
        Trainer(cfg, quiet=True)


def test_inductor_without_a_compiler_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = validate_config(tiny_config(tmp_path, train={"compile": "inductor"}))
    with pytest.raises(ConfigurationError, match="no C\\+\\+ compiler.*aot_eager"):
        Trainer(cfg, quiet=True)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="inductor needs a compiler")
def test_inductor_trains(tmp_path):
    res = _run(tmp_path, "inductor", "inductor", method={"name": "mgda", "level": "feature"})
    assert res["steps"] == 4
