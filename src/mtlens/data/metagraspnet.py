"""MetaGraspNet (Gilles et al., CASE 2022, arXiv:2208.03963) as a dense multi-task benchmark.

Tasks: semantic segmentation (the ``instances_semantic`` map: object category ids 1..97 of the
dataset's ``models/ifl_labels.py``, 0 = bin / background), depth (metres), and surface normals
computed from the depth with the camera intrinsics (:func:`mtlens.data.geometry.normals_from_depth`),
so the task set lines up with NYUv2. The MTL paper that uses MetaGraspNet did not publish its
exact task set; this is mtlens's choice (docs/benchmarks-data.md).

Only ``{v}.npz``, ``{v}_rgb.png`` and ``{v}_camera_params.json`` are read: h5py is not needed.
The dataset is CC BY-NC-SA 3.0, academic use only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigurationError, DataError
from ._common import DEFAULT_SPLIT_SEED, layout_error, require_dir
from .geometry import normals_from_depth

#: Category ids run 1..97 (models/ifl_labels.py, "033" unused) plus 0 for the bin/background.
METAGRASPNET_NUM_CLASSES = 98

#: The Isaac Sim camera of MetaGraspNet's synthetic scenes: focal length 35 mm over a 20.955 mm
#: aperture, principal point at the image centre. At 1200×1200 this gives fx = fy = 2004.29 px,
#: the values recorded in the release's synthetic ``camera_params.json`` (e.g. dataset_sim/scene83).
ISAAC_FOCAL_MM = 35.0
ISAAC_APERTURE_MM = 20.955

METAGRASPNET_LAYOUT = """\
ROOT/
  scene{N}/                      one folder per scene (N an integer)
    {v}_rgb.png                  RGB image of viewpoint v
    {v}.npz                      keys: depth (H×W, cm, NaN = invalid),
                                 instances_semantic (H×W category ids 0..97),
                                 instances_objects, occlusion (synthetic scenes)
    {v}_camera_params.json       fx, fy[, cx, cy, width, height | resolution]  (real scenes;
                                 optional: the synthetic scenes' camera otherwise)
    {v}_depth.png, {v}_scene.hdf5, {v}_order.csv   (present in the release, not read)"""

_FIX = (
    "Download MetaGraspNet (github.com/maximiliangilles/MetaGraspNet: dataset_sim / dataset_real; "
    "CC BY-NC-SA 3.0, academic use) and pass the folder holding the scene{N}/ folders as root."
)

_VIEW_RE = re.compile(r"^(\d+)\.npz$")
_SCENE_RE = re.compile(r"^scene(\d+)$")


def default_intrinsics(width: int, height: int) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` of the synthetic scenes' camera at ``width``×``height`` (see the constants)."""
    f = ISAAC_FOCAL_MM / ISAAC_APERTURE_MM * width
    return f, f, width / 2.0, height / 2.0


def read_camera_params(path: Path, width: int, height: int,
                       root: str | os.PathLike | None = None) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` from a MetaGraspNet ``camera_params.json``.

    Real scenes store ``fx, fy, cx, cy, width, height``; synthetic ones ``fx, fy, resolution``
    without a principal point, which is then the image centre (as the dataset's own scripts do).
    Intrinsics are rescaled when the json's resolution differs from the depth map's.
    """
    try:
        p = json.loads(Path(path).read_text())
        fx, fy = float(p["fx"]), float(p["fy"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise layout_error(
            "MetaGraspNet", root, f"{path} is not a camera json with fx and fy ({exc}).", METAGRASPNET_LAYOUT
        ) from exc
    if "resolution" in p:
        jw, jh = int(p["resolution"]["width"]), int(p["resolution"]["height"])
    else:
        jw, jh = int(p.get("width", width)), int(p.get("height", height))
    cx = float(p.get("cx", jw / 2.0))
    cy = float(p.get("cy", jh / 2.0))
    sx, sy = width / jw, height / jh
    return fx * sx, fy * sy, cx * sx, cy * sy


def find_views(root: str | os.PathLike) -> dict[int, list[int]]:
    """``{scene number: [viewpoints]}`` of every ``scene{N}/{v}.npz`` that has its ``{v}_rgb.png``."""
    root_p = require_dir("MetaGraspNet", root, root, METAGRASPNET_LAYOUT, _FIX)
    scenes: dict[int, list[int]] = {}
    orphans: list[str] = []
    for entry in sorted(os.listdir(root_p)):
        m = _SCENE_RE.match(entry)
        if not m or not (root_p / entry).is_dir():
            continue
        views = []
        for name in os.listdir(root_p / entry):
            mv = _VIEW_RE.match(name)
            if mv:
                v = int(mv.group(1))
                if (root_p / entry / f"{v}_rgb.png").is_file():
                    views.append(v)
                else:
                    orphans.append(f"{entry}/{v}_rgb.png")
        if views:
            scenes[int(m.group(1))] = sorted(views)
    if orphans:
        raise layout_error(
            "MetaGraspNet",
            root,
            f"RGB images missing for some viewpoints, e.g. {orphans[:3]}.",
            METAGRASPNET_LAYOUT,
            _FIX,
        )
    if not scenes:
        raise layout_error(
            "MetaGraspNet",
            root,
            "no scene{N}/ folder with {v}.npz + {v}_rgb.png found.",
            METAGRASPNET_LAYOUT,
            _FIX,
        )
    return scenes


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resizing (pixel centres aligned)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


class MetaGraspNetDataset(Dataset):
    """MetaGraspNet viewpoints (arXiv:2208.03963): ``{"input": 3×H×W in [0, 1], "targets": {...}}``.

    Targets: ``segmentation`` H×W int64 (0..97), ``depth`` 1×H×W metres, ``normal`` 3×H×W.

    ``size=(H, W)`` (default 256×256): the RGB image is resized bilinearly; segmentation and depth
    take the nearest source pixel; normals are computed at those same source pixels from the
    full-resolution intrinsics (exact back-projection of each kept pixel, finite differences
    between kept neighbours). Depth is converted from centimetres to metres; NaN / ≤ 0 → 0 (invalid).

    ``intrinsics=(fx, fy, cx, cy)`` (at the native resolution) overrides the json / default camera.
    """

    def __init__(self, root: str | os.PathLike, items: Iterable[tuple[int, int]], *, size: Sequence[int] = (256, 256),
                 intrinsics: Sequence[float] | None = None) -> None:
        self.root = Path(root)
        self.items = list(items)  # [(scene, view)]
        self.size = (int(size[0]), int(size[1]))
        self.intrinsics = tuple(intrinsics) if intrinsics is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def _bad(self, problem: str) -> DataError:
        return layout_error("MetaGraspNet", self.root, problem, METAGRASPNET_LAYOUT)

    def __getitem__(self, idx: int) -> dict:
        from PIL import Image, UnidentifiedImageError

        scene, v = self.items[idx]
        folder = self.root / f"scene{scene}"
        npz = folder / f"{v}.npz"
        try:
            with np.load(npz, allow_pickle=False) as d:
                missing = [k for k in ("depth", "instances_semantic") if k not in d.files]
                if missing:
                    raise self._bad(f"{npz} lacks the keys {missing} (has {d.files}).")
                depth_cm = np.asarray(d["depth"], dtype=np.float64)
                sem = np.asarray(d["instances_semantic"])
        except (OSError, ValueError, EOFError) as exc:
            raise self._bad(f"{npz} is not a readable .npz archive ({exc}).") from exc
        if depth_cm.ndim == 3 and depth_cm.shape[-1] == 1:
            depth_cm = depth_cm[..., 0]
        if depth_cm.ndim != 2:
            raise self._bad(f"{npz}: depth of shape {depth_cm.shape}, expected H×W.")
        Hs, Ws = depth_cm.shape
        if sem.shape != (Hs, Ws):
            raise self._bad(
                f"{npz}: instances_semantic of shape {sem.shape}, expected {(Hs, Ws)} like depth."
            )
        sem = sem.astype(np.int64)
        if sem.size and (sem.min() < 0 or sem.max() >= METAGRASPNET_NUM_CLASSES):
            raise self._bad(
                f"{npz}: instances_semantic values in [{sem.min()}, {sem.max()}], "
                f"expected 0..{METAGRASPNET_NUM_CLASSES - 1}."
            )
        rgb_path = folder / f"{v}_rgb.png"
        try:
            with Image.open(rgb_path) as im:
                rgb = im.convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise self._bad(f"{rgb_path} is missing or unreadable ({exc}).") from exc
        if rgb.size != (Ws, Hs):
            raise self._bad(
                f"{rgb_path} is {rgb.size[0]}×{rgb.size[1]} (W×H) but the depth map is {Ws}×{Hs}."
            )

        if self.intrinsics is not None:
            fx, fy, cx, cy = self.intrinsics
        else:
            cam = folder / f"{v}_camera_params.json"
            fx, fy, cx, cy = (
                read_camera_params(cam, Ws, Hs, self.root) if cam.is_file() else default_intrinsics(Ws, Hs)
            )

        H, W = self.size
        rows, cols = _nearest_index(H, Hs), _nearest_index(W, Ws)
        depth_m = depth_cm[np.ix_(rows, cols)] / 100.0
        valid = np.isfinite(depth_m) & (depth_m > 0)
        depth_m = np.where(valid, depth_m, 0.0)
        normal = normals_from_depth(
            depth_m, fx, fy, cx, cy, u=cols.astype(np.float64), v=rows.astype(np.float64)
        )
        seg = sem[np.ix_(rows, cols)]
        img = rgb.resize((W, H), resample=Image.Resampling.BILINEAR) if (Ws, Hs) != (W, H) else rgb
        x = torch.from_numpy(
            np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        )
        return {
            "input": x,
            "targets": {
                "segmentation": torch.from_numpy(np.ascontiguousarray(seg)),
                "depth": torch.from_numpy(depth_m.astype(np.float32))[None],
                "normal": torch.from_numpy(np.ascontiguousarray(normal.transpose(2, 0, 1))),
            },
        }


def make_metagraspnet_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    size: Sequence[int] = (256, 256),
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    intrinsics: Sequence[float] | None = None,
) -> dict[str, MetaGraspNetDataset]:
    """MetaGraspNet → ``{"train", "val", "test"}``, split by scene (no scene in two splits).

    MetaGraspNet has no official split: the scene numbers are permuted with
    ``default_rng(split_seed)`` and cut into test (``test_fraction``, 10 %), val
    (``val_fraction``, 10 %) and train (the rest, 80 %); every split gets at least one scene.
    Splitting by scene keeps the up to ~40 viewpoints of one bin out of the other splits.
    ``seed`` (the run seed) does not change the data.
    """
    del seed
    if root is None:
        raise ConfigurationError(
            f"MetaGraspNet needs root=<folder holding scene{{N}}/>.\n{METAGRASPNET_LAYOUT}"
        )
    scenes = find_views(root)
    ids = np.array(sorted(scenes))
    if len(ids) < 3:
        raise layout_error(
            "MetaGraspNet",
            root,
            f"found {len(ids)} scene(s); at least 3 are needed to split scenes into train/val/test.",
            METAGRASPNET_LAYOUT,
            _FIX,
        )
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ConfigurationError(
            f"need 0 < val_fraction, test_fraction and a sum < 1; got {val_fraction}, {test_fraction}"
        )
    perm = ids[np.random.default_rng(split_seed).permutation(len(ids))]
    n_test = max(1, int(round(len(ids) * test_fraction)))
    n_val = max(1, int(round(len(ids) * val_fraction)))
    if n_test + n_val >= len(ids):
        n_test, n_val = 1, 1
    parts = {
        "test": sorted(perm[:n_test].tolist()),
        "val": sorted(perm[n_test : n_test + n_val].tolist()),
        "train": sorted(perm[n_test + n_val :].tolist()),
    }
    return {
        split: MetaGraspNetDataset(
            root, [(s, v) for s in sc for v in scenes[s]], size=size, intrinsics=intrinsics
        )
        for split, sc in (("train", parts["train"]), ("val", parts["val"]), ("test", parts["test"]))
    }
