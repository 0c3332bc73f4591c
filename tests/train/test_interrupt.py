"""A Ctrl-C is never lost: a SIGINT whose KeyboardInterrupt Python drops (raised inside a callback Python calls on
its own, e.g. the import machinery's weakref callback) still stops the training loop at its next step."""

from __future__ import annotations

import contextlib
import signal

import pytest

from mtlens.train import interrupt, load_config
from mtlens.train.trainer import Trainer


@pytest.fixture(autouse=True)
def _default_sigint():
    """Python's own SIGINT handler, as in a terminal: a test run started in the background (``cmd &`` in a script,
    some CI runners) inherits an ignored SIGINT, which ``catching()`` deliberately leaves alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _dropped_sigint() -> None:
    """Deliver SIGINT where its KeyboardInterrupt is swallowed, as Python does inside a weakref callback."""
    with contextlib.suppress(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_a_dropped_sigint_is_raised_by_check_once():
    with interrupt.catching():
        interrupt.check()  # nothing pending
        _dropped_sigint()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        interrupt.check()  # acted on: cleared


def test_outside_catching_nothing_is_remembered_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    with interrupt.catching():
        assert signal.getsignal(signal.SIGINT) is not before
        _dropped_sigint()
    assert signal.getsignal(signal.SIGINT) is before
    interrupt.check()  # forgotten on exit
    with pytest.raises(KeyboardInterrupt):  # Python's own handler again
        signal.raise_signal(signal.SIGINT)


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.catching():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            interrupt.check()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_training_loop_stops_at_its_next_step_on_a_dropped_sigint(tmp_path):
    cfg = load_config(preset="quick-multimnist", overrides=[
        "method.name=ew", "regularizers=[]", "loss_transform=null", "train.epochs=1",
        "train.max_steps_per_epoch=3", "train.batch_size=8", "baseline=null", "train.device=cpu",
    ], out_dir=tmp_path / "run")
    trainer = Trainer(cfg, quiet=True, tensorboard=False)
    with interrupt.catching():
        _dropped_sigint()  # e.g. while the run imported its modules
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    assert trainer.global_step == 0


def test_the_dropped_raise_prints_no_traceback(monkeypatch):
    """Python reports an exception raised in a callback it runs itself through ``sys.unraisablehook`` ("Exception
    ignored in ..." and a traceback); a dropped Ctrl-C is acted on, so its report is not passed on. Others are."""
    import gc
    import sys
    import weakref

    seen: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_type))

    class Box:
        pass

    def drop(callback) -> None:
        box = Box()
        ref = weakref.ref(box, callback)
        del box
        gc.collect()
        assert ref() is None

    def interrupting(_ref) -> None:
        signal.raise_signal(signal.SIGINT)  # its KeyboardInterrupt is raised inside a weakref callback: dropped

    def failing(_ref) -> None:
        raise ValueError("not a Ctrl-C")

    with interrupt.catching():
        drop(interrupting)
        drop(failing)
        assert seen == [ValueError]
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    drop(interrupting)  # outside: Python's own report, as before
    assert seen == [ValueError, KeyboardInterrupt]


def test_a_sigint_during_a_checkpoint_write_lands_after_it(tmp_path):
    """Ctrl-C in the middle of ``torch.save`` (between two writes of the file) under ``deferred()``: the file is written
    whole and loads, then ``KeyboardInterrupt`` is raised — before, it was raised inside the zip writer's ``write``,
    whose cleanup failed with ``RuntimeError: unexpected pos``, and the run ended with that traceback (exit status 1,
    not 130)."""
    import torch

    from mtlens.storage import atomic_write

    class SigintOnSecondWrite:
        def __init__(self, fh):
            self.fh, self.calls = fh, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 2:
                signal.raise_signal(signal.SIGINT)
            return self.fh.write(data)

        def flush(self):
            return self.fh.flush()

    state = {"w": torch.arange(1000.0), "step": 3}
    path = tmp_path / "checkpoint.pt"
    written = False
    with interrupt.catching():
        with pytest.raises(KeyboardInterrupt), interrupt.deferred():
            atomic_write(path, "wb", lambda fh: torch.save(state, SigintOnSecondWrite(fh)))
            written = True
        assert written
        interrupt.check()  # acted on: cleared
    loaded = torch.load(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    # without deferred() the same signal raises inside the write: the atomic write leaves no file, and the save ends
    # in KeyboardInterrupt or torch's zip-writer error chained to it
    path2 = tmp_path / "other.pt"
    with interrupt.catching(), pytest.raises((KeyboardInterrupt, RuntimeError)):
        atomic_write(path2, "wb", lambda fh: torch.save(state, SigintOnSecondWrite(fh)))
    assert not path2.exists()
