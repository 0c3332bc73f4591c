"""QM9 (Ramakrishnan et al. 2014): 130 831 molecules, 11 regression targets, as molecular graphs.

Source: the CSV files of the PyPI wheel ``qm9pack`` (MIT License; ``qm9pack/data/qm9_part{1,2,3}.csv``:
per molecule the GDB index, SMILES, element list, XYZ coordinates in Å and every QM9 property in
the units of the original release — Hartree for energies). Its own ``import qm9pack`` fails on
current setuptools (``pkg_resources``), so the files are located through the installed
distribution's file list (:mod:`importlib.metadata`), never by importing it; ``root=`` may instead
name any folder holding the three CSV files. The 130 831 molecules are QM9's 133 885 minus the
3 054 that failed the original consistency check — the same molecules as PyTorch Geometric's
``QM9`` data set used by Nash-MTL and LibMTL.

Targets (the 11 of Nash-MTL, arXiv:2202.01017, and LibMTL, in their order and units):

======== ========================================== ============= ===============================
task     property                                   unit          from the CSV
======== ========================================== ============= ===============================
mu       dipole moment μ                            D             ``Dipole_debye``
alpha    isotropic polarizability α                 a₀³           ``Polarizability_bohr3``
homo     ε_HOMO                                     meV           ``HOMO_au`` × E_h
lumo     ε_LUMO                                     meV           ``LUMO_au`` × E_h
r2       electronic spatial extent ⟨R²⟩             a₀²           ``R2_bohr2``
zpve     zero-point vibrational energy              meV           ``ZPVE_au`` × E_h
u0       atomization energy at 0 K, U₀              meV           (U₀ − Σ atom refs) × E_h
u        atomization internal energy at 298 K, U    meV           (U − Σ atom refs) × E_h
h        atomization enthalpy at 298 K, H           meV           (H − Σ atom refs) × E_h
g        atomization free energy at 298 K, G        meV           (G − Σ atom refs) × E_h
cv       heat capacity at 298 K, c_v                cal/(mol K)   ``Heatcapacity_Cv_cal_mol_K``
======== ========================================== ============= ===============================

E_h = 27 211.386 245 988 meV (CODATA 2018 Hartree energy). U₀, U, H, G are *atomization*
energies — PyG's targets 12–15, which Nash-MTL and LibMTL select (``target_idx = [0, 1, 2, 3, 5,
6, 12, 13, 14, 15, 11]``) — computed with the atomic reference energies of QM9's ``atomref``
table (:data:`ATOM_REF_HARTREE`). Energies are printed in meV as those papers print them.

Graphs (PyTorch Geometric ``Data``), the featurisation of Gilmer et al. 2017 ("Neural Message
Passing for Quantum Chemistry", arXiv:1704.01212) as PyG's ``QM9`` implements it and Nash-MTL's
``Complete`` + ``Distance(norm=False)`` transforms extend it:

* ``x`` (n×11 float32): one-hot element (H, C, N, O, F), atomic number, aromatic, sp, sp2, sp3
  hybridisation, number of bonded hydrogens;
* ``edge_index`` (2×n(n−1)): the complete directed graph without self-loops (``complete=False``:
  chemical bonds only, both directions);
* ``edge_attr`` (E×5 float32): bond type one-hot (single, double, triple, aromatic; all zero for
  a non-bonded pair) and the interatomic distance in Å;
* ``pos`` (n×3 float32, Å).

Atom features and bond types come from the sanitised RDKit molecule of the CSV's SMILES (with
explicit hydrogens), mapped onto the atom order of the coordinates by matching it to the bond
graph RDKit perceives from the geometry (``rdDetermineBonds.DetermineConnectivity``). For the 2
molecules whose SMILES does not fit their relaxed geometry (gdb 133857 and 133859, strained
cages), bond orders are perceived from the geometry itself (``DetermineBonds``, charge 0); their
indices are kept in the processed file's metadata. (PyG builds its graphs from an SDF read
without sanitisation, where aromaticity and hybridisation are not perceived: our features are
the ones Gilmer et al. describe.)

Split (as the Nash-MTL and LibMTL code): a random permutation of the 130 831 molecules, test = the
first 10 000, val = the next 10 000, train = the remaining 110 831 (the papers' "110K"). Our
permutation is ``numpy.random.default_rng(split_seed).permutation`` (``split_seed = 0``); theirs
is ``torch.randperm`` under the run seed after the model's initialisation (PyG's
``dataset.shuffle()``), so the molecules in each split differ from theirs but the procedure and
sizes are the same. ``n_train`` / ``n_val`` / ``n_test`` take the first molecules of each split
(random subsets) for quick runs.

Standardisation: the targets a loader yields are ``(y − mean) / std`` with mean and (unbiased)
std of the training molecules used; the benchmark's MAE multiplies back by ``std``, so metrics are
in the units above. (Nash-MTL's code writes ``train_dataset.data.y``, but ``.data`` of a sliced
PyG data set is the whole collated set, so its statistics — like LibMTL's, explicitly — cover all
130 831 molecules; ours use no validation or test molecule. The MAE in physical units does not
depend on the choice; only the scaling of the loss does, negligibly.)

Processing (RDKit over 130 831 molecules: 1–6 min on one core, measured on a loaded 2-core
machine) runs once; the result is a tensor file ``qm9-<hash>.pt`` in ``cache_dir`` (default ``$MTLENS_DATA_CACHE`` or
``~/.cache/mtlens/data``), the hash covering the CSV files' contents and the processing version.
Processing is serial: a process pool forked from a process that already runs torch's OpenMP
threads is not safe, and a one-off cost of minutes does not justify it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigurationError, DataError, require

QM9_TASKS: tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
"""The 11 targets in the order of Nash-MTL and LibMTL (PyG targets 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)."""

QM9_UNITS: dict[str, str] = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "meV",
    "lumo": "meV",
    "r2": "a0^2",
    "zpve": "meV",
    "u0": "meV",
    "u": "meV",
    "h": "meV",
    "g": "meV",
    "cv": "cal/(mol K)",
}
"""Unit of each target (and of its MAE), as Nash-MTL (arXiv:2202.01017) and FAMO print them."""

HARTREE_TO_MEV = 27211.386245988
"""Hartree energy in meV (CODATA 2018: E_h = 27.211 386 245 988 eV)."""

#: QM9's atomic reference energies (Ramakrishnan et al. 2014, the ``atomref`` table of the
#: release; Hartree): element → (U₀, U(298 K), H(298 K), G(298 K)) of the isolated atom.
ATOM_REF_HARTREE: dict[str, tuple[float, float, float, float]] = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}

ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
NUM_NODE_FEATURES = 11
NUM_EDGE_FEATURES = 5

CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
N_MOLECULES = 130_831
SPLIT_SIZES = {"test": 10_000, "val": 10_000}  # train = the rest (110 831)

_PROPERTY_COLUMNS = (
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "R2_bohr2",
    "ZPVE_au",
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)
_REQUIRED_COLUMNS = ("XYZ_file", "Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", *_PROPERTY_COLUMNS)

#: Bumped whenever processing changes what the cache file holds (part of the cache key).
PROCESSING_VERSION = 1

QM9_LAYOUT = """\
ROOT/                  (default: the installed qm9pack wheel's qm9pack/data/ folder)
  qm9_part1.csv        header: XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,...,
  qm9_part2.csv                Heatcapacity_Cv_cal_mol_K (energies in Hartree, XYZ in Å)
  qm9_part3.csv        130 831 molecules in all"""

INSTALL_HINT = "Install it with: pip install 'mtlens[graph]'  (torch_geometric, rdkit, qm9pack)"

_BOND_INDEX = {"SINGLE": 0, "DOUBLE": 1, "TRIPLE": 2, "AROMATIC": 3}


# -- locating and reading the source -------------------------------------------------------------
def find_qm9pack_data() -> Path:
    """The folder of the ``qm9pack`` wheel's CSV files, found without importing the package.

    Raises :class:`~mtlens.errors.DataError` with the install hint when the wheel is not
    installed or lacks its data files.
    """
    try:
        dist = importlib.metadata.distribution("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "QM9: the PyPI package qm9pack (which ships the QM9 CSV files) is not installed. "
            + INSTALL_HINT
            + ", or pass root=<folder holding qm9_part1.csv, qm9_part2.csv, qm9_part3.csv>."
        ) from None
    for f in dist.files or ():
        if f.name == CSV_FILES[0] and f.parent.name == "data":
            folder = Path(str(dist.locate_file(f))).parent
            if all((folder / n).is_file() for n in CSV_FILES):
                return folder
    raise DataError(
        f"QM9: qm9pack {dist.version} is installed but its data/{', data/'.join(CSV_FILES)} files are "
        "missing; reinstall it (pip install --force-reinstall qm9pack) or pass root=<folder of the CSV files>."
    )


def source_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The three CSV files under ``root`` (default: the qm9pack wheel); DataError when one is missing."""
    folder = find_qm9pack_data() if root is None else Path(root).expanduser()
    missing = [n for n in CSV_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"QM9: {missing} not found in {folder}.\nExpected layout:\n{QM9_LAYOUT}")
    return [folder / n for n in CSV_FILES]


def source_hash(files: Sequence[Path]) -> str:
    """SHA-256 over the files' names and contents, with the processing version (the cache key)."""
    h = hashlib.sha256(f"mtlens-qm9-v{PROCESSING_VERSION}".encode())
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def default_data_cache() -> Path:
    """``$MTLENS_DATA_CACHE`` or ``$XDG_CACHE_HOME/mtlens/data`` (``~/.cache/mtlens/data``)."""
    env = os.environ.get("MTLENS_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mtlens" / "data"


def _parse_list(text: str, where: str, what: str) -> list[str]:
    t = text.strip()
    if not (t.startswith("[") and t.endswith("]")):
        raise DataError(f"{where}: column {what} = {text[:60]!r} is not a bracketed list")
    return [s.strip().strip("'\"") for s in t[1:-1].split(",") if s.strip()]


def _parse_row(
    row: list[str], col: dict[str, int], where: str
) -> tuple[int, str, list[str], np.ndarray, list[float]]:
    """(gdb index, SMILES, elements, coordinates n×3 float64, 11 raw properties) of one CSV row."""
    if len(row) != len(col):
        raise DataError(f"{where}: expected {len(col)} fields, found {len(row)} (truncated or malformed row)")
    try:
        index = int(row[col["Index"]])
        n_atoms = int(row[col["N_atoms"]])
    except ValueError:
        raise DataError(
            f"{where}: Index/N_atoms are not integers ({row[col['Index']]!r}, {row[col['N_atoms']]!r})"
        ) from None
    elements = _parse_list(row[col["Elements"]], where, "Elements")
    bad = sorted({e for e in elements if e not in ATOMIC_NUMBER})
    if bad:
        raise DataError(f"{where}: unknown element(s) {bad}; QM9 has only {list(ELEMENTS)}")
    try:
        flat = row[col["XYZ_Ang"]].replace("[", "").replace("]", "")
        xyz = np.array(_parse_list(f"[{flat}]", where, "XYZ_Ang"), dtype=np.float64)
    except ValueError:
        raise DataError(f"{where}: XYZ_Ang holds a non-numeric coordinate") from None
    if len(elements) != n_atoms or xyz.size != 3 * n_atoms:
        raise DataError(
            f"{where}: N_atoms = {n_atoms} but {len(elements)} elements and {xyz.size} coordinates "
            f"(expected {3 * n_atoms})"
        )
    props = []
    for c in _PROPERTY_COLUMNS:
        try:
            v = float(row[col[c]])
        except ValueError:
            raise DataError(f"{where}: column {c} = {row[col[c]]!r} is not a number") from None
        if not math.isfinite(v):
            raise DataError(f"{where}: column {c} = {v} is not finite")
        props.append(v)
    if not np.all(np.isfinite(xyz)):
        raise DataError(f"{where}: XYZ_Ang holds a non-finite coordinate")
    return index, row[col["SMILES"]], elements, xyz.reshape(n_atoms, 3), props


def targets_in_paper_units(elements: Sequence[str], props: Sequence[float]) -> list[float]:
    """The 11 targets (order :data:`QM9_TASKS`, units :data:`QM9_UNITS`) from the CSV's raw properties.

    ``props`` are the CSV columns in the order of ``_PROPERTY_COLUMNS`` (Debye, bohr³, Hartree,
    Hartree, bohr², Hartree, Hartree ×4, cal/(mol K)). Energies → meV; U₀, U, H, G → atomization
    energies with :data:`ATOM_REF_HARTREE`.
    """
    mu, alpha, homo, lumo, r2, zpve, u0, u, h, g, cv = props
    refs = [sum(ATOM_REF_HARTREE[e][k] for e in elements) for k in range(4)]
    atomization = [(e - r) * HARTREE_TO_MEV for e, r in zip((u0, u, h, g), refs)]
    return [mu, alpha, homo * HARTREE_TO_MEV, lumo * HARTREE_TO_MEV, r2, zpve * HARTREE_TO_MEV, *atomization, cv]


# -- featurisation -------------------------------------------------------------------------------
class _Featuriser:
    """RDKit featurisation of one molecule (see the module docstring)."""

    def __init__(self):
        self.Chem = require("rdkit.Chem", "graph", "the QM9 loader (featurisation)")
        from rdkit import rdBase
        from rdkit.Chem import rdDetermineBonds

        rdBase.DisableLog("rdApp.*")  # what rdkit.RDLogger.DisableLog calls
        self.determine = rdDetermineBonds
        C = self.Chem
        self.hyb = {C.HybridizationType.SP: 0, C.HybridizationType.SP2: 1, C.HybridizationType.SP3: 2}

    def _geometry_mol(self, elements, xyz):
        C = self.Chem
        m = C.RWMol()
        conf = C.Conformer(len(elements))
        for i, (e, p) in enumerate(zip(elements, xyz)):
            m.AddAtom(C.Atom(e))
            conf.SetAtomPosition(i, p.tolist())
        mol = m.GetMol()
        mol.AddConformer(conf, assignId=True)
        return mol

    def _skeleton(self, mol):
        C = self.Chem
        s = C.RWMol(mol)
        for b in s.GetBonds():
            b.SetBondType(C.BondType.SINGLE)
            b.SetIsAromatic(False)
        for a in s.GetAtoms():
            a.SetIsAromatic(False)
            a.SetNoImplicit(True)
            a.SetFormalCharge(0)
        s.UpdatePropertyCache(strict=False)
        return s

    def __call__(self, smiles: str, elements: list[str], xyz: np.ndarray,
                 where: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(atoms, bonds, from_geometry)`` in the geometry's atom order.

        ``atoms``: n×2 int8 (aromatic 0/1, hybridisation 0 sp, 1 sp2, 2 sp3, −1 other); ``bonds``:
        k×3 int16 (atom i, atom j, type 0 single, 1 double, 2 triple, 3 aromatic);
        ``from_geometry``: bond orders were perceived from the coordinates (SMILES mismatch).
        """
        C = self.Chem
        n = len(elements)
        ref = C.MolFromSmiles(smiles)
        if ref is None:
            raise DataError(f"{where}: SMILES {smiles!r} does not parse")
        ref = C.AddHs(ref)
        formula = sorted(a.GetSymbol() for a in ref.GetAtoms())
        if formula != sorted(elements):
            raise DataError(
                f"{where}: the SMILES {smiles!r} has atoms {_formula(formula)} but the geometry has "
                f"{_formula(elements)}"
            )
        geo = self._geometry_mol(elements, xyz)
        self.determine.DetermineConnectivity(geo)
        match = self._skeleton(geo).GetSubstructMatch(self._skeleton(ref))
        from_geometry = len(match) != n
        if not from_geometry:
            order = tuple(match)  # ref atom k is geometry atom match[k]
        else:  # SMILES and geometry disagree: perceive bond orders from the geometry
            geo = self._geometry_mol(elements, xyz)
            try:
                self.determine.DetermineBonds(geo, charge=0)
                C.SanitizeMol(geo)
            except Exception as exc:  # RDKit raises several unrelated types here
                raise DataError(
                    f"{where}: the SMILES {smiles!r} does not match the geometry and RDKit cannot perceive "
                    f"bonds from the coordinates ({type(exc).__name__}: {exc})"
                ) from None
            ref, order = geo, tuple(range(n))
        atoms = np.zeros((n, 2), dtype=np.int8)
        for k, a in enumerate(ref.GetAtoms()):
            g = order[k]
            if a.GetSymbol() != elements[g]:
                raise DataError(
                    f"{where}: atom {g} is {elements[g]} in the geometry but {a.GetSymbol()} in the SMILES {smiles!r}"
                )
            atoms[g, 0] = int(a.GetIsAromatic())
            atoms[g, 1] = self.hyb.get(a.GetHybridization(), -1)
        bonds = np.zeros((ref.GetNumBonds(), 3), dtype=np.int16)
        for k, b in enumerate(ref.GetBonds()):
            name = str(b.GetBondType())
            if name not in _BOND_INDEX:
                raise DataError(f"{where}: bond type {name} outside single/double/triple/aromatic")
            bonds[k] = (order[b.GetBeginAtomIdx()], order[b.GetEndAtomIdx()], _BOND_INDEX[name])
        return atoms, bonds, from_geometry


def _formula(elements: Sequence[str]) -> str:
    """Hill formula (C, H, then alphabetical), e.g. C3H6."""
    elements = list(elements)
    return "".join(f"{e}{elements.count(e)}" for e in ("C", "H", "F", "N", "O") if e in elements)


# -- the processed store -------------------------------------------------------------------------
@dataclass
class QM9Store:
    """All molecules, processed: flat atom/bond arrays with per-molecule offsets.

    Attributes (N molecules, A atoms, K bonds): ``z`` (A int8 atomic numbers), ``aromatic``
    (A int8), ``hybrid`` (A int8: 0 sp, 1 sp2, 2 sp3, −1 other), ``pos`` (A×3 float32, Å),
    ``atom_ptr`` (N+1 int64), ``bonds`` (K×3 int16: local i, j, type 0..3), ``bond_ptr`` (N+1
    int64), ``y`` (N×11 float64, paper units), ``index`` (N int64, QM9's gdb index), ``meta``.
    """

    z: torch.Tensor
    aromatic: torch.Tensor
    hybrid: torch.Tensor
    pos: torch.Tensor
    atom_ptr: torch.Tensor
    bonds: torch.Tensor
    bond_ptr: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            k: getattr(self, k)
            for k in ("z", "aromatic", "hybrid", "pos", "atom_ptr", "bonds", "bond_ptr", "y", "index")
        }


def process_csv(files: Sequence[Path], limit: int | None = None, rows: Sequence[int] | None = None) -> QM9Store:
    """Parse and featurise the CSV files (serially) into a :class:`QM9Store`.

    ``limit``: stop after that many molecules (tests). ``rows``: keep only these positions
    (0-based over the concatenated files, the store's order; the others are skipped unparsed) —
    e.g. a random batch for timing without processing all 130 831. Raises :class:`DataError`
    naming the file, line and molecule of the first malformed row.
    """
    keep = None if rows is None else {int(r) for r in rows}
    position = -1
    feat = _Featuriser()
    csv.field_size_limit(1 << 28)
    z, arom, hyb, pos, bonds, ys, idx = [], [], [], [], [], [], []
    n_atoms, n_bonds, from_geo = [0], [0], []
    t0 = time.perf_counter()
    done = False
    for path in files:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"QM9: {path} is empty.\nExpected layout:\n{QM9_LAYOUT}") from None
            col = {name: i for i, name in enumerate(header)}
            missing = [c for c in _REQUIRED_COLUMNS if c not in col]
            if missing:
                raise DataError(f"QM9: {path} lacks column(s) {missing}.\nExpected layout:\n{QM9_LAYOUT}")
            line = reader.line_num + 1  # first line of the next record (fields may span lines)
            for row in reader:
                name = row[col["XYZ_file"]] if len(row) > col["XYZ_file"] else "?"
                where = f"QM9 {path.name} line {line} (molecule {name})"
                line = reader.line_num + 1
                position += 1
                if keep is not None and position not in keep:
                    continue
                index, smiles, elements, xyz, props = _parse_row(row, col, where)
                atoms, bnd, geo_flag = feat(smiles, elements, xyz, where)
                z.append(np.array([ATOMIC_NUMBER[e] for e in elements], dtype=np.int8))
                arom.append(atoms[:, 0])
                hyb.append(atoms[:, 1])
                pos.append(xyz.astype(np.float32))
                bonds.append(bnd)
                ys.append(targets_in_paper_units(elements, props))
                idx.append(index)
                n_atoms.append(n_atoms[-1] + len(elements))
                n_bonds.append(n_bonds[-1] + len(bnd))
                if geo_flag:
                    from_geo.append(index)
                if limit is not None and len(idx) >= limit:
                    done = True
                    break
        if done:
            break
    if not idx:
        raise DataError(f"QM9: no molecules in {[str(p) for p in files]}")
    return QM9Store(
        z=torch.from_numpy(np.concatenate(z)),
        aromatic=torch.from_numpy(np.concatenate(arom)),
        hybrid=torch.from_numpy(np.concatenate(hyb)),
        pos=torch.from_numpy(np.concatenate(pos)),
        atom_ptr=torch.tensor(n_atoms, dtype=torch.int64),
        bonds=torch.from_numpy(np.concatenate(bonds)),
        bond_ptr=torch.tensor(n_bonds, dtype=torch.int64),
        y=torch.tensor(ys, dtype=torch.float64),
        index=torch.tensor(idx, dtype=torch.int64),
        meta={
            "bonds_from_geometry": from_geo,
            "parse_seconds": time.perf_counter() - t0,
            "processing_version": PROCESSING_VERSION,
            "n_molecules": len(idx),
        },
    )


def load_qm9(
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    verbose: bool = True,
    process: bool = True,
) -> QM9Store | None:
    """The processed QM9 store: read from ``cache_dir/qm9-<hash>.pt`` or processed now and cached.

    ``root``: folder of the CSV files (default: the qm9pack wheel). The cache key hashes the
    files' contents and :data:`PROCESSING_VERSION`; writes are atomic (temporary file + rename).
    A corrupt cache file raises :class:`DataError` naming it (delete it to rebuild).
    ``process=False``: return None instead of processing when there is no cache file.
    """
    files = source_files(root)
    key = source_hash(files)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_data_cache()
    path = folder / f"qm9-{key}.pt"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            store = QM9Store(**obj["tensors"], meta=obj["meta"])
        except Exception as exc:  # torch.load raises many types on corrupt files
            first = (str(exc).splitlines() or [""])[0][:160]
            raise DataError(
                f"QM9: processed cache {path} is unreadable ({type(exc).__name__}: {first}); delete it to rebuild"
            ) from None
        return store
    if not process:
        return None
    if verbose:
        import sys

        print(f"QM9: processing {len(files)} CSV files with RDKit (once; cached in {path}) ...", file=sys.stderr)
    store = process_csv(files)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".qm9-", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from other users
    try:
        torch.save(
            {"tensors": store.tensors(), "meta": {**store.meta, "source": [str(p) for p in files], "key": key}}, tmp
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return store


# -- splits and datasets -------------------------------------------------------------------------
def qm9_split(n: int, split_seed: int = 0, n_test: int = 10_000, n_val: int = 10_000) -> dict[str, np.ndarray]:
    """Positions of test (first ``n_test``), val (next ``n_val``) and train (the rest) of a permutation.

    The permutation is ``numpy.random.default_rng(split_seed).permutation(n)``; Nash-MTL and LibMTL
    slice PyG's shuffled data set the same way (``[:10000]``, ``[10000:20000]``, ``[20000:]``).
    """
    if n_test + n_val >= n:
        raise ConfigurationError(f"QM9 split: {n_test} test + {n_val} val molecules leave no training set of {n}")
    perm = np.random.default_rng(split_seed).permutation(n)
    return {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}


MEMO_LIMIT = 20_000
"""Splits of at most this many molecules keep their graphs in memory after first use."""


class QM9Dataset(Dataset):
    """Molecules of one split as PyG graphs with standardised targets.

    ``dataset[i]`` is ``{"input": torch_geometric.data.Data, "targets": {task: float32 scalar}}``
    (targets standardised: ``(y − target_mean) / target_std``, paper units); a DataLoader must use
    :meth:`collate_fn` (mtlens' trainer does), which batches the graphs into a
    ``torch_geometric.data.Batch``.

    Attributes: ``target_mean``, ``target_std`` (``{task: float}``, paper units, from the
    training molecules used), ``positions`` (store rows of this split), ``store``.
    """

    #: every molecule was parsed and checked when the CSV files were processed (``mtlens datasets
    #: --check`` need not rebuild 130 831 graphs to find a corrupt one)
    validated_on_load = True

    def __init__(
        self,
        store: QM9Store,
        positions: np.ndarray,
        mean: torch.Tensor,
        std: torch.Tensor,
        tasks: Sequence[str] = QM9_TASKS,
        complete: bool = True,
    ):
        self._pyg = require("torch_geometric.data", "graph", "the QM9 benchmark")
        self.store = store
        self.positions = np.asarray(positions, dtype=np.int64)
        self.tasks = tuple(tasks)
        self.complete = complete
        cols = [QM9_TASKS.index(t) for t in self.tasks]
        self._y = ((store.y[self.positions][:, cols] - mean[cols]) / std[cols]).to(torch.float32)
        self.target_mean = {t: float(mean[c]) for t, c in zip(self.tasks, cols)}
        self.target_std = {t: float(std[c]) for t, c in zip(self.tasks, cols)}
        # graphs are deterministic (no augmentation): splits up to MEMO_LIMIT molecules keep them
        # after their first use (quick runs, val/test); the full training split rebuilds them
        self._memo: list | None = [None] * len(self.positions) if len(self.positions) <= MEMO_LIMIT else None

    def __len__(self) -> int:
        return len(self.positions)

    def graph(self, i: int) -> Any:  # a torch_geometric Data (an optional dependency)
        """The PyG ``Data`` of the ``i``-th molecule of this split (features as the module docstring)."""
        s = self.store
        m = int(self.positions[i])
        a0, a1 = int(s.atom_ptr[m]), int(s.atom_ptr[m + 1])
        b0, b1 = int(s.bond_ptr[m]), int(s.bond_ptr[m + 1])
        n = a1 - a0
        z = s.z[a0:a1].long()
        pos = s.pos[a0:a1]
        bonds = s.bonds[b0:b1].long()
        i_, j_, typ = bonds[:, 0], bonds[:, 1], bonds[:, 2]
        src = torch.cat([i_, j_])
        dst = torch.cat([j_, i_])
        btype = torch.cat([typ, typ])
        is_h = (z == 1).float()
        num_hs = torch.zeros(n).index_add_(0, dst, is_h[src])
        x = torch.zeros(n, NUM_NODE_FEATURES)
        x[torch.arange(n), _ELEMENT_SLOT[z]] = 1.0
        x[:, 5] = z.float()
        x[:, 6] = s.aromatic[a0:a1].float()
        hyb = s.hybrid[a0:a1].long()
        has = hyb >= 0
        x[torch.arange(n)[has], 7 + hyb[has]] = 1.0
        x[:, 10] = num_hs
        if self.complete:
            rr, cc = _complete_pairs(n)
            bond_attr = torch.zeros(n * n, 4)
            bond_attr[src * n + dst, btype] = 1.0
            edge_index = torch.stack([rr, cc])
            attr = bond_attr[rr * n + cc]
        else:
            edge_index = torch.stack([src, dst])
            attr = torch.zeros(len(src), 4)
            attr[torch.arange(len(src)), btype] = 1.0
        dist = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=-1, keepdim=True)
        return self._pyg.Data(
            x=x, edge_index=edge_index, edge_attr=torch.cat([attr, dist], dim=1), pos=pos, num_nodes=n
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        y = self._y[i]
        if self._memo is not None:
            g = self._memo[i]
            if g is None:
                g = self._memo[i] = self.graph(i)
        else:
            g = self.graph(i)
        return {"input": g, "targets": {t: y[k] for k, t in enumerate(self.tasks)}}

    @staticmethod
    def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch items: ``{"input": torch_geometric.data.Batch, "targets": {task: float32 B}}``."""
        from torch_geometric.data import Batch

        tasks = items[0]["targets"].keys()
        return {
            "input": Batch.from_data_list([it["input"] for it in items]),
            "targets": {t: torch.stack([it["targets"][t] for it in items]) for t in tasks},
        }


_ELEMENT_SLOT = torch.full((10,), -1, dtype=torch.long)
for _k, _e in enumerate(ELEMENTS):
    _ELEMENT_SLOT[ATOMIC_NUMBER[_e]] = _k

_PAIRS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _complete_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of all ordered pairs i ≠ j of ``n`` nodes, row-major (Nash-MTL's ``Complete``)."""
    if n not in _PAIRS:
        r = torch.arange(n).repeat_interleave(n)
        c = torch.arange(n).repeat(n)
        keep = r != c
        _PAIRS[n] = (r[keep], c[keep])
    return _PAIRS[n]


def make_qm9_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    split_seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    complete: bool = True,
    cache_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    test_size: int = SPLIT_SIZES["test"],
    val_size: int = SPLIT_SIZES["val"],
) -> dict[str, QM9Dataset]:
    """QM9 train/val/test as :class:`QM9Dataset` (see the module docstring for source, units, split).

    Args:
        root: folder of the CSV files; ``None`` = the installed qm9pack wheel.
        seed: the run seed (does not change the data).
        split_seed: seed of the molecule permutation (default 0).
        n_train, n_val, n_test: use only the first that many molecules of each split (random
            subsets; ``None`` = all: 110 831 / 10 000 / 10 000).
        complete: complete graph with distances (Nash-MTL, default) or bonds only.
        cache_dir: folder of the processed file (default :func:`default_data_cache`).
        tasks: subset of :data:`QM9_TASKS` (default all 11).
        test_size, val_size: split sizes (default 10 000 each, the papers'); change them only for
            CSV files with fewer molecules than QM9 (e.g. a slice for tests).

    Raises:
        DataError: qm9pack missing (with the install hint), malformed CSV row (naming it), corrupt cache.
        MissingDependencyError: rdkit or torch_geometric missing (``pip install 'mtlens[graph]'``).
        ConfigurationError: bad sizes or task names.
    """
    del seed
    require("torch_geometric", "graph", "the QM9 benchmark")
    tasks = tuple(tasks) if tasks is not None else QM9_TASKS
    bad = [t for t in tasks if t not in QM9_TASKS]
    if bad or not tasks:
        raise ConfigurationError(f"QM9 tasks {bad or list(tasks)} unknown; choose from {list(QM9_TASKS)}")
    store = load_qm9(root, cache_dir)
    assert store is not None  # load_qm9 returns None only with process=False
    parts = qm9_split(len(store), split_seed, n_test=test_size, n_val=val_size)
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ConfigurationError(f"QM9 n_{name}={n!r}; expected an integer ≥ 2 (or None for all)")
            if n > len(parts[name]):
                raise ConfigurationError(f"QM9 n_{name}={n} exceeds the {len(parts[name])} molecules of the split")
            parts[name] = parts[name][:n]
    y_train = store.y[parts["train"]]
    mean, std = y_train.mean(dim=0), y_train.std(dim=0)
    if not bool(torch.all(std > 0)):
        raise DataError(
            "QM9: a target is constant over the training molecules; standardisation is undefined (use a larger n_train)"
        )
    return {s: QM9Dataset(store, parts[s], mean, std, tasks, complete) for s in ("train", "val", "test")}
