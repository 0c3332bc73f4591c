"""Run directories under failure: corrupted files, two writers, a deleted log, output paths that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny_bench import tiny_config

from mtlens.errors import CheckpointError, IntegrityError, LockHeldError, OutputPathError
from mtlens.storage import DirectoryLock
from mtlens.train import Callback, Trainer, run, validate_config
from mtlens.train.baseline import stl_cache_key
from mtlens.train.evaluate import evaluate_checkpoint
from mtlens.train.records import read_jsonl

HERE = Path(__file__).resolve().parent


def _flip_bit_in_tensor(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of ``tensor`` (found by content) in ``path``."""
    raw = bytearray(path.read_bytes())
    needle = tensor.detach().cpu().contiguous().numpy().tobytes()
    needle = needle[len(needle) // 2 : len(needle) // 2 + 32]
    at = raw.find(needle)
    assert at >= 0
    raw[at + 17] ^= 0x10
    path.write_bytes(bytes(raw))


def _finished_run(tmp_path, **over):
    d = tiny_config(tmp_path, **over)
    res = run(validate_config(d), quiet=True)
    return d, Path(d["out_dir"]), res


def test_flipped_bit_in_best_pt_is_refused_by_eval_and_resume_keeps_results(tmp_path):
    d, out, _ = _finished_run(tmp_path)
    before = (out / "results.json").read_bytes()
    w = torch.load(out / "best.pt", weights_only=False)["model"]
    name = next(k for k, v in w.items() if v.dtype == torch.float32 and v.numel() >= 64)
    _flip_bit_in_tensor(out / "best.pt", w[name])
    with pytest.raises(IntegrityError, match=r"best\.pt"):
        evaluate_checkpoint(out / "best.pt", "test")
    # resuming the finished run neither re-tests the corrupted weights nor rewrites results.json
    again = run(validate_config(d), resume=True, quiet=True)
    assert (out / "results.json").read_bytes() == before
    assert again["metrics"] == json.loads(before)["metrics"]


def test_resume_of_a_finished_run_never_rewrites_results(tmp_path):
    d, out, res = _finished_run(tmp_path)
    stat = (out / "results.json").stat()
    again = run(validate_config(d), resume=True, quiet=True)
    assert (out / "results.json").stat().st_mtime_ns == stat.st_mtime_ns
    assert again["metrics"] == res["metrics"]
    # a corrupted results.json is reported, not silently replaced
    text = (out / "results.json").read_text()
    acc = f"{res['metrics']['test']['a']['acc']!r}"
    (out / "results.json").write_text(text.replace(acc, acc + "1", 1))
    with pytest.raises(IntegrityError, match=r"results\.json.*corrupt"):
        run(validate_config(d), resume=True, quiet=True)


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, log):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # stands in for a kill right after the step checkpoint


def _interrupted_run(tmp_path):
    d = tiny_config(tmp_path, checkpoint={"every_steps": 4}, train={"epochs": 2, "log_every": 1})
    with pytest.raises(KeyboardInterrupt):
        _fit_with(d, _StopAt(5))
    return d, Path(d["out_dir"])


def _fit_with(d, cb):
    return Trainer(validate_config(d), quiet=True, callbacks=[cb]).fit()


def test_flipped_bit_in_checkpoint_is_refused_on_resume(tmp_path):
    d, out = _interrupted_run(tmp_path)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    name = next(k for k, v in ck["model"].items() if v.numel() >= 64)
    _flip_bit_in_tensor(out / "checkpoint.pt", ck["model"][name])
    with pytest.raises(IntegrityError, match=r"checkpoint\.pt.*corrupt"):
        run(validate_config(d), resume=True, quiet=True)


def test_deleted_log_does_not_block_resume(tmp_path):
    d, out = _interrupted_run(tmp_path)
    (out / "log.jsonl").unlink()
    res = run(validate_config(d), resume=True, quiet=True, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    assert res["steps"] == 2 * res["steps_per_epoch"]
    records = read_jsonl(out / "log.jsonl")
    assert records[0]["type"] == "note" and "missing" in records[0]["note"]
    assert records[-1]["type"] == "epoch" and records[-1]["epoch"] == 2


def test_tmp_files_of_a_killed_write_are_removed_when_the_run_resumes(tmp_path):
    d, out = _interrupted_run(tmp_path)
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    run(validate_config(d), resume=True, quiet=True)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


SECOND = textwrap.dedent(
    """
    import json, sys
    import tiny_bench
    from mtlens.errors import LockHeldError
    from mtlens.train import run, validate_config
    try:
        run(validate_config(json.loads(sys.argv[1])), quiet=True)
    except LockHeldError as exc:
        print(exc)
        sys.exit(3)
    """
)


class _SecondWriter(Callback):
    """In epoch 1, start a second run with the same out_dir in another process."""

    def __init__(self, d):
        self.d, self.proc = d, None

    def on_step_end(self, trainer, log):
        if trainer.global_step == 1:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
            self.proc = subprocess.run(
                [sys.executable, "-c", SECOND, json.dumps(self.d)], env=env, capture_output=True, text=True, timeout=300
            )


@pytest.mark.slow
def test_two_writers_same_out_dir_second_gets_error_naming_the_first(tmp_path):
    d = tiny_config(tmp_path, train={"log_every": 1})
    second = _SecondWriter({**d, "train": {**d["train"], "seed": 1}})
    res = Trainer(validate_config(d), quiet=True, callbacks=[second]).fit()
    p = second.proc
    assert p.returncode == 3, p.stdout + p.stderr[-3000:]
    assert f"pid {os.getpid()}" in p.stdout and "in use by" in p.stdout and str(d["out_dir"]) in p.stdout
    # only the first run's records are in the log
    steps = [r for r in read_jsonl(Path(d["out_dir"]) / "log.jsonl") if r["type"] == "step"]
    assert [r["global_step"] for r in steps] == list(range(1, res["steps"] + 1))


def test_a_second_trainer_in_another_thread_is_refused(tmp_path):
    d = tiny_config(tmp_path)
    errors = []

    class Other(Callback):
        def on_step_end(self, trainer, log):
            if trainer.global_step == 1:

                def go():
                    try:
                        Trainer(validate_config(d), quiet=True).fit()
                    except LockHeldError as exc:
                        errors.append(str(exc))

                th = threading.Thread(target=go)
                th.start()
                th.join()

    Trainer(validate_config(d), quiet=True, callbacks=[Other()]).fit()
    assert errors and "another thread" in errors[0]


HOLD = textwrap.dedent(
    """
    import sys
    from mtlens.storage import DirectoryLock
    DirectoryLock(sys.argv[1], purpose="other baseline run").acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.slow
def test_baseline_cache_entry_in_use_is_waited_for(tmp_path):
    d = tiny_config(tmp_path, baseline="auto", train={"epochs": 1})
    cfg = validate_config(d)
    entry = Path(d["baseline_cache"]) / f"tiny-mtl-a-{stl_cache_key(cfg.for_stl('a'), 'cpu')}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(entry)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    # the holder leaves once the run says it waits (a timer started before the run could free the entry before
    # a slow run reached it: no wait, no message); the fallback only ends a run that never says so
    release = threading.Timer(0.2, holder.stdin.close)
    fallback = threading.Timer(120, holder.stdin.close)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fallback.start()
        lines = []

        class Rec(Console):
            def print(self, *a, **k):
                lines.append(" ".join(str(x) for x in a))
                if "waiting for" in lines[-1] and release.ident is None:  # not started yet
                    release.start()

        res = Trainer(cfg, quiet=False, console=Rec(file=open(os.devnull, "w"))).fit()  # noqa: SIM115
        assert any("waiting for" in ln and f"pid {holder.pid}" in ln for ln in lines), lines
        assert res["baseline"]["runs"]["a"] == str(entry) and (entry / "results.json").is_file()
    finally:
        fallback.cancel()  # a non-daemon timer left running would hold the test process open
        holder.kill()
        holder.wait()


def test_baseline_cache_entry_with_corrupt_results_names_the_entry(tmp_path):
    d = tiny_config(tmp_path, baseline="auto", train={"epochs": 1})
    run(validate_config(d), quiet=True)
    cfg = validate_config({**d, "out_dir": str(tmp_path / "run2")})
    entry = Path(d["baseline_cache"]) / f"tiny-mtl-b-{stl_cache_key(cfg.for_stl('b'), 'cpu')}"
    obj = json.loads((entry / "results.json").read_text())
    obj["metrics"]["test"]["b"]["mae"] = 0.0
    (entry / "results.json").write_text(json.dumps(obj))
    with pytest.raises(IntegrityError, match=f"delete the directory '{entry}'"):
        run(cfg, quiet=True)


def test_lock_is_released_after_fit_even_on_error(tmp_path):
    d, out = _interrupted_run(tmp_path)
    with DirectoryLock(out, timeout=0):
        pass


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    for out, needle in ((f, f"'{f}' is a file"), (f / "run", f"'{f}' is a file")):
        d = tiny_config(tmp_path)
        d["out_dir"] = str(out)
        with pytest.raises(OutputPathError, match=needle):
            run(validate_config(d), quiet=True)


def test_disk_full_while_checkpointing_names_the_file_and_resume(tmp_path, monkeypatch):
    from mtlens import storage

    real = storage._Recorder.write

    def write(self, data):
        if not isinstance(data, str):  # torch.save's bytes (the first is the best epoch's weights)
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real(self, data)

    monkeypatch.setattr(storage._Recorder, "write", write)
    d = tiny_config(tmp_path)
    with pytest.raises(OutputPathError, match=r"best-e0001\.pt.*disk is full.*--resume"):
        run(validate_config(d), quiet=True)


def test_read_only_output_dir_simulated(tmp_path, monkeypatch):
    """As root (CI containers) permissions are not enforced: the file system's answer is simulated."""
    import tempfile

    def mkstemp(*a, dir=None, **k):
        raise PermissionError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    d = tiny_config(tmp_path)
    with pytest.raises(OutputPathError, match=r"'.*run'.*read-only.*writable directory"):
        run(validate_config(d), quiet=True)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        d = tiny_config(tmp_path)
        d["out_dir"] = str(ro / "run")
        with pytest.raises(OutputPathError, match="read-only"):
            run(validate_config(d), quiet=True)
    finally:
        ro.chmod(0o700)


def test_run_dirs_never_wait_for_a_held_lock(tmp_path):
    d = tiny_config(tmp_path)
    with DirectoryLock(Path(d["out_dir"])):
        t = Trainer(validate_config(d), quiet=True)
        errors = []
        th = threading.Thread(target=lambda: errors.append(_try(t.fit)))
        th.start()
        th.join(timeout=60)
        assert not th.is_alive() and isinstance(errors[0], LockHeldError)


def _try(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_checkpoint_without_hash_is_refused(tmp_path):
    d, out = _interrupted_run(tmp_path)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    ck.pop("content_sha256")
    torch.save(ck, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="no content hash"):
        run(validate_config(d), resume=True, quiet=True)
