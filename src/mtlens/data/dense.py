"""NYUv2 and Cityscapes in the preprocessed ``.npy`` layout of MTAN / LibMTL / Nash-MTL / FAMO.

Samples are ``{"input": 3×H×W float32, "targets": {...}}`` with

* ``"segmentation"``: H×W int64 class ids, −1 = ignore;
* ``"depth"``: 1×H×W float32, 0 = invalid;
* ``"normal"`` (NYUv2): 3×H×W float32 unit vectors, all-zero = invalid.

The folder named ``val`` in these releases is the papers' *test* split (NYUv2: 654 images,
Cityscapes: 500). mtlens returns it as ``"test"`` and carves its validation split from ``train``
(:data:`~mtlens.data._common.DEFAULT_VAL_FRACTION` = 10 %, ``split_seed`` = 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigurationError, DataError
from ._common import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_FRACTION,
    carve_split,
    layout_error,
    load_npy,
    numbered_files,
    require_dir,
)
from .transforms import PAPER_SCALES, random_hflip, random_scale_crop

NYUV2_LAYOUT = """\
ROOT/
  train/                 795 samples (the papers' training set)
    image/{i}.npy        H×W×3 float (288×384×3)
    label/{i}.npy        H×W   13 classes 0..12, -1 = ignore
    depth/{i}.npy        H×W×1 metres, 0 = invalid
    normal/{i}.npy       H×W×3 unit normals, 0 = invalid
  val/                   654 samples: the papers' TEST split (mtlens: "test")
    image/ label/ depth/ normal/   (same files)"""

CITYSCAPES_LAYOUT = """\
ROOT/
  train/                 2975 samples
    image/{i}.npy        H×W×3 float (128×256×3)
    label/{i}.npy        H×W   7 classes 0..6, -1 = ignore   (MTAN's release: label_7/)
    depth/{i}.npy        H×W×1 (disparity-derived), 0 = invalid
  val/                   500 samples: the papers' TEST split (mtlens: "test")
    image/ label/ depth/   (same files)"""

_FIX = (
    "Get the preprocessed arrays from the MTAN / LibMTL releases (see docs/benchmarks-data.md) "
    "and pass the folder that holds train/ and val/ as root."
)


class NpyDenseDataset(Dataset):
    """One split of a preprocessed dense benchmark (NYUv2, Cityscapes) read from ``{i}.npy`` files.

    Args:
        split_dir: ``ROOT/train`` or ``ROOT/val``.
        targets: ``{task: (subfolder, kind)}`` with kind in {"segmentation", "depth", "normal"}.
        num_classes: segmentation classes (labels outside ``[-1, num_classes)`` raise DataError).
        indices: file numbers to expose, in order (default: all, sorted).
        augment: random scale crop (1.0/1.2/1.5, depth / scale) + horizontal flip (normal x negated),
            the protocol of MTAN (arXiv:1803.10704) and its successors; for training only.
        size: expected ``(H, W)``; files of another size raise DataError. ``None``: any size, but
            the same in every sample of the split (a batch stacks them): the first sample's size
            is the reference and a sample of another size raises DataError naming both files
            when it is read, instead of a crash inside the DataLoader's collate.

    Segmentation labels stored as floating point must hold integer class ids (2.0, not 2.7):
    a fractional or non-finite value raises DataError naming the file (never truncated).
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        targets: dict[str, tuple[str, str]],
        *,
        num_classes: int,
        dataset: str,
        root: str | os.PathLike | None,
        layout: str,
        indices: Sequence[int] | np.ndarray | None = None,
        augment: bool = False,
        size: tuple[int, int] | None = None,
        scales: Sequence[float] = PAPER_SCALES,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.targets = dict(targets)
        self.kinds = {t: k for t, (_, k) in self.targets.items()}
        self.num_classes = int(num_classes)
        self.dataset = dataset
        self.root = root
        self.layout = layout
        self.augment = bool(augment)
        self.size = tuple(size) if size is not None else None
        self.scales = tuple(scales)
        folders = {"image": require_dir(dataset, self.split_dir / "image", root, layout, _FIX)}
        for (sub, _) in self.targets.values():
            folders[sub] = require_dir(dataset, self.split_dir / sub, root, layout, _FIX)
        files = {sub: numbered_files(f, ".npy") for sub, f in folders.items()}
        ids = set(files["image"])
        if not ids:
            raise layout_error(dataset, root, f"no {{i}}.npy files in {folders['image']}.", layout, _FIX)
        for sub, fs in files.items():
            if set(fs) != ids:
                missing = sorted(ids - set(fs))[:5]
                extra = sorted(set(fs) - ids)[:5]
                raise layout_error(
                    dataset,
                    root,
                    f"{self.split_dir / sub} does not hold the same sample numbers as "
                    f"{folders['image']} (missing e.g. {missing}, extra e.g. {extra}).",
                    layout,
                )
        all_ids = sorted(ids)
        self.ids = [all_ids[i] for i in indices] if indices is not None else all_ids
        self._folders = folders
        self._ref: tuple[tuple[int, int], Path] | None = None  # (size, file) of the first sample read
        # Check one sample eagerly so a wrong layout fails at construction, not mid-epoch.
        self._load(self.ids[0])

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, sub: str, i: int) -> Path:
        return self._folders[sub] / f"{i}.npy"

    def _bad(self, path: Path, problem: str) -> DataError:
        return layout_error(self.dataset, self.root, f"{path}: {problem}", self.layout)

    def _load(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self._path("image", i)
        img = load_npy(p, self.dataset, self.root, self.layout)
        if img.ndim != 3 or img.shape[2] != 3:
            raise self._bad(p, f"image of shape {img.shape}, expected H×W×3.")
        H, W = img.shape[:2]
        if self.size is not None and self.size != (H, W):
            raise self._bad(p, f"image of size {H}×{W}, expected {self.size[0]}×{self.size[1]}.")
        if self.size is None:
            if self._ref is None:
                self._ref = ((H, W), p)
            elif self._ref[0] != (H, W):
                (h0, w0), p0 = self._ref
                raise self._bad(
                    p,
                    f"image of size {H}×{W}, but {p0} is {h0}×{w0}; with size checking off the samples of a "
                    "split may have any size, but all the same one (a batch stacks them). Resize the files.",
                )
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        out: dict[str, torch.Tensor] = {}
        for t, (sub, kind) in self.targets.items():
            p = self._path(sub, i)
            a = load_npy(p, self.dataset, self.root, self.layout)
            if kind == "segmentation":
                if a.shape != (H, W):
                    raise self._bad(p, f"label of shape {a.shape}, expected {(H, W)} (H×W).")
                a = np.asarray(a)
                if not np.issubdtype(a.dtype, np.integer):
                    if a.dtype.kind not in "fb":
                        raise self._bad(p, f"label of dtype {a.dtype}, expected integer class ids.")
                    bad = ~np.isfinite(a) | (a != np.round(a)) if a.dtype.kind == "f" else np.zeros(a.shape, bool)
                    if bad.any():
                        k = tuple(int(x) for x in np.argwhere(bad)[0])
                        raise self._bad(
                            p,
                            f"label value {float(a[k]):g} at {k} is not an integer class id ({int(bad.sum())} such "
                            "values); labels must be whole numbers (-1 = ignore). Re-export the labels "
                            "without interpolation.",
                        )
                lab = a.astype(np.int64)
                if lab.size and (lab.min() < -1 or lab.max() >= self.num_classes):
                    raise self._bad(
                        p,
                        f"label values in [{lab.min()}, {lab.max()}], "
                        f"expected -1 (ignore) or 0..{self.num_classes - 1}.",
                    )
                out[t] = torch.from_numpy(lab)
            else:
                c = 1 if kind == "depth" else 3
                if a.ndim == 2 and c == 1:
                    a = a[..., None]
                if a.shape != (H, W, c):
                    raise self._bad(p, f"{kind} of shape {a.shape}, expected {(H, W, c)} (H×W×{c}).")
                out[t] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))
        return image, out

    def __getitem__(self, idx: int) -> dict:
        image, targets = self._load(self.ids[idx])
        if self.augment:
            image, targets = random_scale_crop(image, targets, self.kinds, self.scales)
            image, targets = random_hflip(image, targets, self.kinds)
        return {"input": image, "targets": targets}


def _make_dense(
    root: str | os.PathLike | None,
    *,
    dataset: str,
    layout: str,
    targets: dict[str, tuple[str, str]],
    num_classes: int,
    size: tuple[int, int] | None,
    augment: bool,
    val_fraction: float,
    split_seed: int,
) -> dict[str, NpyDenseDataset]:
    if root is None:
        raise ConfigurationError(f"{dataset} needs root=<folder holding train/ and val/>.\nExpected layout:\n{layout}")
    root_p = require_dir(dataset, root, root, layout, _FIX)
    train_dir = require_dir(dataset, root_p / "train", root, layout, _FIX)
    test_dir = require_dir(dataset, root_p / "val", root, layout, _FIX)
    common: dict[str, Any] = {"num_classes": num_classes, "dataset": dataset, "root": root, "layout": layout,
                              "size": size}
    full = NpyDenseDataset(train_dir, targets, **common)
    tr, va = carve_split(len(full), val_fraction, split_seed)
    return {
        "train": NpyDenseDataset(train_dir, targets, indices=tr, augment=augment, **common),
        "val": NpyDenseDataset(train_dir, targets, indices=va, **common),
        "test": NpyDenseDataset(test_dir, targets, **common),
    }


def make_nyuv2_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    augment: bool = True,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    check_size: bool = True,
) -> dict[str, NpyDenseDataset]:
    """NYUv2 (13-class segmentation, depth, normals; 288×384) → ``{"train", "val", "test"}``.

    Silberman et al. 2012, 13-class version of Couprie et al. 2013 as preprocessed by MTAN
    (arXiv:1803.10704). ``val`` is carved from ``train`` (10 %, ``split_seed`` 0: 716 / 79 of
    795); ``test`` is the released ``val`` folder (654). ``augment`` (default True, the papers'
    protocol) applies to ``train`` only. ``seed`` (the run seed) does not change the data.
    """
    del seed
    return _make_dense(
        root,
        dataset="NYUv2",
        layout=NYUV2_LAYOUT,
        targets={
            "segmentation": ("label", "segmentation"),
            "depth": ("depth", "depth"),
            "normal": ("normal", "normal"),
        },
        num_classes=13,
        size=(288, 384) if check_size else None,
        augment=augment,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )


def make_cityscapes_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    augment: bool = True,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    label_dir: str = "label",
    check_size: bool = True,
) -> dict[str, NpyDenseDataset]:
    """Cityscapes (7-class segmentation, depth; 128×256) → ``{"train", "val", "test"}``.

    Cordts et al. 2016 as preprocessed by MTAN (arXiv:1803.10704). ``val`` is carved from
    ``train`` (10 %, ``split_seed`` 0: 2678 / 297 of 2975); ``test`` is the released ``val``
    folder (500). ``label_dir``: "label" (LibMTL) or "label_7" (MTAN's release).
    """
    del seed
    return _make_dense(
        root,
        dataset="Cityscapes",
        layout=CITYSCAPES_LAYOUT,
        targets={"segmentation": (label_dir, "segmentation"), "depth": ("depth", "depth")},
        num_classes=7,
        size=(128, 256) if check_size else None,
        augment=augment,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )
