"""Office-31 and Office-Home: one image-classification task per domain (multi-input benchmarks).

The split lists (60/20/20 train/val/test per domain, lines ``relative/path.jpg label``) are the ones
published with LibMTL (MIT License; ``splits/LICENSE-LibMTL`` beside this file) and ship with mtlens.
Images are read with PIL, resized to 224×224 and normalised with the ImageNet statistics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConfigurationError, DataError
from ._common import layout_error, require_dir
from .transforms import normalize_imagenet, pil_to_tensor, random_resized_box

OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")

OFFICE31_LAYOUT = """\
ROOT/
  amazon/images/<class>/frame_XXXX.jpg   (31 classes: back_pack, bike, ...)
  dslr/images/<class>/frame_XXXX.jpg
  webcam/images/<class>/frame_XXXX.jpg
(the paths are the ones listed in mtlens/data/splits/office-31/<domain>_{train,val,test}.txt)"""

OFFICEHOME_LAYOUT = """\
ROOT/
  Art/<Class>/XXXXX.jpg          (65 classes: Alarm_Clock, Backpack, ...)
  Clipart/<Class>/XXXXX.jpg
  Product/<Class>/XXXXX.jpg
  Real_World/<Class>/XXXXX.jpg
(the paths are the ones listed in mtlens/data/splits/office-home/<domain>_{train,val,test}.txt)"""

_FIX31 = "Download Office-31 (Saenko et al. 2010) and pass the folder holding amazon/ dslr/ webcam/ as root."
_FIXHOME = (
    "Download Office-Home (Venkateswara et al. 2017) and pass the folder holding Art/ Clipart/ "
    "Product/ Real_World/ as root."
)


def split_list_path(benchmark: str, domain: str, split: str) -> Path:
    """Path of a shipped split list, e.g. ``split_list_path("office-31", "amazon", "train")``."""
    base = resources.files("mtlens.data") / "splits" / benchmark / f"{domain}_{split}.txt"
    return Path(str(base))


def read_split_list(path: str | os.PathLike, num_classes: int) -> list[tuple[str, int]]:
    """Parse a split list (``relative/path.jpg label`` per line) into ``[(path, label)]``.

    Raises :class:`DataError` on a missing file, a malformed line or a label outside ``0..num_classes-1``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"split list {p} is missing; expected lines 'relative/path.jpg label'.")
    out: list[tuple[str, int]] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{p}:{n}: malformed line {line!r}; expected 'relative/path.jpg label'.")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{p}:{n}: label {label} outside 0..{num_classes - 1}.")
        out.append((parts[0], label))
    if not out:
        raise DataError(f"split list {p} is empty.")
    return out


class ImageListDataset(Dataset):
    """Images listed as ``(relative path, label)`` under ``root``: ``{"input": 3×S×S, "target": int64}``.

    Evaluation: resize to ``size``×``size`` (bilinear) and ImageNet normalisation, as LibMTL's
    Office pipeline. ``augment=True`` (training only; ours, LibMTL has none): random resized crop
    covering 50-100 % of the area (aspect 3/4-4/3) and a horizontal flip with probability 0.5.
    """

    def __init__(
        self, root: str | os.PathLike, entries: Iterable[tuple[str, int]], *, size: int = 224, augment: bool = False,
        dataset: str = "", layout: str = "",
    ) -> None:
        self.root = Path(root)
        self.entries = list(entries)
        self.size = int(size)
        self.augment = bool(augment)
        self.dataset = dataset
        self.layout = layout

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int) -> dict:
        from PIL import Image, UnidentifiedImageError

        rel, label = self.entries[idx]
        path = self.root / rel
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except FileNotFoundError as exc:
            raise layout_error(self.dataset, self.root, f"image {path} is missing.", self.layout) from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise layout_error(
                self.dataset, self.root, f"image {path} is unreadable ({exc}).", self.layout
            ) from exc
        S = self.size
        if self.augment:
            box = random_resized_box(img.width, img.height)
            img = img.resize((S, S), resample=Image.Resampling.BILINEAR, box=box)
            if float(torch.rand(1)) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((S, S), resample=Image.Resampling.BILINEAR)
        x = normalize_imagenet(pil_to_tensor(img))
        return {"input": x, "target": torch.tensor(label, dtype=torch.int64)}


def _make_office(
    root: str | os.PathLike | None,
    *,
    benchmark: str,
    dataset: str,
    domains_all: tuple[str, ...],
    num_classes: int,
    layout: str,
    fix: str,
    domains: Sequence[str] | None = None,
    augment: bool = False,
    size: int = 224,
    split_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> dict[str, dict[str, ImageListDataset]]:
    if root is None:
        raise ConfigurationError(f"{dataset} needs root=<folder holding the domain folders>.\n{layout}")
    doms = tuple(domains) if domains is not None else domains_all
    unknown = [d for d in doms if d not in domains_all]
    if unknown:
        raise ConfigurationError(f"{dataset}: unknown domains {unknown}; available: {list(domains_all)}")
    root_p = require_dir(dataset, root, root, layout, fix)
    missing_domains = [d for d in doms if not (root_p / d).is_dir()]
    if missing_domains:
        present = sorted(p.name for p in root_p.iterdir() if p.is_dir())
        raise layout_error(
            dataset, root, f"domain folders {missing_domains} are missing (found: {present}).", layout, fix
        )
    out: dict[str, dict[str, ImageListDataset]] = {}
    for split in ("train", "val", "test"):
        out[split] = {}
        for d in doms:
            lst = (
                Path(split_dir) / f"{d}_{split}.txt"
                if split_dir is not None
                else split_list_path(benchmark, d, split)
            )
            entries = read_split_list(lst, num_classes)
            if check_files:
                absent = [rel for rel, _ in entries if not (root_p / rel).is_file()]
                if absent:
                    raise layout_error(
                        dataset,
                        root,
                        f"{len(absent)} of the {len(entries)} images of {lst.name} are missing, e.g. "
                        f"{[str(root_p / a) for a in absent[:3]]}.",
                        layout,
                        fix,
                    )
            out[split][d] = ImageListDataset(
                root_p,
                entries,
                size=size,
                augment=augment and split == "train",
                dataset=dataset,
                layout=layout,
            )
    return out


def make_office31_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    domains: Sequence[str] | None = None,
    augment: bool = False,
    size: int = 224,
    split_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> dict[str, dict[str, ImageListDataset]]:
    """Office-31 (Saenko et al. 2010; amazon, dslr, webcam × 31 classes) → ``{split: {domain: Dataset}}``.

    Splits: LibMTL's 60/20/20 lists shipped in ``mtlens/data/splits/office-31`` (MIT License),
    train/val/test = amazon 1680/552/585, dslr 287/89/122, webcam 466/149/180. ``split_dir``
    replaces the shipped lists with ``<split_dir>/<domain>_<split>.txt``. ``seed`` (the run seed)
    does not change the data. ``augment`` (default False, as LibMTL) applies to train only.
    """
    del seed
    return _make_office(
        root,
        benchmark="office-31",
        dataset="Office-31",
        domains_all=OFFICE31_DOMAINS,
        num_classes=31,
        layout=OFFICE31_LAYOUT,
        fix=_FIX31,
        domains=domains,
        augment=augment,
        size=size,
        split_dir=split_dir,
        check_files=check_files,
    )


def make_officehome_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    domains: Sequence[str] | None = None,
    augment: bool = False,
    size: int = 224,
    split_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> dict[str, dict[str, ImageListDataset]]:
    """Office-Home (Venkateswara et al. 2017; Art, Clipart, Product, Real_World × 65 classes).

    Splits: LibMTL's 60/20/20 lists shipped in ``mtlens/data/splits/office-home`` (MIT License),
    train/val/test = Art 1435/465/527, Clipart 2596/846/923, Product 2635/860/944,
    Real_World 2586/846/925. Otherwise as :func:`make_office31_datasets`.
    """
    del seed
    return _make_office(
        root,
        benchmark="office-home",
        dataset="Office-Home",
        domains_all=OFFICEHOME_DOMAINS,
        num_classes=65,
        layout=OFFICEHOME_LAYOUT,
        fix=_FIXHOME,
        domains=domains,
        augment=augment,
        size=size,
        split_dir=split_dir,
        check_files=check_files,
    )
