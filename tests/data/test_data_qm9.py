"""QM9 loader: the real qm9pack wheel (a slice), units, featurisation, split, cache and bad input."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
pytest.importorskip("rdkit")

from mtlens.data import qm9  # noqa: E402
from mtlens.errors import ConfigurationError, DataError  # noqa: E402

HAS_WHEEL = True
try:
    WHEEL = qm9.find_qm9pack_data()
except DataError:
    HAS_WHEEL = False
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="qm9pack is not installed (pip install 'mtlens[graph]')")


def _slice(folder: Path, rows_per_file: int = 40, edit=None) -> Path:
    """Copy the header and the first ``rows_per_file`` molecules of each real CSV file into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in qm9.CSV_FILES:
        with open(WHEEL / name) as fh:
            lines = [next(fh) for _ in range(rows_per_file + 1)]
        if edit is not None:
            lines = edit(name, lines)
        (folder / name).write_text("".join(lines))
    return folder


@needs_wheel
def test_wheel_holds_130831_molecules():
    total = 0
    for name in qm9.CSV_FILES:
        with open(WHEEL / name, "rb") as fh:
            total += sum(1 for _ in fh) - 1
    assert total == qm9.N_MOLECULES == 130_831


@needs_wheel
def test_methane_targets_in_paper_units_and_features():
    store = qm9.process_csv(qm9.source_files(), limit=3)
    assert store.index.tolist() == [1, 2, 3]  # CH4, NH3, H2O
    y = dict(zip(qm9.QM9_TASKS, store.y[0].tolist()))
    eh = 27211.386245988  # meV per Hartree (CODATA 2018)
    # CSV row 1: mu 0 D, alpha 13.21 a0^3, HOMO -0.3877 Ha, LUMO 0.1171 Ha, R2 35.3641, ZPVE 0.044749 Ha,
    # U0 -40.47893 Ha, cv 6.469; atomization U0 = U0 - (E_C + 4 E_H) with QM9's atomref values
    assert y["mu"] == 0.0 and y["alpha"] == pytest.approx(13.21) and y["r2"] == pytest.approx(35.3641)
    assert y["homo"] == pytest.approx(-0.3877 * eh) and y["lumo"] == pytest.approx(0.1171 * eh)
    assert y["zpve"] == pytest.approx(0.044749 * eh) and y["cv"] == pytest.approx(6.469)
    assert y["u0"] == pytest.approx((-40.47893 - (-37.846772 + 4 * -0.500273)) * eh)
    assert y["u0"] / 1000 == pytest.approx(-17.1717, abs=1e-3)  # PyG's U0_ATOM of methane, in eV
    mean, std = store.y.mean(0), torch.ones(11, dtype=torch.float64)
    ds = qm9.QM9Dataset(store, np.arange(3), mean, std)
    g = ds.graph(0)
    # C first: one-hot C, Z=6, not aromatic, sp3, 4 hydrogens; then 4 H
    assert g.x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4]
    assert g.x[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert g.edge_index.shape == (2, 20) and g.edge_attr.shape == (20, 5)  # complete graph, 5·4 pairs
    bonded = g.edge_attr[:, 0] == 1
    assert int(bonded.sum()) == 8  # 4 C–H bonds, both directions
    assert g.edge_attr[bonded, 4].mean().item() == pytest.approx(1.092, abs=2e-3)  # C–H length, Å
    assert not bool((g.edge_index[0] == g.edge_index[1]).any())


@needs_wheel
def test_aromatic_and_bond_types_follow_the_smiles():
    store = qm9.process_csv(qm9.source_files(), limit=400)
    ds = qm9.QM9Dataset(store, np.arange(len(store)), store.y.mean(0), store.y.std(0), complete=False)
    # gdb 4 is acetylene C#C: a triple bond, sp carbons
    g = ds.graph(3)
    assert g.edge_attr[:, 2].sum() == 2 and g.x[0, 7] == 1
    # some molecule among the first 400 has aromatic atoms and bonds (e.g. pyrrole-like rings)
    aromatic = [i for i in range(len(store)) if ds.graph(i).x[:, 6].any()]
    assert aromatic, "expected aromatic molecules in the first 400"
    g = ds.graph(aromatic[0])
    assert g.edge_attr[:, 3].sum() > 0  # aromatic bond type
    assert store.meta["bonds_from_geometry"] == []


@needs_wheel
def test_loader_on_a_real_slice_split_standardisation_and_cache(tmp_path):
    root = _slice(tmp_path / "csv")
    cache = tmp_path / "cache"
    ds = qm9.make_qm9_datasets(root=root, cache_dir=cache, test_size=20, val_size=20)
    assert {k: len(v) for k, v in ds.items()} == {"train": 80, "val": 20, "test": 20}
    pos = [set(v.positions.tolist()) for v in ds.values()]
    assert not (pos[0] & pos[1]) and not (pos[0] & pos[2]) and not (pos[1] & pos[2])
    train = ds["train"]
    y = torch.stack([torch.stack([train[i]["targets"][t] for t in qm9.QM9_TASKS]) for i in range(len(train))])
    assert torch.allclose(y.mean(0), torch.zeros(11), atol=1e-5)  # standardised by the training molecules
    assert torch.allclose(y.std(0), torch.ones(11), atol=1e-4)
    assert ds["val"].target_std == train.target_std  # the training statistics, not the split's own
    assert len(list(cache.glob("qm9-*.pt"))) == 1
    # a second call reads the cache instead of parsing
    orig = qm9.process_csv
    qm9.process_csv = lambda *a, **k: pytest.fail("parsed again although the cache exists")
    try:
        again = qm9.make_qm9_datasets(root=root, cache_dir=cache, test_size=20, val_size=20, n_train=10)
    finally:
        qm9.process_csv = orig
    assert len(again["train"]) == 10 and again["train"].positions.tolist() == train.positions[:10].tolist()
    batch = qm9.QM9Dataset.collate_fn([train[i] for i in range(4)])
    assert batch["input"].num_graphs == 4 and batch["targets"]["mu"].shape == (4,)
    # changed source → new key
    _slice(tmp_path / "csv", rows_per_file=41)
    qm9.make_qm9_datasets(root=root, cache_dir=cache, test_size=20, val_size=20)
    assert len(list(cache.glob("qm9-*.pt"))) == 2


@needs_wheel
def test_corrupt_cache_is_named(tmp_path):
    root = _slice(tmp_path / "csv", rows_per_file=10)
    cache = tmp_path / "cache"
    qm9.load_qm9(root, cache, verbose=False)
    (f,) = cache.glob("qm9-*.pt")
    f.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=f"{f.name}.*delete it"):
        qm9.load_qm9(root, cache)


@needs_wheel
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda line: line.replace(',5,"[4,1,0,0,0]"', ',7,"[4,1,0,0,0]"'), "N_atoms = 7"),
        (lambda line: line.split(',"[[')[0] + "\n", "expected 25 fields, found 7"),
        (lambda line: line.replace("-40.47893", "oops"), "InternalEnergy_0K_au = 'oops'"),
        (lambda line: line.replace("['C','H','H','H','H']", "['C','H','H','H','Xx']"), "unknown element"),
        (lambda line: line.replace('"C","InChI', '"C1CC1","InChI'), "has atoms C3H6 but the geometry has C1H4"),
    ],
)
def test_malformed_row_names_file_line_and_molecule(tmp_path, edit, match):
    def edit_first(name, lines):
        if name == "qm9_part1.csv":
            lines[1] = edit(lines[1])
        return lines

    root = _slice(tmp_path / "csv", rows_per_file=5, edit=edit_first)
    with pytest.raises(DataError, match=match) as exc:
        qm9.load_qm9(root, tmp_path / "cache", verbose=False)
    assert "qm9_part1.csv line 2 (molecule dsgdb9nsd_000001.xyz)" in str(exc.value)
    assert not list((tmp_path / "cache").glob("*.pt")) if (tmp_path / "cache").exists() else True


def test_missing_wheel_gives_the_install_hint(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(qm9.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"qm9pack.*not installed.*pip install 'mtlens\[graph\]'"):
        qm9.source_files()


def test_missing_csv_in_root_shows_layout(tmp_path):
    with pytest.raises(DataError, match="(?s)qm9_part1.csv.*Expected layout"):
        qm9.source_files(tmp_path)


def test_split_procedure_and_bad_sizes():
    parts = qm9.qm9_split(qm9.N_MOLECULES, 0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [110_831, 10_000, 10_000]
    perm = np.random.default_rng(0).permutation(qm9.N_MOLECULES)
    assert parts["test"].tolist() == perm[:10_000].tolist() and parts["val"][0] == perm[10_000]
    with pytest.raises(ConfigurationError, match="no training set"):
        qm9.qm9_split(100, 0)


def test_atomref_and_units_tables():
    assert set(qm9.QM9_UNITS) == set(qm9.QM9_TASKS) and len(qm9.QM9_TASKS) == 11
    assert abs(qm9.HARTREE_TO_MEV - 27211.386) < 1e-3
    # methane's atomization from the table must equal the PyG atomref-based value (eV)
    e = (-40.47893 - (qm9.ATOM_REF_HARTREE["C"][0] + 4 * qm9.ATOM_REF_HARTREE["H"][0])) * qm9.HARTREE_TO_MEV
    assert math.isclose(e / 1000, -17.1717, abs_tol=1e-3)
