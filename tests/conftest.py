import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: on a shared 2-core machine two OpenMP threads can stall each other for
# minutes; tests assert behaviour, never speed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def benchmark_script():
    """``load(name)`` imports ``benchmarks/<name>.py`` as a module; the folder is on ``sys.path`` (the scripts
    import each other) while the test module runs."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    yield load
    sys.path.remove(folder)
