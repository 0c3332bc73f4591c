"""Synthetic dense scenes (ours): ray-cast spheres, boxes and cylinders on a floor before a wall.

THIS DATA IS SYNTHETIC. It exists so that a dense multi-task problem (segmentation, depth,
surface normals, the NYUv2 task set) runs anywhere, offline, with *exact* per-pixel ground truth:
every pixel's class, depth and normal come from the analytic ray–surface intersection that also
shades its colour. It is not a substitute for NYUv2 / Cityscapes results.

Scene: a pinhole camera at the origin (OpenCV frame: x right, y down, z forward) pitched down by
5-20°, a floor plane ``y = floor_y`` with a two-colour checkerboard, a back wall ``z = wall_z``,
and 2-5 objects resting on the floor (spheres, boxes rotated about the vertical axis, vertical
cylinders with caps) with random colours. Shading is Lambertian from one directional light plus
ambient (no shadows), with optional Gaussian pixel noise. Classes: 0 wall, 1 floor, 2 sphere,
3 box, 4 cylinder. Every ray hits the wall, so every pixel has a valid depth and normal.

Depth is the z coordinate in the camera frame (as NYUv2's), normals are unit vectors in the
camera frame facing the camera (as :mod:`mtlens.data.geometry`). Deterministic: sample ``i`` of a
split is rendered from ``numpy.random.default_rng([data_seed, split code, i])``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigurationError

SYNTHETIC_CLASSES = ("wall", "floor", "sphere", "box", "cylinder")
_EPS = 1e-6


@dataclass(frozen=True)
class Sphere:
    """A sphere (world frame): ``center`` (3,), ``radius``, RGB ``color`` in [0, 1]."""

    center: tuple[float, float, float]
    radius: float
    color: tuple[float, float, float] = (0.8, 0.2, 0.2)
    label: int = 2


@dataclass(frozen=True)
class Box:
    """A box of ``half_extents`` (x, y, z) centred at ``center``, rotated by ``yaw`` rad about the y axis."""

    center: tuple[float, float, float]
    half_extents: tuple[float, float, float]
    yaw: float = 0.0
    color: tuple[float, float, float] = (0.2, 0.8, 0.2)
    label: int = 3


@dataclass(frozen=True)
class Cylinder:
    """A vertical (y-axis) cylinder with flat caps: ``center``, ``radius``, ``half_height``."""

    center: tuple[float, float, float]
    radius: float
    half_height: float
    color: tuple[float, float, float] = (0.2, 0.2, 0.8)
    label: int = 4


@dataclass(frozen=True)
class Scene:
    """Everything :func:`render` needs; build one by hand or with :func:`random_scene`."""

    objects: tuple = ()
    floor_y: float = 1.2
    wall_z: float = 10.0
    pitch: float = 0.2
    light: tuple[float, float, float] = (0.3, -1.0, -0.5)
    floor_colors: tuple = ((0.75, 0.75, 0.7), (0.35, 0.35, 0.4))
    wall_color: tuple[float, float, float] = (0.6, 0.65, 0.8)
    tile: float = 1.0
    fov_deg: float = 60.0
    extra: dict = field(default_factory=dict, compare=False)


def intrinsics(size: tuple[int, int], fov_deg: float = 60.0) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` of the renderer's camera: horizontal field of view ``fov_deg``, square pixels.

    Pixel ``(row v, column u)`` is the ray through image point ``(u, v)``; ``cx = (W-1)/2``,
    ``cy = (H-1)/2`` (the convention of :func:`mtlens.data.geometry.backproject`).
    """
    H, W = size
    f = (W / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return f, f, (W - 1) / 2.0, (H - 1) / 2.0


def camera_rotation(pitch: float) -> np.ndarray:
    """World-from-camera rotation of a camera pitched down by ``pitch`` rad (about the x axis)."""
    c, s = math.cos(pitch), math.sin(pitch)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _plane(D: np.ndarray, axis: int, value: float, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = value / D[:, axis]
    t = np.where((D[:, axis] * np.sign(value) > 0) & (t > _EPS), t, np.inf)
    return t, np.broadcast_to(normal, D.shape)


def _sphere(D: np.ndarray, s: Sphere) -> tuple[np.ndarray, np.ndarray]:
    C = np.asarray(s.center, dtype=np.float64)
    a = np.einsum("ij,ij->i", D, D)
    b = D @ C
    c = C @ C - s.radius**2
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0 = (b - sq) / a
    t1 = (b + sq) / a
    t = np.where(t0 > _EPS, t0, t1)
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    P = D * np.where(np.isfinite(t), t, 0.0)[:, None]
    return t, (P - C) / s.radius


def _box(D: np.ndarray, b: Box) -> tuple[np.ndarray, np.ndarray]:
    C = np.asarray(b.center, dtype=np.float64)
    h = np.asarray(b.half_extents, dtype=np.float64)
    R = _rot_y(b.yaw)  # local -> world
    o = R.T @ (-C)
    d = D @ R  # rows: R^T d
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (-h - o) * inv
        t2 = (h - o) * inv
    tn = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf)
    tf = np.nan_to_num(np.maximum(t1, t2), nan=np.inf)
    tmin = tn.max(axis=1)
    tmax = tf.min(axis=1)
    hit = (tmax >= tmin) & (tmin > _EPS)
    t = np.where(hit, tmin, np.inf)
    k = tn.argmax(axis=1)
    nl = np.zeros_like(D)
    nl[np.arange(len(D)), k] = -np.sign(d[np.arange(len(D)), k])
    return t, nl @ R.T


def _cylinder(D: np.ndarray, cy: Cylinder) -> tuple[np.ndarray, np.ndarray]:
    C = np.asarray(cy.center, dtype=np.float64)
    o = -C
    dx, dy, dz = D[:, 0], D[:, 1], D[:, 2]
    a = dx * dx + dz * dz
    b = 2.0 * (o[0] * dx + o[2] * dz)
    c = o[0] ** 2 + o[2] ** 2 - cy.radius**2
    disc = b * b - 4 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    ys = o[1] + ts * dy
    side_ok = (disc >= 0) & (a > 0) & (ts > _EPS) & (np.abs(ys) <= cy.half_height)
    t_side = np.where(side_ok, ts, np.inf)
    best_t = t_side
    nx = np.where(side_ok, (o[0] + ts * dx) / cy.radius, 0.0)
    nz = np.where(side_ok, (o[2] + ts * dz) / cy.radius, 0.0)
    normal = np.stack([nx, np.zeros_like(nx), nz], axis=1)
    for sign in (-1.0, 1.0):
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (sign * cy.half_height - o[1]) / dy
        px = o[0] + tc * dx
        pz = o[2] + tc * dz
        ok = np.isfinite(tc) & (tc > _EPS) & (px * px + pz * pz <= cy.radius**2) & (tc < best_t)
        best_t = np.where(ok, tc, best_t)
        normal[ok] = (0.0, sign, 0.0)
    return best_t, normal


def _intersect(D: np.ndarray, obj: Sphere | Box | Cylinder) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(obj, Sphere):
        return _sphere(D, obj)
    if isinstance(obj, Box):
        return _box(D, obj)
    if isinstance(obj, Cylinder):
        return _cylinder(D, obj)
    raise ConfigurationError(f"unknown scene object {obj!r}")


def render(
    scene: Scene, size: tuple[int, int] = (64, 64), noise: float = 0.0, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Ray-cast ``scene``: ``{"image" H×W×3 float32 [0,1], "segmentation" H×W int64, "depth" H×W float32,
    "normal" H×W×3 float32, "points" H×W×3 float64 (world-frame hit points)}``.

    One ray per pixel centre; the nearest intersection gives class, depth and normal exactly.
    ``noise`` > 0 adds N(0, noise²) to the image (needs ``rng``).
    """
    H, W = size
    fx, fy, cx, cy = intrinsics(size, scene.fov_deg)
    u = np.arange(W, dtype=np.float64)
    v = np.arange(H, dtype=np.float64)
    d_cam = np.stack(
        np.broadcast_arrays((u[None, :] - cx) / fx, (v[:, None] - cy) / fy, np.ones((H, W))), axis=-1
    )
    d_cam = d_cam.reshape(-1, 3)
    Rw = camera_rotation(scene.pitch)
    D = d_cam @ Rw.T  # world directions; |D| = |d_cam| and t is the camera-frame z-depth
    surfaces = [
        (0, None, *_plane(D, 2, scene.wall_z, np.array([0.0, 0.0, -1.0]))),
        (1, None, *_plane(D, 1, scene.floor_y, np.array([0.0, -1.0, 0.0]))),
        *((obj.label, obj, *_intersect(D, obj)) for obj in scene.objects),
    ]
    T = np.stack([s[2] for s in surfaces])
    k = T.argmin(axis=0)
    n_pix = np.arange(D.shape[0])
    t = T[k, n_pix]
    if not np.all(np.isfinite(t)):
        raise ConfigurationError("some camera rays hit nothing: the wall must be in front of the camera")
    normals = np.stack([np.asarray(s[3], dtype=np.float64) for s in surfaces])[k, n_pix]
    labels = np.array([s[0] for s in surfaces], dtype=np.int64)[k]
    P = D * t[:, None]

    # Shading: per-surface albedo (checkerboard on the floor), Lambert + ambient.
    colors = np.array([scene.wall_color, scene.floor_colors[0]] + [o.color for o in scene.objects], float)
    albedo = colors[k]
    floor = k == 1
    checker = ((np.floor(P[floor, 0] / scene.tile) + np.floor(P[floor, 2] / scene.tile)) % 2).astype(int)
    albedo[floor] = np.asarray(scene.floor_colors, dtype=np.float64)[checker]
    light = np.asarray(scene.light, dtype=np.float64)
    light = light / np.linalg.norm(light)
    lam = np.clip(normals @ light, 0.0, None)
    img = albedo * (0.3 + 0.7 * lam[:, None])
    img = img.reshape(H, W, 3)
    if noise > 0:
        if rng is None:
            raise ConfigurationError("render(noise > 0) needs rng=numpy.random.Generator")
        img = img + rng.normal(0.0, noise, size=img.shape)
    n_cam = normals @ Rw  # rows: R^T n (world -> camera)
    return {
        "image": np.clip(img, 0.0, 1.0).astype(np.float32),
        "segmentation": labels.reshape(H, W),
        "depth": t.reshape(H, W).astype(np.float32),
        "normal": n_cam.reshape(H, W, 3).astype(np.float32),
        "points": P.reshape(H, W, 3),
    }


def random_scene(rng: np.random.Generator, fov_deg: float = 60.0) -> Scene:
    """A random scene: camera pitch 5-20°, floor 1.0-1.6 below the camera, wall 9-12 ahead, 2-5 objects.

    Objects (class drawn uniformly among sphere / box / cylinder, random colour) stand on the
    floor at depth 3.5-7.5 inside the horizontal field of view, with non-overlapping footprints
    (rejection sampling, 50 tries per object).
    """
    floor_y = float(rng.uniform(1.0, 1.6))
    wall_z = float(rng.uniform(9.0, 12.0))
    pitch = math.radians(float(rng.uniform(5.0, 20.0)))
    half_tan = math.tan(math.radians(fov_deg) / 2.0)
    n_obj = int(rng.integers(2, 6))
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(n_obj):
        kind = int(rng.integers(0, 3))
        color = _rgb(rng.uniform(0.1, 0.95, size=3))
        obj: Sphere | Box | Cylinder
        for _try in range(50):
            z = float(rng.uniform(3.5, 7.5))
            x = float(rng.uniform(-0.7, 0.7) * z * half_tan)
            if kind == 0:
                r = float(rng.uniform(0.4, 0.9))
                obj, foot = Sphere((x, floor_y - r, z), r, color), r
            elif kind == 1:
                hx, hy, hz = (float(a) for a in rng.uniform(0.3, 0.8, size=3))
                obj = Box((x, floor_y - hy, z), (hx, hy, hz), float(rng.uniform(0, math.pi / 2)), color)
                foot = math.hypot(hx, hz)
            else:
                r, hh = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.4, 1.0))
                obj, foot = Cylinder((x, floor_y - hh, z), r, hh, color), r
            if all(math.hypot(x - px, z - pz) > foot + pf for px, pz, pf in placed):
                placed.append((x, z, foot))
                objects.append(obj)
                break
    light = (float(rng.uniform(-0.6, 0.6)), -1.0, float(rng.uniform(-0.8, -0.2)))
    g1, g2 = rng.uniform(0.55, 0.85), rng.uniform(0.2, 0.45)
    return Scene(
        objects=tuple(objects),
        floor_y=floor_y,
        wall_z=wall_z,
        pitch=pitch,
        light=light,
        floor_colors=((g1, g1, g1 * 0.95), (g2, g2, g2 * 1.1)),
        wall_color=_rgb(rng.uniform(0.4, 0.9, size=3)),
        tile=float(rng.uniform(0.6, 1.2)),
        fov_deg=fov_deg,
    )


def _rgb(c: np.ndarray) -> tuple[float, float, float]:
    return float(c[0]), float(c[1]), float(c[2])


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticScenesDataset(Dataset):
    """``n`` rendered scenes of one split: ``{"input": 3×H×W, "targets": {segmentation, depth, normal}}``.

    Targets: segmentation H×W int64 (5 classes, :data:`SYNTHETIC_CLASSES`), depth 1×H×W, normal
    3×H×W. Scenes render on first access (about a millisecond at 64×64) and stay cached.
    """

    def __init__(
        self,
        n: int,
        split: str = "train",
        *,
        size: Sequence[int] = (64, 64),
        data_seed: int = 0,
        noise: float = 0.01,
        cache: bool = True,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ConfigurationError(f"split must be one of {list(_SPLIT_CODES)}, got {split!r}")
        if n < 1:
            raise ConfigurationError(f"need at least one scene, got n={n}")
        self.n = int(n)
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.data_seed = int(data_seed)
        self.noise = float(noise)
        self.cache = cache
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.n

    def scene(self, idx: int) -> tuple[Scene, np.random.Generator]:
        """The scene of sample ``idx`` and the generator that then draws its pixel noise."""
        rng = np.random.default_rng([self.data_seed, _SPLIT_CODES[self.split], int(idx)])
        return random_scene(rng), rng

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.n:
            raise IndexError(idx)
        if idx in self._cache:
            return self._cache[idx]
        scene, rng = self.scene(idx)
        r = render(scene, self.size, noise=self.noise, rng=rng)
        sample = {
            "input": torch.from_numpy(np.ascontiguousarray(r["image"].transpose(2, 0, 1))),
            "targets": {
                "segmentation": torch.from_numpy(r["segmentation"]),
                "depth": torch.from_numpy(r["depth"])[None],
                "normal": torch.from_numpy(np.ascontiguousarray(r["normal"].transpose(2, 0, 1))),
            },
        }
        if self.cache:
            self._cache[idx] = sample
        return sample


def make_synthetic_scenes_datasets(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 500,
    size: int | Sequence[int] = (64, 64),
    data_seed: int = 0,
    noise: float = 0.01,
) -> dict[str, SyntheticScenesDataset]:
    """Synthetic dense scenes (ours) → ``{"train", "val", "test"}`` of 2000 / 200 / 500 scenes at 64×64.

    ``root`` is unused (nothing is read). Splits are disjoint by construction (separate seed
    streams). ``seed`` (the run seed) does not change the data; ``data_seed`` does.
    """
    del root, seed
    H, W = (size, size) if isinstance(size, int) else size
    return {
        split: SyntheticScenesDataset(n, split, size=(H, W), data_seed=data_seed, noise=noise)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test))
    }
