"""Small, format-exact fixtures of the benchmarks that need a data directory.

Each ``write_*_fixture(root, ...)`` writes a few samples in the dataset's REAL on-disk layout
(the layout the loaders of :mod:`mtlens.data` print in their errors), so a pipeline can be tested
end to end — loader, DataLoader, model, losses, metrics — without downloading anything:

>>> import tempfile, mtlens
>>> from mtlens.data import make_nyuv2_datasets
>>> from mtlens.data.fixtures import write_nyuv2_fixture
>>> root = write_nyuv2_fixture(tempfile.mkdtemp(), n_train=4, n_test=2, size=(32, 48))
>>> {k: len(v) for k, v in make_nyuv2_datasets(root, check_size=False).items()}
{'train': 3, 'val': 1, 'test': 2}

==========================  ==============================================================
function                    layout written (loader)
==========================  ==============================================================
write_nyuv2_fixture         ROOT/{train,val}/{image,label,depth,normal}/{i}.npy (make_nyuv2_datasets)
write_cityscapes_fixture    ROOT/{train,val}/{image,<label_dir>,depth}/{i}.npy (make_cityscapes_datasets)
write_office_fixture        ROOT/<paths of the shipped split lists>.jpg + lists (make_office31/officehome)
write_metagraspnet_fixture  ROOT/scene{N}/{v}.npz, {v}_rgb.png[, {v}_camera_params.json]
write_mnist_idx_fixture     ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (IDX)
==========================  ==============================================================

The content is random (seeded, deterministic) but valid: labels in range with ignore pixels,
depth with one invalid pixel, unit normals, intrinsics that make MetaGraspNet's normals known
exactly. The sizes are whatever you ask for: the dense loaders check the papers' resolutions
unless ``check_size=False``. Existing files of the same names are overwritten; other files under
``root`` are left alone. Not from a paper: the layouts are those of the releases named in
docs/benchmarks-data.md.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .metagraspnet import METAGRASPNET_NUM_CLASSES, default_intrinsics
from .mnist import IDX_FILES
from .office import OFFICE31_DOMAINS, OFFICEHOME_DOMAINS, read_split_list, split_list_path

__all__ = [
    "METAGRASPNET_FIXTURE_NORMAL",
    "encode_idx",
    "metagraspnet_plane_depth",
    "write_cityscapes_fixture",
    "write_metagraspnet_fixture",
    "write_metagraspnet_view",
    "write_mnist_idx_fixture",
    "write_nyuv2_fixture",
    "write_office_fixture",
]

#: Unit normal (camera frame, facing the camera) of the tilted plane every MetaGraspNet fixture
#: view shows: ``normalize(0.2, -0.3, -1.0)``. Ours.
METAGRASPNET_FIXTURE_NORMAL = (np.array([0.2, -0.3, -1.0]) / np.linalg.norm([0.2, -0.3, -1.0])).tolist()


# --------------------------------------------------------------------------------------------
# checks
def _count(name: str, n: object, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise ConfigurationError(f"{name} must be an integer ≥ {minimum}, got {n!r}")
    return int(n)


def _size(size: int | Sequence[int], minimum: int = 1) -> tuple[int, int]:
    if isinstance(size, bool):
        raise ConfigurationError(f"size must be (H, W) or an integer, got {size!r}")
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    try:
        H, W = (int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"size must be (H, W) or an integer, got {size!r}") from exc
    if min(H, W) < minimum:
        raise ConfigurationError(f"size {size!r}: both sides must be ≥ {minimum}")
    return H, W


def _root(root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ConfigurationError("root must be a folder path to write the fixture into, got None")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------
# NYUv2 / Cityscapes (.npy release of MTAN / LibMTL)
def _write_dense_split(folder: Path, n: int, size: tuple[int, int], num_classes: int, normal: bool, label_dir: str,
                       rng: np.random.Generator) -> None:
    H, W = size
    subs = ("image", label_dir, "depth") + (("normal",) if normal else ())
    for sub in subs:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(folder / "image" / f"{i}.npy", rng.random((H, W, 3), dtype=np.float32))
        # the releases store the class ids as floats; -1 = ignore
        lab = rng.integers(-1, num_classes, size=(H, W)).astype(np.float32)
        np.save(folder / label_dir / f"{i}.npy", lab)
        depth = rng.uniform(0.5, 10.0, size=(H, W, 1)).astype(np.float32)
        depth[0, 0] = 0.0  # invalid pixel, as the releases mark missing depth
        np.save(folder / "depth" / f"{i}.npy", depth)
        if normal:
            nrm = rng.normal(size=(H, W, 3)).astype(np.float32)
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[0, 0] = 0.0  # invalid normal (all-zero), where the depth is invalid
            np.save(folder / "normal" / f"{i}.npy", nrm)


def _write_dense(root: str | os.PathLike | None, n_train: int, n_test: int, size: int | Sequence[int], seed: int,
                 num_classes: int, normal: bool, label_dir: str) -> Path:
    n_train = _count("n_train", n_train)
    n_test = _count("n_test", n_test)
    hw = _size(size)
    if not isinstance(label_dir, str) or not label_dir or "/" in label_dir:
        raise ConfigurationError(f"label_dir must be a folder name such as 'label', got {label_dir!r}")
    r = _root(root)
    for k, (split, n) in enumerate((("train", n_train), ("val", n_test))):
        rng = np.random.default_rng([int(seed), k])
        _write_dense_split(r / split, n, hw, num_classes, normal, label_dir, rng)
    return r


def write_nyuv2_fixture(root: str | os.PathLike, n_train: int = 4, n_test: int = 2,
                        size: int | Sequence[int] = (32, 48), seed: int = 0) -> Path:
    """Write a tiny NYUv2 in the preprocessed ``.npy`` layout of MTAN (arXiv:1803.10704) / LibMTL.

    ``ROOT/train/`` holds ``n_train`` samples and ``ROOT/val/`` (the papers' test split, mtlens's
    ``"test"``) ``n_test``, each as ``image/{i}.npy`` (H×W×3 float32 in [0, 1)), ``label/{i}.npy``
    (H×W float32 class ids −1..12, −1 = ignore, as the release stores them), ``depth/{i}.npy``
    (H×W×1 float32 metres in [0.5, 10), pixel (0, 0) = 0 = invalid) and ``normal/{i}.npy``
    (H×W×3 float32 unit vectors, pixel (0, 0) all-zero = invalid).

    Defaults: ``n_train=4, n_test=2`` (the loader carves 10 % of train, at least one sample, as
    val: 3 / 1 / 2), ``size=(32, 48)`` (H, W; the release is 288×384, so load with
    ``check_size=False`` unless you ask for that size), ``seed=0``. Returns ``root`` as a Path.
    """
    return _write_dense(root, n_train, n_test, size, seed, 13, True, "label")


def write_cityscapes_fixture(root: str | os.PathLike, n_train: int = 4, n_test: int = 2,
                             size: int | Sequence[int] = (32, 64), seed: int = 0,
                             label_dir: str = "label") -> Path:
    """Write a tiny Cityscapes in the preprocessed ``.npy`` layout of MTAN (arXiv:1803.10704) / LibMTL.

    As :func:`write_nyuv2_fixture` without normals: ``image``, ``<label_dir>`` (7 classes, −1 =
    ignore) and ``depth`` folders under ``ROOT/train`` and ``ROOT/val``. ``label_dir``: "label"
    (LibMTL's name, the loader's default) or "label_7" (MTAN's release; load with
    ``label_dir="label_7"``). Defaults: ``n_train=4, n_test=2``, ``size=(32, 64)`` (the release
    is 128×256: load with ``check_size=False`` otherwise), ``seed=0``. Returns ``root``.
    """
    return _write_dense(root, n_train, n_test, size, seed, 7, False, label_dir)


# --------------------------------------------------------------------------------------------
# Office-31 / Office-Home (image folders listed by LibMTL's split lists)
_OFFICE = {
    "office-31": (OFFICE31_DOMAINS, 31),
    "office-home": (OFFICEHOME_DOMAINS, 65),
}


def _select_rows(rows: list[tuple[str, int]], k: int | None) -> list[tuple[str, int]]:
    """The first ``k`` rows taken round-robin over the classes (the lists are sorted by class)."""
    if k is None:
        return list(rows)
    rank: dict[int, int] = {}
    keyed = []
    for pos, (path, label) in enumerate(rows):
        r = rank.get(label, 0)
        rank[label] = r + 1
        keyed.append((r, label, pos, path))
    keyed.sort()
    return [(path, label) for _, label, _, path in keyed[:k]]


def _jpeg_bytes(color: Sequence[int], size: tuple[int, int]) -> bytes:
    from PIL import Image

    H, W = size
    buf = io.BytesIO()
    Image.new("RGB", (W, H), tuple(int(c) for c in color)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_office_fixture(root: str | os.PathLike, suite: str = "office-31", per_domain: int | None = 2,
                         size: int | Sequence[int] = (24, 32), seed: int = 0, *,
                         domains: Sequence[str] | None = None, split_dir: str | os.PathLike | None = None,
                         color: Sequence[int] | None = None) -> Path:
    """Write Office-31 / Office-Home JPEGs at the paths the SHIPPED split lists name, and the lists.

    Office-31 (Saenko et al. 2010) / Office-Home (Venkateswara et al. 2017) with LibMTL's
    60/20/20 lists (``mtlens/data/splits``). For each domain and split, ``per_domain`` rows of the
    shipped list are kept — taken round-robin over the classes, so up to 31 / 65 classes appear —
    their images are written at the listed relative paths under ``root``, and the kept rows are
    written to ``<split_dir>/<domain>_<split>.txt``. Load with
    ``make_office31_datasets(root, split_dir=<returned path>)`` (the loader then checks exactly
    these files). ``per_domain=None`` writes every listed image (Office-31: 4 110, Office-Home:
    15 588 small files), so the loader also accepts the shipped lists (no ``split_dir``).

    Every image is one solid colour per (domain, class), drawn from ``default_rng(seed)``, so
    the class is learnable; ``color=(r, g, b)`` uses that colour for every image instead.

    Defaults: ``suite="office-31"``, ``per_domain=2`` (images per domain and split),
    ``size=(24, 32)`` (H, W; the loader resizes to its ``size``, 224 by default), ``seed=0``,
    ``domains=None`` (all; a subset leaves the others out, as a broken download would),
    ``split_dir=None`` → ``root/"split_lists"``. Returns the split-list folder.
    """
    if suite not in _OFFICE:
        raise ConfigurationError(f"suite={suite!r}; choose one of {sorted(_OFFICE)}")
    all_domains, num_classes = _OFFICE[suite]
    doms = tuple(all_domains) if domains is None else tuple(domains)
    unknown = [d for d in doms if d not in all_domains]
    if unknown or not doms:
        raise ConfigurationError(f"{suite}: unknown or no domains {unknown or doms}; available: {list(all_domains)}")
    if per_domain is not None:
        per_domain = _count("per_domain", per_domain)
    H, W = _size(size)
    r = _root(root)
    lists = Path(split_dir) if split_dir is not None else r / "split_lists"
    lists.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(seed))
    palette = rng.integers(0, 256, size=(len(all_domains), num_classes, 3))
    cache: dict[tuple, bytes] = {}
    for d in doms:
        di = all_domains.index(d)
        for split in ("train", "val", "test"):
            rows = _select_rows(read_split_list(split_list_path(suite, d, split), num_classes), per_domain)
            made: set[Path] = set()
            for rel, label in rows:
                c = tuple(color) if color is not None else tuple(int(v) for v in palette[di, label])
                if c not in cache:
                    cache[c] = _jpeg_bytes(c, (H, W))
                p = r / rel
                if p.parent not in made:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    made.add(p.parent)
                p.write_bytes(cache[c])
            (lists / f"{d}_{split}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    return lists


# --------------------------------------------------------------------------------------------
# MetaGraspNet (scene folders of dataset_sim / dataset_real)
def metagraspnet_plane_depth(fx: float, fy: float, cx: float, cy: float, size: int | Sequence[int],
                             normal: Sequence[float] | None = None, distance_cm: float = 50.0) -> np.ndarray:
    """z-depth (H×W float32, centimetres, MetaGraspNet's unit) of the plane ``n·P = −distance_cm``.

    Pinhole camera (OpenCV frame, as :mod:`mtlens.data.geometry`): the pixel ``(v, u)`` sees the
    ray ``((u − cx)/fx, (v − cy)/fy, 1)``, which meets the plane at ``z = −d / (n · ray)``.
    ``normal`` defaults to :data:`METAGRASPNET_FIXTURE_NORMAL`; it must face the camera over the
    whole image (every depth positive), else :class:`ConfigurationError`.
    """
    H, W = _size(size)
    n = np.asarray(METAGRASPNET_FIXTURE_NORMAL if normal is None else normal, dtype=np.float64)
    if n.shape != (3,) or not np.isfinite(n).all() or np.linalg.norm(n) == 0:
        raise ConfigurationError(f"normal must be a non-zero 3-vector, got {normal!r}")
    n = n / np.linalg.norm(n)
    u = np.arange(W, dtype=np.float64)[None, :]
    v = np.arange(H, dtype=np.float64)[:, None]
    denom = n[0] * (u - cx) / fx + n[1] * (v - cy) / fy + n[2]
    with np.errstate(divide="ignore"):
        z = -float(distance_cm) / denom
    if not (np.isfinite(z).all() and (z > 0).all()):
        raise ConfigurationError(
            f"the plane with normal {n.tolist()} at {distance_cm} cm is not in front of the camera over the "
            "whole image: use a normal facing the camera (negative z) and a positive distance"
        )
    return z.astype(np.float32)


def write_metagraspnet_view(scene_dir: str | os.PathLike, view: int, depth_cm: np.ndarray, semantic: np.ndarray, *,
                            camera: dict | None = None, rgba: bool = False, seed: int = 0) -> None:
    """Write one MetaGraspNet viewpoint: ``{v}_rgb.png``, ``{v}.npz`` and optionally its camera json.

    Layout of MetaGraspNet (Gilles et al. 2022, arXiv:2208.03963; see
    :data:`mtlens.data.METAGRASPNET_LAYOUT`): ``{v}.npz`` with ``depth`` (H×W, cm, NaN = invalid),
    ``instances_semantic`` (H×W category ids), ``instances_objects`` and ``occlusion``;
    ``{v}_rgb.png`` an H×W random image (RGBA when ``rgba=True``; the loader keeps RGB);
    ``{v}_camera_params.json`` = ``camera`` when given (real scenes: fx, fy, cx, cy, width,
    height; synthetic ones: fx, fy, resolution). Values are written as given, unchecked, so
    malformed views can be written on purpose. The release's ``{v}_depth.png``,
    ``{v}_scene.hdf5`` and ``{v}_order.csv`` are not read by mtlens and not written.
    """
    from PIL import Image

    folder = Path(scene_dir)
    folder.mkdir(parents=True, exist_ok=True)
    depth_cm = np.asarray(depth_cm)
    semantic = np.asarray(semantic)
    H, W = depth_cm.shape[:2]
    mode = "RGBA" if rgba else "RGB"
    rng = np.random.default_rng([int(seed), int(view)])
    arr = rng.integers(0, 256, size=(H, W, len(mode)), dtype=np.uint8)
    Image.fromarray(arr, mode).save(folder / f"{view}_rgb.png")
    objects = semantic.astype(np.int64) * 2 if np.issubdtype(semantic.dtype, np.integer) else semantic
    np.savez_compressed(
        folder / f"{view}.npz",
        depth=depth_cm,
        instances_semantic=semantic,
        instances_objects=np.asarray(objects),
        occlusion=np.zeros(depth_cm.shape, dtype=np.float32),
    )
    if camera is not None:
        (folder / f"{view}_camera_params.json").write_text(json.dumps(camera))


def write_metagraspnet_fixture(root: str | os.PathLike, scenes: Sequence[int] = (1, 2, 3),
                               views: Sequence[int] = (0, 1),
                               size: int | Sequence[int] = (30, 40), seed: int = 0, *,
                               real_scenes: Sequence[int] = (), real_intrinsics: Sequence[float] | None = None,
                               sim_camera_json: bool = True, sim_rgba: bool = True,
                               normal: Sequence[float] | None = None, distance_cm: float = 50.0,
                               nan_pixels: Sequence[tuple[int, int]] = ((2, 5),)) -> Path:
    """Write MetaGraspNet scene folders ``ROOT/scene{N}/`` whose normals are known exactly.

    MetaGraspNet (Gilles et al. 2022, arXiv:2208.03963), CC BY-NC-SA 3.0; the layout is that of
    ``dataset_sim`` / ``dataset_real`` (:func:`write_metagraspnet_view`). Every view sees one
    tilted plane (``normal``, default :data:`METAGRASPNET_FIXTURE_NORMAL`, at ``distance_cm``
    = 50 cm): its depth is exact (:func:`metagraspnet_plane_depth`), so the loader's normals must
    equal ``normal`` at every valid pixel. The pixels ``nan_pixels`` (default ``((2, 5),)``) get
    NaN depth (invalid, as in the release). Semantic ids are uniform in 0..97.

    Scenes in ``real_scenes`` are written as real ones: RGB image and a camera json with
    ``fx, fy, cx, cy, width, height`` from ``real_intrinsics`` (default ``(1.1·W, 1.1·W,
    (W−1)/2, (H−1)/2)``). The others are synthetic: the Isaac camera of
    :func:`mtlens.data.default_intrinsics`, RGBA image when ``sim_rgba`` (default True), and
    the release's ``fx, fy, resolution`` json when ``sim_camera_json`` (default True; False
    makes the loader fall back to the same camera by default).

    Defaults: ``scenes=(1, 2, 3)`` (the loader needs ≥ 3 to split train/val/test by scene),
    ``views=(0, 1)``, ``size=(30, 40)`` (H, W; load with the loader's ``size`` equal to it, or
    any other, the normals stay exact), ``seed=0``. Returns ``root``.
    """
    H, W = _size(size, minimum=2)
    scenes = [int(s) for s in scenes]
    views = [int(v) for v in views]
    if not scenes or not views or len(set(scenes)) != len(scenes) or len(set(views)) != len(views):
        raise ConfigurationError(f"scenes {scenes} and views {views} must be non-empty and distinct")
    if any(s < 0 for s in scenes + views):
        raise ConfigurationError("scene and view numbers must be non-negative integers")
    extra = sorted({int(s) for s in real_scenes} - set(scenes))
    if extra:
        raise ConfigurationError(f"real_scenes {extra} are not among scenes {scenes}")
    for (i, j) in nan_pixels:
        if not (0 <= i < H and 0 <= j < W):
            raise ConfigurationError(f"nan pixel ({i}, {j}) lies outside the {H}×{W} image")
    if real_intrinsics is None:
        real_intrinsics = (1.1 * W, 1.1 * W, (W - 1) / 2.0, (H - 1) / 2.0)
    rfx, rfy, rcx, rcy = (float(x) for x in real_intrinsics)
    r = _root(root)
    rng = np.random.default_rng(int(seed))
    real = {int(s) for s in real_scenes}
    for s in scenes:
        camera: dict[str, Any] | None
        if s in real:
            intr = (rfx, rfy, rcx, rcy)
            camera = {"fx": rfx, "fy": rfy, "cx": rcx, "cy": rcy, "width": W, "height": H}
        else:
            intr = default_intrinsics(W, H)
            camera = (
                {"fx": intr[0], "fy": intr[1], "resolution": {"height": H, "width": W}} if sim_camera_json else None
            )
        depth = metagraspnet_plane_depth(*intr, (H, W), normal=normal, distance_cm=distance_cm)
        for (i, j) in nan_pixels:
            depth[i, j] = np.nan
        for v in views:
            sem = rng.integers(0, METAGRASPNET_NUM_CLASSES, size=(H, W)).astype(np.uint8)
            write_metagraspnet_view(r / f"scene{s}", v, depth, sem, camera=camera,
                                    rgba=sim_rgba and s not in real, seed=int(seed) * 100003 + s)
    return r


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format of MNIST (LeCun et al. 1998), the inverse of ``read_idx``.

    Header: two zero bytes, the type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per dimension;
    then the values, big-endian. Other dtypes raise :class:`ConfigurationError`.
    """
    a = np.asarray(array)
    be = a.dtype.newbyteorder(">") if a.dtype.itemsize > 1 else a.dtype
    if be not in _IDX_CODES:
        raise ConfigurationError(f"IDX cannot hold dtype {a.dtype}; use uint8, int8, int16, int32, float32 or float64")
    if a.ndim > 255:
        raise ConfigurationError(f"IDX holds at most 255 dimensions, got {a.ndim}")
    header = bytes([0, 0, _IDX_CODES[be], a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + np.ascontiguousarray(a, dtype=be).tobytes()


def _class_pattern(c: int) -> tuple[slice, slice]:
    """Where the bright 4×4 square of class ``c`` sits: rows 13-16 (classes 0-4) or 21-24 (5-9)."""
    r0 = 13 if c < 5 else 21
    c0 = 2 + 5 * (c % 5)
    return slice(r0, r0 + 4), slice(c0, c0 + 4)


def write_mnist_idx_fixture(root: str | os.PathLike, n_train: int = 60, n_test: int = 20, gz: bool = True,
                            seed: int = 0, *,
                            id_offset: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four MNIST / Fashion-MNIST IDX files (LeCun et al. 1998 format) into ``root``.

    Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (``.gz``-compressed when ``gz``), uint8 N×28×28 images and N
    labels. Pass ``root`` (or ``root/MNIST/raw`` written as torchvision does) to the loaders.

    Content: label ``i mod 10`` for image ``i``; background noise in 0..63 and a bright 4×4
    square whose position encodes the class (learnable); pixel (1, 1) holds the image's
    identity ``1 + (id_offset + i) mod 255`` and pixel (9, 9) is 0, so on a MultiMNIST canvas
    (second item offset by 8 px) pixel (1, 1) names the top-left source image and pixel (9, 9)
    the bottom-right one.

    Defaults: ``n_train=60, n_test=20, gz=True, seed=0, id_offset=0``. mtlens caches IDX reads
    per folder within a process: write each fixture into a fresh folder. Returns
    ``{"train": (X, y), "test": (X, y)}``, the arrays written.
    """
    n_train = _count("n_train", n_train)
    n_test = _count("n_test", n_test)
    r = _root(root)
    rng = np.random.default_rng(int(seed))
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "test", n_test)):
        x = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for c in range(10):
            rows, cols = _class_pattern(c)
            x[y == c, rows, cols] = 255
        x[:, 9, 9] = 0
        x[:, 1, 1] = (1 + (int(id_offset) + np.arange(n)) % 255).astype(np.uint8)
        for key, arr in ((f"{prefix}_images", x), (f"{prefix}_labels", y)):
            name = IDX_FILES[key]
            target, other = (r / (name + ".gz"), r / name) if gz else (r / name, r / (name + ".gz"))
            if other.exists():
                raise ConfigurationError(
                    f"{other} already exists: the loader would read one of {other.name} / {target.name} and "
                    "ignore the other. Write the fixture into a fresh folder (or delete the old files)."
                )
            data = encode_idx(arr)
            target.write_bytes(gzip.compress(data) if gz else data)
        out[split] = (x, y.astype(np.int64))
    return out
