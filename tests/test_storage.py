"""mtlens.storage: content hashes catch flipped bits, directory locks admit one writer, no temp-file litter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from mtlens.errors import IntegrityError, LockHeldError, OutputPathError
from mtlens.storage import (
    HASH_KEY,
    LOCK_NAME,
    DirectoryLock,
    atomic_write,
    atomic_write_text,
    content_digest,
    load_torch,
    lock_directory,
    output_path_error,
    read_json,
    read_lock_holder,
    remove_stale_temps,
    save_torch,
    write_json,
)


def _flip_bit_in(path, needle: bytes, bit: int = 3) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at >= 0, "tensor bytes not found in the file"
    raw[at + len(needle) // 2] ^= 1 << bit
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# content hashes
def test_digest_is_stable_through_torch_round_trip(tmp_path):
    payload = {
        "model": {"w": torch.randn(5, 3), "b": torch.zeros(3, dtype=torch.float16), "n": torch.tensor(7)},
        "rng": (torch.get_rng_state(), np.random.get_state()[1].tolist(), None),
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
        "np_scalar": np.float32(1.5),
        "history": [{"epoch": 1, "val": {"acc": 0.5, "loss": float("inf")}}],
        "flags": {True, False},
    }
    save_torch(payload, tmp_path / "x.pt")
    back = load_torch(tmp_path / "x.pt")
    assert back[HASH_KEY] == content_digest(payload)
    assert torch.load(tmp_path / "x.pt", weights_only=False)["model"]["w"].shape == (5, 3)  # still a plain .pt


def test_digest_tells_apart_what_pickle_might_conflate():
    assert content_digest([1, 2]) != content_digest((1, 2))
    assert content_digest({"a": 1}) != content_digest({"a": 1.0})
    assert content_digest(torch.zeros(2, 3)) != content_digest(torch.zeros(3, 2))
    assert content_digest(torch.zeros(2, dtype=torch.float32)) != content_digest(torch.zeros(2, dtype=torch.int32))
    assert content_digest(-0.0) != content_digest(0.0)


def test_flipped_bit_in_a_tensor_is_detected_and_names_the_file(tmp_path):
    w = torch.randn(64, 64)
    save_torch({"format": "x", "model": {"w": w}}, tmp_path / "best.pt")
    # torch.load itself does not notice: it returns the altered weight
    _flip_bit_in(tmp_path / "best.pt", w.numpy().tobytes()[512:576])
    loaded = torch.load(tmp_path / "best.pt", weights_only=False)["model"]["w"]
    assert not torch.equal(loaded, w)
    with pytest.raises(IntegrityError, match=r"best\.pt.*corrupt"):
        load_torch(tmp_path / "best.pt")


def test_missing_hash_is_refused_unless_optional(tmp_path):
    torch.save({"format": "x", "model": {}}, tmp_path / "old.pt")
    with pytest.raises(IntegrityError, match=r"old\.pt.*no content hash"):
        load_torch(tmp_path / "old.pt")
    assert load_torch(tmp_path / "old.pt", required=False)["format"] == "x"


def test_json_hash_round_trip_and_corruption(tmp_path):
    obj = {"metrics": {"test": {"a": {"acc": 91.25}}}, "delta": float("nan"), 3: [1, 2.0, "x"]}
    written = write_json(tmp_path / "results.json", obj)
    text = (tmp_path / "results.json").read_text()
    back = read_json(tmp_path / "results.json")
    assert back == written and back["delta"] == "nan" and back["3"] == [1, 2.0, "x"]
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)  # standard JSON
    # one changed digit in a metric: caught
    (tmp_path / "results.json").write_text(text.replace("91.25", "91.35"))
    with pytest.raises(IntegrityError, match=r"results\.json.*corrupt"):
        read_json(tmp_path / "results.json")
    # a flipped bit that breaks the JSON syntax: caught with the file name
    (tmp_path / "results.json").write_text(text.replace("{", "}", 1))
    with pytest.raises(IntegrityError, match=r"results\.json.*not valid JSON"):
        read_json(tmp_path / "results.json")


def test_json_without_hash(tmp_path):
    (tmp_path / "plain.json").write_text('{"a": {"acc": 1.0}}')
    assert read_json(tmp_path / "plain.json", required=False) == {"a": {"acc": 1.0}}
    with pytest.raises(IntegrityError, match="no content hash"):
        read_json(tmp_path / "plain.json")


def test_json_hash_survives_reformatting(tmp_path):
    write_json(tmp_path / "r.json", {"b": 1, "a": [1.5, {"z": None}]})
    obj = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(obj, indent=None, sort_keys=True))
    assert read_json(tmp_path / "r.json")["a"] == [1.5, {"z": None}]


# ---------------------------------------------------------------------------------------------
# atomic writes
def test_failed_write_leaves_no_temp_file_and_old_content(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def boom(fh):
        fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, "w", boom)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_disk_full_inside_torch_save_surfaces_as_oserror_with_the_path(tmp_path, monkeypatch):
    import errno

    real_write = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.fh, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    monkeypatch.setattr("mtlens.storage.os.fdopen", lambda fd, mode: Full(real_write(fd, mode)))
    with pytest.raises(OSError) as info:  # torch.save alone would raise "RuntimeError: unexpected pos"
        save_torch({"w": torch.randn(1000)}, tmp_path / "checkpoint.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []
    msg = str(output_path_error(info.value))
    assert "checkpoint.pt" in msg and "disk is full" in msg and "--resume" in msg


KILL_IN_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from mtlens.storage import atomic_write
    def die(fh):
        fh.write("partial")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(sys.argv[1], "w", die)
    """
)


@pytest.mark.slow
def test_sigkill_inside_atomic_write_leftover_is_cleaned_by_the_next_lock(tmp_path):
    target = tmp_path / "run" / "results.json"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and not target.exists()
    with DirectoryLock(tmp_path / "run"):
        assert [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []
    assert remove_stale_temps(tmp_path / "run") == []


# ---------------------------------------------------------------------------------------------
# directory locks
HOLDER = textwrap.dedent(
    """
    import sys, time
    from mtlens.storage import DirectoryLock
    lock = DirectoryLock(sys.argv[1], purpose="test holder").acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
    """
)


def _start_holder(directory):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


@pytest.mark.slow
def test_second_writer_gets_an_error_naming_the_holder_then_the_lock_frees_on_sigkill(tmp_path):
    d = tmp_path / "run"
    proc = _start_holder(d)
    try:
        with pytest.raises(LockHeldError) as info:
            DirectoryLock(d).acquire()
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "test holder" in msg
        assert "UTC" in msg and str(d) in msg
        holder = read_lock_holder(d)
        assert holder["pid"] == proc.pid
        # the holder dies without any cleanup: its lock is not stale, the kernel dropped it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        with DirectoryLock(d, purpose="second") as lock:
            assert lock.held and read_lock_holder(d)["pid"] == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_waiting_acquire_gets_the_lock_when_the_holder_exits(tmp_path):
    d = tmp_path / "entry"
    proc = _start_holder(d)
    seen = []
    # the holder leaves 0.3 s after this process found its lock held, not on a clock started before: under load
    # (CI) the main thread could reach its first try after a fixed timer had already freed the lock (no wait seen)
    t = threading.Timer(0.3, proc.stdin.close)

    def waiting(holder):
        seen.append(holder)
        t.start()  # a second call (on_wait is called once) raises here

    try:
        t0 = time.monotonic()
        with DirectoryLock(d, timeout=120, on_wait=waiting, poll_s=0.05):  # finite: a wait never announced fails
            waited = time.monotonic() - t0
        t.join()
        assert len(seen) == 1 and seen[0]["pid"] == proc.pid and waited >= 0.3
    finally:
        t.cancel()
        proc.kill()
        proc.wait()


def test_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    d = tmp_path / "run"
    with lock_directory(d, purpose="outer"):
        with DirectoryLock(d, purpose="inner"):  # the trainer inside a worker that holds the directory
            pass
        errors = []

        def other():
            try:
                DirectoryLock(d).acquire()
            except LockHeldError as exc:
                errors.append(str(exc))

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert errors and "another thread of this process" in errors[0]
        # the inner release did not free the outer lock
        assert read_lock_holder(d)["purpose"] == "outer"
    with DirectoryLock(d):  # free again
        pass
    assert (d / LOCK_NAME).exists()


def test_lock_on_a_path_that_is_a_file_is_an_output_path_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError) as info:
        DirectoryLock(f).acquire()
    msg = str(output_path_error(info.value))
    assert str(f) in msg and "is a file" in msg
    with pytest.raises(OSError) as info:
        DirectoryLock(f / "sub" / "run").acquire()
    msg = str(output_path_error(info.value))
    assert f"'{f}' is a file" in msg
    assert isinstance(output_path_error(info.value), OutputPathError)


# -- log.jsonl: a hash chain over the lines (issue 11, class 1) ----------------------------------
def _log(tmp_path, n=4):
    from mtlens.train.records import JsonlWriter

    w = JsonlWriter(tmp_path / "log.jsonl")
    offsets = []
    for i in range(n):
        w.write({"type": "step", "global_step": i, "loss": 1.0 / (i + 1), "bad": float("nan")})
        offsets.append(w.offset())
    w.close()
    return tmp_path / "log.jsonl", offsets


def test_log_jsonl_round_trips_with_a_hash_per_line(tmp_path):
    from mtlens.train.records import read_jsonl

    path, _ = _log(tmp_path)
    records = read_jsonl(path)
    assert [r["global_step"] for r in records] == [0, 1, 2, 3]
    assert records[0]["bad"] == "nan" and "content_sha256" not in records[0]
    assert all("content_sha256" in json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.parametrize("damage", ["flip", "delete", "swap", "unhashed"])
def test_log_jsonl_damage_is_detected_naming_file_and_line(tmp_path, damage):
    from mtlens.train.records import read_jsonl

    path, _ = _log(tmp_path)
    lines = path.read_text().splitlines()
    if damage == "flip":
        lines[2] = lines[2].replace('"global_step": 2', '"global_step": 3')
    elif damage == "delete":
        del lines[1]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "content_sha256"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(IntegrityError, match=r"log\.jsonl' line 2|log\.jsonl' line 3"):
        read_jsonl(path)


def test_log_jsonl_torn_tail_only_when_allowed(tmp_path):
    from mtlens.train.records import read_jsonl

    path, _ = _log(tmp_path)
    with open(path, "a") as fh:
        fh.write('{"type": "step", "glo')  # a writer killed mid-line
    assert len(read_jsonl(path, allow_torn_tail=True)) == 4
    with pytest.raises(IntegrityError, match="line 5 is not valid JSON"):
        read_jsonl(path)


def test_log_jsonl_resume_truncates_verifies_and_continues_the_chain(tmp_path):
    from mtlens.train.records import JsonlWriter, read_jsonl

    path, offsets = _log(tmp_path)
    w = JsonlWriter(path)
    w.truncate(offsets[1])  # back to the checkpoint after line 2
    w.write({"type": "step", "global_step": 2, "loss": 0.25})
    w.close()
    assert [r["global_step"] for r in read_jsonl(path)] == [0, 1, 2]
    # a corrupted line before the checkpoint is caught when the resumed run truncates
    text = path.read_text().replace('"global_step": 0', '"global_step": 9')
    path.write_text(text)
    with pytest.raises(IntegrityError, match="line 1 is corrupt"):
        JsonlWriter(path).truncate(offsets[0])


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """mkstemp creates 0600 files; a report or result shared with a group must not be private."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
