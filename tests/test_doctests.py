"""Every ``>>>`` example in the docstrings of ``src/mtlens`` runs and prints what it shows.

One test per module that has examples (found by reading the files, so a module is imported only
when it has something to run). Examples run with the standard library's :mod:`doctest` in the
module's namespace, with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``. An example that cannot run in
a test (real data, a full training run) carries ``# doctest: +SKIP`` and a reason beside it;
:data:`SKIP_ALLOWED` lists the modules allowed to have such examples, so a new skip is a
deliberate change of this file.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

import mtlens

PACKAGE = Path(mtlens.__file__).resolve().parent
EXAMPLE = re.compile(r"^\s*>>> ", re.MULTILINE)
SKIP = re.compile(r"#\s*doctest:\s*\+SKIP")

#: Modules allowed to keep skipped examples, each with the reason.
SKIP_ALLOWED: dict[str, str] = {
    "mtlens.bench.report": "write_report needs a finished results store (a bench run)",
    "mtlens.bench.runner": "run_suite trains every run of the suite (minutes)",
    "mtlens.train.trainer": "Trainer.fit trains a model on real data",
}


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not EXAMPLE.search(path.read_text(encoding="utf-8")):
            continue
        parts = ("mtlens", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


MODULES = _modules_with_examples()


def test_the_package_has_examples():
    """Guards the collection itself: a broken file search would otherwise pass with nothing run."""
    assert len(MODULES) >= 15, MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str):
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    # Only the examples written in this module (the finder also walks objects it re-exports).
    tests = [t for t in tests if t.filename and Path(t.filename).resolve() == Path(module.__file__).resolve()]
    assert tests, f"{module_name}: the file has '>>>' lines but doctest found no example in a docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    torch_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    try:
        for test in tests:
            runner.run(test, out=report.append, clear_globs=True)
    finally:  # examples may seed or set threads; leave the process as they found it
        torch.random.set_rng_state(torch_state)
        torch.set_num_threads(threads)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
    skipped = [t.name for t in tests for ex in t.examples if ex.options.get(doctest.SKIP)]
    if skipped and module_name not in SKIP_ALLOWED:
        pytest.fail(f"{module_name}: skipped examples in {sorted(set(skipped))}; make them run, or add the "
                    "module to SKIP_ALLOWED with the reason")
    assert result.attempted > 0, f"{module_name}: every example is skipped"
