"""The command line's rough edges (issue 12, items 5-10), each run as a subprocess: output and exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mtlens.train.config import available_presets, preset_path


def _env(tmp_path: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    paths = ([str(extra_path)] if extra_path else []) + [src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MTLENS_CACHE_DIR"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "80"  # narrow: rich wraps long lines there
    return env


def mtlens(tmp_path: Path, *args, extra_path: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "mtlens.cli.main", *map(str, args)],
        capture_output=True, text=True, env=_env(tmp_path, extra_path), cwd=tmp_path, timeout=timeout,
    )


# -- item 5: presets --show prints the file itself -------------------------------------------------
@pytest.mark.parametrize("name", available_presets())
def test_presets_show_redirected_is_the_preset_file_and_valid_yaml(tmp_path, name):
    res = mtlens(tmp_path, "presets", "--show", name)
    assert res.returncode == 0, res.stderr
    assert res.stdout == preset_path(name).read_text()  # byte for byte: no wrapping, no markup
    (tmp_path / "my.yaml").write_text(res.stdout)
    assert yaml.safe_load((tmp_path / "my.yaml").read_text()) == yaml.safe_load(preset_path(name).read_text())


def test_presets_show_round_trips_through_train_config(tmp_path):
    res = mtlens(tmp_path, "presets", "--show", "quick-multimnist")
    (tmp_path / "my.yaml").write_text(res.stdout)
    from mtlens.train import load_config

    mine, preset = load_config(config_file=tmp_path / "my.yaml"), load_config(preset="quick-multimnist")
    assert mine.digest() == preset.digest()  # everything but the run's name


# -- item 7: the extra's name survives the CLI -----------------------------------------------------
def test_missing_optional_dependency_keeps_the_extra_name(tmp_path):
    shadow = tmp_path / "shadow"
    (shadow / "ecos").mkdir(parents=True)
    (shadow / "ecos" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    res = mtlens(tmp_path, "train", "--preset", "quick-multimnist", "--set", "method.name=nash_mtl",
                 "--set", "regularizers=[]", "--out", tmp_path / "run", extra_path=shadow)
    assert res.returncode == 1, res.stderr
    assert "pip install 'mtlens[nash]'" in res.stderr
    assert "Traceback" not in res.stderr


# -- item 8: Ctrl-C offers --resume only when there is a checkpoint --------------------------------
def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 120) -> tuple[str, str]:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the run ended or stalled before the interruption point:\n{err}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)


_HOLD_AT_STEP = """
import time

from mtlens.train import Callback, Trainer


class _HoldForTheCtrlC(Callback):  # the test's Ctrl-C may land anywhere before this step; the run cannot outrun it
    def on_step_end(self, trainer, log):
        if trainer.global_step == {step}:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.05)


_init = Trainer.__init__


def _with_the_hold(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.callbacks.append(_HoldForTheCtrlC())


Trainer.__init__ = _with_the_hold
"""


def _hold_at(tmp_path: Path, step: int) -> Path:
    """A ``sitecustomize`` (for ``extra_path``) that holds the run at the end of global step ``step`` until a signal
    ends it (2 minutes at most): a test that interrupts the run between two points of it no longer races the run
    to its end on a fast or busy machine (the run went on for about a second after the point the test waits for)."""
    shadow = tmp_path / "hold"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(_HOLD_AT_STEP.replace("{step}", str(step)))
    return shadow


def _train_popen(tmp_path: Path, out: Path, *sets: str, extra_path: Path | None = None) -> subprocess.Popen:
    args = ["train", "--preset", "quick-multimnist", "--set", "baseline=null", "--set", "monitor.every=0",
            "--out", out]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(
        [sys.executable, "-m", "mtlens.cli.main", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path, extra_path), cwd=tmp_path,
        # a test runner started in the background (`cmd &` in a script) ignores SIGINT, and the
        # child would inherit that: give it the default disposition a terminal user has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_does_not_offer_resume(tmp_path):
    out = tmp_path / "run"
    proc = _train_popen(tmp_path, out, extra_path=_hold_at(tmp_path, 1))  # the first checkpoint ends epoch 1
    _, err = _interrupt_when(proc, lambda: (out / "config.yaml").is_file())
    assert proc.returncode == 130, err
    assert not (out / "checkpoint.pt").exists()
    assert "nothing to resume" in err and "--resume" in err and "continue with" not in err
    assert "Traceback" not in err


_CTRL_C_IN_A_STRING_EXEC = """
import sys


class _CtrlCInAStringExec:  # a Ctrl-C landing in code a string exec runs (dataclasses, namedtuple build methods so)
    def find_spec(self, name, path=None, target=None):
        if name == "mtlens.train.memory":  # imported by the training loop, inside run()
            sys.meta_path.remove(self)
            exec("raise KeyboardInterrupt", {})
        return None


sys.meta_path.insert(0, _CtrlCInAStringExec())
"""


def test_ctrl_c_inside_a_string_exec_still_exits_130(tmp_path):
    """CI once saw the interrupted run's message and then status -2: CPython kills a `python -m` process with SIGINT
    at exit when a KeyboardInterrupt ended a string exec, even a caught one (cli/main.py::_exit_interrupted)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(_CTRL_C_IN_A_STRING_EXEC)
    out = tmp_path / "run"
    proc = _train_popen(tmp_path, out, extra_path=shadow)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "nothing to resume" in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_after_a_checkpoint_offers_a_resume_that_works(tmp_path):
    out = tmp_path / "run"
    proc = _train_popen(tmp_path, out, "train.epochs=2", "train.max_steps_per_epoch=6", "checkpoint.every_steps=1",
                        extra_path=_hold_at(tmp_path, 12))  # the last step
    _, err = _interrupt_when(proc, lambda: (out / "checkpoint.pt").is_file())
    assert proc.returncode == 130, err
    command = f"mtlens train --out {out} --resume"
    assert f"continue with: {command}" in " ".join(err.split())
    res = mtlens(tmp_path, *command.split()[1:], "--quiet")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out / "results.json")


# -- item 6: the data is checked before anything slow; no network unless asked ----------------------
def _offline_env_args(tmp_path):
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "TORCH_HOME": str(tmp_path / "torch")}


def test_wrong_data_root_is_reported_before_the_weights(tmp_path, monkeypatch):
    for k, v in _offline_env_args(tmp_path).items():
        monkeypatch.setenv(k, v)
    res = mtlens(tmp_path, "train", "--preset", "efficiency-nyuv2", "--set", "data.root=/wrong",
                 "--out", tmp_path / "run", timeout=60)
    assert res.returncode == 1, res.stderr
    assert "/wrong" in res.stderr and "Expected layout" in res.stderr
    assert "ImageNet" not in res.stderr and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) > 3 and any(ln.strip().startswith("train/") for ln in lines)  # the tree, one entry a line


def test_pretrained_weights_not_cached_name_the_fix_without_downloading(tmp_path, monkeypatch):
    from mtlens.data.fixtures import write_nyuv2_fixture

    for k, v in _offline_env_args(tmp_path).items():
        monkeypatch.setenv(k, v)
    root = write_nyuv2_fixture(tmp_path / "nyuv2")
    res = mtlens(tmp_path, "train", "--preset", "efficiency-nyuv2", "--set", f"data.root={root}",
                 "--set", "data.options.check_size=false", "--set", "train.batch_size=2", "--set", "baseline=null",
                 "--out", tmp_path / "run", timeout=60)
    assert res.returncode == 1, res.stderr
    assert "resnet18.tv_in1k" in res.stderr and "--set model.kwargs.download=true" in " ".join(res.stderr.split())


# -- item 9: `mtlens datasets` tells the truth --------------------------------------------------------
def test_datasets_does_not_promise_fashion_mnist_without_its_files(tmp_path):
    from mtlens.data.mnist import find_fashion_mnist

    res = mtlens(tmp_path, "datasets", "multifashion")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    if find_fashion_mnist() is None:
        assert "needs the Fashion-MNIST files" in text and "apt-get install dataset-fashion-mnist" in text
        assert "no root needed" not in text
    else:
        assert "data: no root needed" in text


def test_datasets_check_reads_every_file_and_finds_a_truncated_one(tmp_path):
    from mtlens.data.fixtures import write_nyuv2_fixture

    root = write_nyuv2_fixture(tmp_path / "nyuv2", n_train=4, n_test=2, size=(288, 384))  # the checked size
    ok = mtlens(tmp_path, "datasets", "nyuv2", "--check", "--root", f"nyuv2={root}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ok_flat = "".join(ok.stdout.split())
    assert "available" in ok_flat and "unavailable" not in ok_flat, ok.stdout

    victim = root / "train" / "depth" / "3.npy"  # not the sample the loader checks eagerly
    victim.write_bytes(victim.read_bytes()[:-40])
    bad = mtlens(tmp_path, "datasets", "nyuv2", "--check", "--root", f"nyuv2={root}")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    flat = "".join(bad.stdout.split())  # rich folds long cells at COLUMNS=80, possibly inside a word
    assert "unavailable" in flat and "3.npy" in flat, bad.stdout
    listing = mtlens(tmp_path, "datasets", "--check", "--root", f"nyuv2={root}")
    assert listing.returncode == 1 and "unavailable" in "".join(listing.stdout.split()), listing.stdout
