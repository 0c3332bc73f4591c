"""Your own benchmark, model and method as a plugin (docs/benchmark.md, "Your own benchmark, model and method").

The plugin modules are written into ``tmp_path`` and imported in SUBPROCESSES (the pytest process's method
registry, which docs/methods.md mirrors, stays untouched), except where a test imports nothing that registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtlens.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your own benchmark, model and method"


def _section() -> str:
    text = (ROOT / "docs" / "benchmark.md").read_text()
    section = text[text.index(SECTION):]
    return section[: section.index("\n## ", len(SECTION))]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), flags=re.S)


def _env(tmp_path: Path, *, plugin_dir: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MTLENS_PLUGINS"}
    paths = ([str(tmp_path)] if plugin_dir else []) + [str(ROOT / "src")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MTLENS_CACHE_DIR"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def _mtlens(tmp_path: Path, *args: str, timeout: float = 300, cwd: Path | None = None,
            **env_kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtlens.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd or tmp_path, env=_env(tmp_path, **env_kw), timeout=timeout)


def _python(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(tmp_path), timeout=120)


def _write_doc_plugin(tmp_path: Path) -> None:
    (tmp_path / "my_mtl.py").write_text(_blocks("python")[0])
    (tmp_path / "my-suite.yaml").write_text(_blocks("yaml")[0])


def test_the_docs_plugin_and_suite_run_as_written(tmp_path):
    """The section's module and suite, with the section's command (shrunk by --set: 1 seed, 1 epoch, 2 methods)."""
    _write_doc_plugin(tmp_path)
    assert "PYTHONPATH=. mtlens bench my-suite.yaml --out bench/mine" in _blocks("bash")[0]
    res = _mtlens(tmp_path, "bench", "my-suite.yaml", "--out", "bench/mine", "--workers", "1",
                  "--set", "seeds=[0]", "--set", "methods=[ew, init_ratio, mgda]", "--set", "train.epochs=1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Warning" not in res.stderr  # the example itself warns of nothing (torch.bucketize did, once)
    for label in ("init_ratio", "mgda (param)", "mgda (feature)", "ew + rep_mtl"):
        assert label in res.stdout
    report = (tmp_path / "bench" / "mine" / "report" / "report.md").read_text()
    assert "three-tasks: leaderboard" in report and "init_ratio" in report
    # which row "wins" is read from the order: both the terminal and the report say what orders the rows
    assert "three-tasks: leaderboard (sorted by MR;" in res.stdout
    assert "rows are sorted by MR, which weighs every test metric alike" in report
    # each note and the status on its own line (rich joined them: "... timings.peak_memory) 8 runs in the store")
    lines = res.stdout.splitlines()
    status = [ln for ln in lines if "runs in the store" in ln]
    assert status and all(ln.startswith(tuple("0123456789")) for ln in status), status
    assert any(ln.startswith("note: peak memory") for ln in lines)


def test_every_command_sees_the_plugin_with_the_plugin_option_or_the_environment(tmp_path):
    _write_doc_plugin(tmp_path)
    listed = _mtlens(tmp_path, "--plugin", "my_mtl", "methods")
    assert listed.returncode == 0 and "init_ratio" in listed.stdout, listed.stderr
    data = _mtlens(tmp_path, "datasets", MTLENS_PLUGINS="my_mtl")
    assert data.returncode == 0 and "three-tasks" in data.stdout, data.stderr
    (tmp_path / "run.yaml").write_text("data: {benchmark: three-tasks}\nmethod: {name: init_ratio}\n"
                                       "train: {epochs: 1, device: cpu}\n")
    trained = _mtlens(tmp_path, "--plugin", "my_mtl", "train", "--config", "run.yaml", "--out", "run", "--quiet")
    assert trained.returncode == 0, trained.stderr
    evaluated = _mtlens(tmp_path, "--plugin", "my_mtl", "eval", "run")
    assert evaluated.returncode == 0, evaluated.stderr
    # without the plugin: one line naming the fix, exit code 2
    bare = _mtlens(tmp_path, "eval", "run")
    assert bare.returncode == 2
    assert "unknown benchmark 'three-tasks'" in bare.stderr and "--plugin MODULE" in bare.stderr
    assert "Traceback" not in bare.stderr


def test_a_plugin_beside_the_suite_but_not_importable_names_the_pythonpath(tmp_path):
    _write_doc_plugin(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # python -m puts the working directory on sys.path: run from another one
    elsewhere.mkdir()
    res = _mtlens(tmp_path, "bench", str(tmp_path / "my-suite.yaml"), "--out", "bench/mine", plugin_dir=False,
                  cwd=elsewhere)
    assert res.returncode == 2
    assert "cannot import 'my_mtl'" in res.stderr and f"PYTHONPATH={tmp_path.resolve()}" in res.stderr
    missing = _mtlens(tmp_path, "--plugin", "no_such_plugin_mod", "methods")
    assert missing.returncode == 2 and "--plugin: cannot import 'no_such_plugin_mod'" in missing.stderr


def test_a_plugin_whose_own_import_is_missing_says_so(tmp_path):
    (tmp_path / "needs_more.py").write_text("import no_such_dependency_xyz\n")
    res = _mtlens(tmp_path, "--plugin", "needs_more", "methods")
    assert res.returncode == 2
    assert "importing 'needs_more' failed: No module named 'no_such_dependency_xyz'" in res.stderr


def test_unknown_names_of_every_registry_name_the_plugin_fix():
    from mtlens.methods import create
    from mtlens.models import create as create_model
    from mtlens.tasks import get_benchmark

    for call in (lambda: get_benchmark("my-bench"), lambda: create("my_method"),
                 lambda: create_model("my-net", {"a": 1})):
        with pytest.raises(ConfigurationError, match=r"mtlens --plugin MODULE"):
            call()


def test_a_plugin_method_with_a_builtin_name_is_refused_at_its_own_registration(tmp_path):
    """Before: the built-ins registered lazily AFTER the plugin, so the clash surfaced at the first create() as
    "method name 'pcgrad' registered twice", raised from mtlens's own pcgrad module."""
    code = (
        "import torch\n"
        "from mtlens.methods import LossWeighting, register\n"
        "class Mine(LossWeighting):\n"
        "    name = 'pcgrad'\n"
        "    def weights(self, losses, grad_norms=None):\n"
        "        return torch.ones_like(losses)\n"
        "try:\n"
        "    register(Mine)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
        "from mtlens.methods import create\n"
        "print(type(create('pcgrad')).__module__)\n"
    )
    res = _python(tmp_path, code)
    assert res.returncode == 0, res.stderr
    assert "refused: method name 'pcgrad' is already registered (by mtlens.methods.pcgrad.PCGrad)" in res.stdout
    assert res.stdout.strip().endswith("mtlens.methods.pcgrad")


def test_a_plugin_benchmark_replaces_the_builtin_of_its_name_even_before_any_lookup(tmp_path):
    """Before: the built-ins registered at the first lookup, after the plugin, and silently replaced it."""
    code = (
        "from mtlens.tasks import get_benchmark, register_benchmark\n"
        "base = None\n"
        "@register_benchmark('multimnist')\n"
        "def mine():\n"
        "    from dataclasses import replace\n"
        "    from mtlens.tasks.benchmarks import multimnist\n"
        "    return replace(multimnist(), description='mine')\n"
        "print(get_benchmark('multimnist').description)\n"
    )
    res = _python(tmp_path, code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "mine"


def _tuple_items(root=None, seed=0):
    import torch
    from torch.utils.data import TensorDataset

    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(seed))
    ds = TensorDataset(x, (x[:, 0] > 0).long(), x[:, 1:2])  # items (x, a, b): not mtlens's form
    return {"train": ds, "val": ds, "test": ds}


def _multi_without_target(root=None, seed=0):
    class Items:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            import torch

            return {"input": torch.randn(4), "label": 0}  # "label": the form wants "target"

    return {split: {"p": Items(), "q": Items()} for split in ("train", "val", "test")}


@pytest.mark.parametrize("multi", [False, True])
def test_a_benchmark_whose_items_have_another_form_is_told_the_form(tmp_path, multi):
    """Before: TypeError "list indices must be integers or slices, not str" (single input) or KeyError 'target'
    (multi-input) with a traceback from inside the training loop."""
    from mtlens.errors import DataError
    from mtlens.tasks import BenchmarkSpec, classification_task, register_benchmark, regression_task
    from mtlens.tasks.spec import _BENCHMARKS
    from mtlens.train import run, validate_config

    name = "plugin-test-multi" if multi else "plugin-test-tuples"
    tasks = ({"p": classification_task("p", 2), "q": classification_task("q", 2)} if multi
             else {"a": classification_task("a", 2), "b": regression_task("b")})
    register_benchmark(name)(lambda: BenchmarkSpec(
        name=name, tasks=tasks, multi_input=multi, dense=False, default_model="mlp", in_channels=4,
        make_datasets=_multi_without_target if multi else _tuple_items, needs_root=False))
    try:
        cfg = validate_config({"data": {"benchmark": name}, "model": {"preset": "mlp", "kwargs": {"hidden": [8]}},
                               "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
                               "out_dir": str(tmp_path / "run")})
        want = (r"a batch must be \{\"input\": x, \"target\": y\} for task 'p'.*got a dict with keys \['input', "
                r"'label'\]" if multi else
                r"benchmark 'plugin-test-tuples': a batch must be \{\"input\": x, \"targets\": \{task: y\}\} "
                r"with a target for every task \['a', 'b'\]; got a list")
        with pytest.raises(DataError, match=want):
            run(cfg, quiet=True)
    finally:
        _BENCHMARKS.pop(name)


def test_bench_workers_import_the_plugin_option_too(tmp_path):
    """`mtlens --plugin MOD bench` on a suite without `plugins:`: the spawned workers import MOD as well."""
    _write_doc_plugin(tmp_path)
    suite = (tmp_path / "my-suite.yaml").read_text().replace("plugins: [my_mtl]\n", "")
    (tmp_path / "no-plugins.yaml").write_text(suite)
    res = _mtlens(tmp_path, "--plugin", "my_mtl", "bench", "no-plugins.yaml", "--out", "bench/w", "--workers", "2",
                  "--set", "seeds=[0]", "--set", "methods=[init_ratio]", "--set", "train.epochs=1",
                  "--set", "variants={none: {}}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 runs in the store: 4 finished" in res.stdout  # 3 STL baselines + init_ratio
