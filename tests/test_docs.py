"""The documentation stays in step with the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_methods_doc_is_generated_from_the_registry():
    spec = importlib.util.spec_from_file_location("gen_methods_doc", ROOT / "tools" / "gen_methods_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "methods.md").read_text() == mod.render(), (
        "docs/methods.md is stale: run python tools/gen_methods_doc.py"
    )


def test_registry_has_the_26_required_methods():
    from mtlens.methods import available

    required = {
        "ew", "uw", "dwa", "rlw", "gls", "imtl_l", "famo", "stch", "gradnorm", "db_mtl", "mgda", "pcgrad",
        "graddrop", "gradvac", "cagrad", "imtl_g", "imtl", "nash_mtl", "aligned_mtl", "fairgrad", "upgrad",
        "dualproj", "config", "moco", "rgw", "cosreg",
    }
    assert required <= set(available())
    assert "rep_mtl" in available("regularizer")


def test_delta_doc_worked_example_matches_the_code():
    import re

    from mtlens.tasks.delta import compute_deltas

    text = (ROOT / "docs" / "delta.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    ns: dict = {}
    exec(code, ns)
    got = compute_deltas(ns["M"], ns["B"], ns["spec"])
    assert round(got["delta_p_task"], 2) == -3.75
    assert round(got["delta_p_metric"], 2) == -1.67 and round(got["delta_m"], 2) == 1.67
    for value in ("**−3.75**", "**−1.67**", "**+1.67**"):
        assert value in text


def test_docs_do_not_point_users_to_files_outside_the_repository():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "spec/delta_m.md" not in path.read_text(), path


def test_every_markdown_table_of_the_docs_renders():
    """A ``|`` inside a table cell (``T·|Z|``, ``max|S|``) must be escaped, or the row gets an extra cell and the
    table stops rendering: every table of README.md and docs/ has as many cells in each row as in its separator."""
    from _markdown import markdown_tables_are_rectangular

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert sum(markdown_tables_are_rectangular(p.read_text()) for p in pages) > 20
