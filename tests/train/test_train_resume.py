"""A run killed with SIGKILL mid-epoch and resumed ends exactly like an uninterrupted run (CPU)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_bench import tiny_config

from mtlens.train import run, validate_config
from mtlens.train.checkpoint import load_checkpoint
from mtlens.train.records import read_jsonl

HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import mtlens
    import tiny_bench
    from mtlens.train import Callback, run, validate_config

    cfg = validate_config(json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])

    class KillAt(Callback):
        def on_step_end(self, trainer, log):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine died

    run(cfg, quiet=True, callbacks=[KillAt()])
    """
)


def _config(tmp_path, out, method):
    d = tiny_config(
        tmp_path,
        method={"name": method},
        regularizers=[{"name": "rep_mtl"}],
        loss_transform="none" if method == "forum" else "log",  # FORUM is declared for raw losses only
        monitor={"every": 3},
        checkpoint={"every_steps": 4},
        train={"epochs": 3, "batch_size": 16, "device": "cpu", "seed": 3},
    )
    d["out_dir"] = str(out)
    return d


def _strip(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.mark.parametrize("method", ["dwa", "rlw", "modo", "auto_lambda", "forum"])  # + extra batches, look-ahead
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, method):
    d_full = _config(tmp_path, tmp_path / "full", method)
    d_kill = _config(tmp_path, tmp_path / "killed", method)
    # 6 steps per epoch; checkpoints after global steps 4 and 8 (mid-epoch) and at epoch ends;
    # the process dies after step 9, i.e. in the middle of epoch 2, one step after a checkpoint
    script = tmp_path / "killme.py"
    script.write_text(SCRIPT)
    # one intra-op thread, as this process runs (tests/conftest.py): the killed run's first 8 steps are compared bit
    # for bit with this process's, and a CI machine's default thread count (its cores) may split a kernel otherwise
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(d_kill), "9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = tmp_path / "killed"
    assert not (killed / "results.json").exists()
    ckpt = load_checkpoint(killed / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 2, 8)

    resumed = run(validate_config(d_kill), resume=True, quiet=True)
    full = run(validate_config(d_full), quiet=True)

    assert resumed["metrics"] == full["metrics"]  # exact, not approximately
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["steps"] == full["steps"] == 18
    assert resumed["history"] == full["history"]
    assert resumed["diagnostics"]["final"] == full["diagnostics"]["final"]
    assert _strip(read_jsonl(killed / "log.jsonl")) == _strip(read_jsonl(tmp_path / "full" / "log.jsonl"))
    wa = torch.load(killed / "best.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "full" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
