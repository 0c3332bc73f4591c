"""Shared helpers of the dataset loaders: layout errors, deterministic splits, checked ``.npy`` reads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigurationError, DataError

#: Fraction of a training set carved off as the validation split when a benchmark ships none
#: (NYUv2, Cityscapes, MNIST/Fashion-MNIST IDX). Ours; the papers select on the test split, which
#: mtlens refuses to do (docs/delta.md: the test split is used once).
DEFAULT_VAL_FRACTION = 0.1

#: Seed of every carved split. Fixed, and independent of the run seed, so that runs with
#: different seeds are selected on the same validation images.
DEFAULT_SPLIT_SEED = 0


def layout_error(
    dataset: str, root: str | os.PathLike | None, problem: str, layout: str, fix: str = ""
) -> DataError:
    """A :class:`DataError` naming the problem and printing the expected directory tree."""
    where = f" under {root}" if root is not None else ""
    msg = f"{dataset}: {problem}\nExpected layout{where}:\n{layout.rstrip()}"
    if fix:
        msg += f"\n{fix}"
    return DataError(msg)


def require_dir(dataset: str, path: str | os.PathLike, root: str | os.PathLike | None, layout: str,
                fix: str = "") -> Path:
    """``path`` as a Path, or a :class:`DataError` with the expected tree when it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        what = "is missing" if not p.exists() else "is not a directory"
        raise layout_error(dataset, root, f"directory {p} {what}.", layout, fix)
    return p


def carve_split(
    n: int, val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = DEFAULT_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split ``range(n)`` into (train, val) positions, both sorted.

    ``round(n * val_fraction)`` positions (at least 1 when ``val_fraction > 0``) go to validation,
    chosen by a permutation from ``numpy.random.default_rng(split_seed)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigurationError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise ConfigurationError(
            f"cannot carve a validation split of {n_val} from {n} training samples: "
            "supply more training data or lower val_fraction"
        )
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], split_seed: int = DEFAULT_SPLIT_SEED
) -> list[np.ndarray]:
    """Split positions into ``len(fractions)`` disjoint parts, class by class (sorted positions).

    Each class's positions are permuted with ``default_rng(split_seed)`` and cut at the cumulative
    fractions, so every part keeps the class balance of ``labels``.
    """
    fr = np.asarray(fractions, dtype=float)
    if np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-9:
        raise ConfigurationError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(split_seed)
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        pos = pos[rng.permutation(len(pos))]
        cuts = np.round(np.cumsum(fr)[:-1] * len(pos)).astype(int)
        for k, chunk in enumerate(np.split(pos, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=int) for p in parts]


def load_npy(path: Path, dataset: str, root: str | os.PathLike | None, layout: str) -> np.ndarray:
    """``np.load`` without pickles; unreadable or missing files raise :class:`DataError`."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise layout_error(dataset, root, f"file {path} is missing.", layout) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise layout_error(
            dataset, root, f"file {path} is not a readable .npy array ({exc}).", layout
        ) from exc


def numbered_files(folder: Path, suffix: str) -> dict[int, Path]:
    """``{i: folder/f"{i}{suffix}"}`` for every file named ``<integer><suffix>`` in ``folder``."""
    out: dict[int, Path] = {}
    for name in os.listdir(folder):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            if stem.isdigit():
                out[int(stem)] = folder / name
    return out
