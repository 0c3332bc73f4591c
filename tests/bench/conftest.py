import pytest
from store_builder import REPORT_SPECS, build_store


@pytest.fixture(scope="session")
def real_store(tmp_path_factory):
    """A store of 22 real short MultiMNIST runs (about 20 s on 2 cores): 5 methods, 3 levels, the Rep-MTL
    ablation, 2 seeds, one failed and one pending run (tests/bench/store_builder.py)."""
    return build_store(tmp_path_factory.mktemp("store"), REPORT_SPECS)


@pytest.fixture(scope="session")
def real_report(real_store):
    from mtlens.bench.report import write_report

    return write_report(real_store, n_bootstrap=200)
