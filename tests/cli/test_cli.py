"""The command line: help, one-line errors with exit codes, train/eval/methods/datasets/presets/diagnose."""

import json

import pytest
import yaml
from tiny_bench import tiny_config
from typer.testing import CliRunner

from mtlens.cli.main import app

runner = CliRunner()
COMMANDS = ["train", "eval", "methods", "datasets", "presets", "diagnose"]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_has_examples(command):
    res = _invoke(command, "--help")
    assert res.exit_code == 0, res.output
    assert "Examples" in res.output and f"mtlens {command}" in res.output


def test_top_level_help_lists_commands():
    res = _invoke("--help")
    assert res.exit_code == 0
    for c in COMMANDS:
        assert c in res.output


def _write_config(tmp_path, **over):
    d = tiny_config(tmp_path, **over)
    d.pop("out_dir")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_bad_config_is_one_line_and_exit_code_2(tmp_path):
    cfg = _write_config(tmp_path)
    res = _invoke("train", "--config", cfg, "--set", "optim.lrr=1", "--out", tmp_path / "r")
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown key 'optim.lrr'" in lines[0] and "Traceback" not in res.output
    res = _invoke("train", "--config", cfg, "--set", "method.level=feature", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "loss-level method" in res.output
    res = _invoke("train")
    assert res.exit_code == 2 and "--preset" in res.output
    res = _invoke("train", "--preset", "nope")
    assert res.exit_code == 2 and "quick-multimnist" in res.output


def test_train_eval_diagnose_round_trip(tmp_path):
    cfg = _write_config(tmp_path, monitor={"every": 2}, baseline="auto")
    out = tmp_path / "run"
    res = _invoke("train", "--config", cfg, "--set", "train.epochs=2", "--out", out)
    assert res.exit_code == 0, res.output
    assert "test metrics (best epoch)" in res.output
    for name in ("delta_p_task", "delta_p_metric", "delta_m", "FD"):
        assert name in res.output
    results = json.loads((out / "results.json").read_text())

    res = _invoke("eval", out / "best.pt", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["metrics"] == results["metrics"]["test"]
    res = _invoke("eval", out, "--split", "val")
    assert res.exit_code == 0 and "val metrics" in res.output and "delta_p_task" in res.output

    res = _invoke("diagnose", out)
    assert res.exit_code == 0, res.output
    for png in ("losses.png", "weights.png", "fd.png", "gds.png", "gms.png", "val.png", "alpha.png"):
        f = out / "plots" / png
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "power-law α" in res.output and "encoder" in res.output

    # resume of a finished run; quiet prints only the results path
    res = _invoke("train", "--out", out, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("results.json")


def test_diagnose_without_monitor_notes_how_to_enable(tmp_path):
    cfg = _write_config(tmp_path)
    out = tmp_path / "run"
    assert _invoke("train", "--config", cfg, "--set", "train.epochs=1", "--out", out, "--quiet").exit_code == 0
    res = _invoke("diagnose", out, "--alpha", "none")
    assert res.exit_code == 0 and "monitor.every" in res.output
    assert (out / "plots" / "losses.png").is_file() and not (out / "plots" / "fd.png").exists()


def test_eval_of_a_missing_or_corrupt_file_is_one_line(tmp_path):
    res = _invoke("eval", tmp_path / "nothing.pt")
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = _invoke("eval", bad)
    assert res.exit_code == 1 and "bad.pt" in res.output


def test_methods_table():
    res = _invoke("methods")
    assert res.exit_code == 0
    for name in ("ew", "upgrad", "rep_mtl", "famo", "arXiv"):
        assert name in res.output
    rows = json.loads(_invoke("methods", "--json", "--family", "regularizer").output)
    assert {r["name"] for r in rows} >= {"rep_mtl"} and all(r["family"] == "regularizer" for r in rows)


def test_datasets_and_presets_listings():
    res = _invoke("datasets")
    assert res.exit_code == 0
    for name in ("multimnist", "synthetic-scenes", "nyuv2", "needs data.root"):
        assert name in res.output
    res = _invoke("datasets", "multimnist")
    assert res.exit_code == 0 and "acc ↑" in res.output and "data_seed" in res.output
    res = _invoke("datasets", "--check", "--root", "nope=/x")
    assert res.exit_code == 2 and "nope" in res.output
    res = _invoke("presets")
    assert res.exit_code == 0 and "quick-multimnist" in res.output and "repmtl-nyuv2" in res.output
    res = _invoke("presets", "--show", "quick-multimnist")
    assert res.exit_code == 0 and "rep_mtl" in res.output


def test_out_that_is_a_file_is_one_line_naming_it(tmp_path):
    cfg = _write_config(tmp_path)
    f = tmp_path / "taken.txt"
    f.write_text("x")
    for out in (f, f / "run"):
        res = _invoke("train", "--config", cfg, "--out", out)
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
        assert str(f) in " ".join(lines) and "is a file" in lines[0] and "--out" in lines[0]


def test_eval_json_is_strict_json_with_non_finite_values(tmp_path, monkeypatch):
    import mtlens.train

    fake = {"checkpoint": "x.pt", "epoch": 1, "split": "test", "tasks": ["a"], "metrics": {"a": {"acc": 16.9}}}
    fake["losses"] = {"a": float("inf")}
    fake["delta"] = {"delta_m": float("nan")}
    monkeypatch.setattr(mtlens.train, "evaluate_checkpoint", lambda *a, **k: fake)
    res = _invoke("eval", tmp_path / "x.pt", "--json")
    assert res.exit_code == 0, res.output
    assert "Infinity" not in res.output and "NaN" not in res.output
    parsed = json.loads(res.output, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert parsed["losses"]["a"] == "inf" and parsed["metrics"]["a"]["acc"] == 16.9


def test_eval_of_a_best_pt_with_a_flipped_bit_is_one_line_and_exit_1(tmp_path):
    import torch

    cfg = _write_config(tmp_path)
    out = tmp_path / "run"
    assert _invoke("train", "--config", cfg, "--set", "train.epochs=1", "--out", out, "--quiet").exit_code == 0
    w = torch.load(out / "best.pt", weights_only=False)["model"]
    t = next(v for v in w.values() if v.dtype == torch.float32 and v.numel() >= 64)
    needle = t.numpy().tobytes()[64:96]
    raw = bytearray((out / "best.pt").read_bytes())
    raw[raw.find(needle) + 5] ^= 0x04
    (out / "best.pt").write_bytes(bytes(raw))
    res = _invoke("eval", out / "best.pt", "--json")
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "best.pt" in lines[0] and "corrupt" in lines[0]
