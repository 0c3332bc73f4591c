"""QM9 end to end on a real slice of the qm9pack wheel: PyG batches through the trainer and the engine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_geometric")
pytest.importorskip("rdkit")

from mtlens.data import qm9  # noqa: E402
from mtlens.errors import DataError  # noqa: E402
from mtlens.train import load_config, run  # noqa: E402

try:
    WHEEL = qm9.find_qm9pack_data()
except DataError:
    WHEEL = None
pytestmark = pytest.mark.skipif(WHEEL is None, reason="qm9pack is not installed (pip install 'mtlens[graph]')")


def _slice(folder: Path, rows: int = 30) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in qm9.CSV_FILES:
        with open(WHEEL / name) as fh:
            (folder / name).write_text("".join(next(fh) for _ in range(rows + 1)))
    return folder


def _tiny(tmp_path: Path) -> list[str]:
    root = _slice(tmp_path / "csv")
    return [
        f"data.root={root}",
        "data.options={test_size: 20, val_size: 20, n_train: 40, complete: false, cache_dir: "
        + str(tmp_path / "c")
        + "}",
        "model.kwargs={dim: 8, edge_hidden: 16}",
        "train.epochs=1",
        "train.batch_size=20",
        "train.device=cpu",
    ]


def test_feature_level_method_with_rep_mtl_on_qm9(tmp_path):
    """The pooled molecule embedding is the engine's features: feature-level UPGrad + Rep-MTL + monitor."""
    cfg = load_config(
        preset="quick-qm9",
        overrides=[
            *_tiny(tmp_path),
            "baseline=null",
            "method.name=upgrad",
            "method.level=feature",
            "regularizers=[{name: rep_mtl}]",
            "monitor.every=1",
        ],
        out_dir=tmp_path / "run",
    )
    res = run(cfg, quiet=True)
    assert res["benchmark"] == "qm9" and res["steps"] == 2
    assert list(res["metrics"]["test"]) == list(qm9.QM9_TASKS)
    maes = {t: m["mae"] for t, m in res["metrics"]["test"].items()}
    assert all(math.isfinite(v) and v > 0 for v in maes.values())
    # MAE in the papers' units: an untrained model errs by about one std of the target,
    # i.e. hundreds of meV for energies, not fractions of a Hartree
    assert maes["u0"] > 100 and maes["homo"] > 50
    assert "diag/fd" in res["diagnostics"]["final"]


def test_plateau_schedule_and_delta_against_a_baseline_file(tmp_path):
    base = {t: {"mae": 1.0} for t in qm9.QM9_TASKS}
    (tmp_path / "b.json").write_text(json.dumps(base))
    cfg = load_config(
        preset="qm9",
        overrides=[*_tiny(tmp_path), f"baseline={tmp_path / 'b.json'}", "train.epochs=2", "schedule.patience=0"],
        out_dir=tmp_path / "run",
    )
    res = run(cfg, quiet=True)
    assert res["config"]["schedule"]["name"] == "plateau"
    d = res["delta"]["test"]
    maes = [res["metrics"]["test"][t]["mae"] for t in qm9.QM9_TASKS]
    assert d["delta_m"] == pytest.approx(sum((m - 1.0) / 1.0 * 100 for m in maes) / 11)


@pytest.mark.slow
def test_cli_quick_qm9_prints_maes_and_delta_against_stl(tmp_path):
    """`mtlens train --preset quick-qm9` (shrunk to a slice): 11 STL baselines, then MAEs in units and Δ."""
    args = [a for o in _tiny(tmp_path) for a in ("--set", o)]
    env = {**os.environ, "MTLENS_CACHE_DIR": str(tmp_path / "stl"), "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlens.cli.main",
            "train",
            "--preset",
            "quick-qm9",
            *args,
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for t in qm9.QM9_TASKS:
        assert t in out
    assert "meV" in out and "delta_m" in out.replace("Δm", "delta_m")
    assert len(list((tmp_path / "stl").iterdir())) == 11
