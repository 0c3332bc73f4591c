"""The README's own-loop example runs verbatim: a method of each family, stateful ones, fp16 with a scaler on CPU.

The code blocks are read from README.md (section "The engine in your own training loop"). The
only change made to the first block is the method name in its ``create("upgrad", ...)`` line.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import mtlens  # noqa: F401

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## The engine in your own training loop"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run_main_block(name: str) -> dict:
    code = _blocks()[0]
    line = 'create("upgrad", '
    assert code.count(line) == 1, "the README's loop must create its method in one create(\"upgrad\", ...) line"
    ns: dict = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the loop makes every call: nothing to warn about
        exec(compile(code.replace(line, f'create("{name}", '), str(README), "exec"), ns)
    return ns


def test_the_section_has_the_loop_fp16_and_accumulation_blocks():
    blocks = _blocks()
    assert len(blocks) == 3
    assert "class Model(nn.Module)" in blocks[0] and "method.on_epoch_end" in blocks[0]
    assert "method.after_step" in blocks[0] and "method.parameters()" in blocks[0]
    assert "GradScaler" in blocks[1] and "TaskGradients.accumulate" in blocks[2]


@pytest.mark.parametrize("name", ["ew", "upgrad", "pcgrad", "mgda", "imtl"])
def test_readme_loop_runs_for_every_family(name):
    ns = _run_main_block(name)
    assert ns["method"].name == name
    assert torch.isfinite(ns["record"].losses).all()
    # the model trained: its encoder moved from its initialisation
    assert all(torch.isfinite(p).all() for p in ns["model"].parameters())


def test_readme_loop_gives_famo_itself():
    ns = _run_main_block("famo")
    assert ns["method"].state_dict()["logits"].abs().max() > 1e-4  # the issue: they stayed [0, 0]


def test_readme_loop_gives_dwa_itself():
    ns = _run_main_block("dwa")
    w = ns["method"].weights(torch.ones(2))
    assert not torch.allclose(w, torch.ones(2))  # the issue: DWA stayed at equal weights


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_readme_loop_trains_the_learnable_scalars(name):
    ns = _run_main_block(name)
    assert ns["method"].parameters()[0].detach().abs().max() > 1e-4


def test_readme_fp16_block_runs_on_cpu_with_a_scaler():
    ns = _run_main_block("ew")
    exec(compile(_blocks()[1], str(README), "exec"), ns)
    assert ns["device"] in ("cpu", "cuda")
    assert isinstance(ns["scaler"], torch.amp.GradScaler)
    assert ns["method"].name == "famo"
    assert torch.isfinite(torch.stack([p.float().sum() for p in ns["model"].parameters()])).all()


def test_readme_fp16_block_survives_overflow_steps():
    """Force overflows: a huge initial scale makes the first steps skip; the documented loop continues."""
    ns = _run_main_block("ew")
    code = _blocks()[1].replace("torch.amp.GradScaler(device)", "torch.amp.GradScaler(device, init_scale=2.0**20)")
    exec(compile(code, str(README), "exec"), ns)
    assert ns["scaler"].get_scale() < 2.0**20  # backed off: there were overflow steps
    assert ns["method"].state_dict()["logits"].abs().max() > 0  # and FAMO still learnt


def test_readme_accumulation_block_equals_one_step_on_the_concatenated_batch():
    ns = _run_main_block("ew")
    model = ns["model"]
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    ns["loader"] = ns["loader"][:4]  # one optimiser step of K = 4 micro-batches
    ns["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    exec(compile(_blocks()[2], str(README), "exec"), ns)
    accumulated = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start_state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.cat([b[0] for b in ns["loader"]])
    targets = {t: torch.cat([b[1][t] for b in ns["loader"]]) for t in ns["tasks"]}
    opt.zero_grad()
    z, losses = ns["task_losses"](model, x, targets)
    mtlens.mtl_backward(losses, features=z, shared_params=model.encoder.parameters(), method=ns["create"]("upgrad"))
    opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(accumulated[k], v, rtol=1e-5, atol=1e-6)
