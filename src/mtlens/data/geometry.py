"""Camera geometry: back-projection of a depth map and surface normals from depth.

Conventions (OpenCV pinhole camera): x right, y down, z forward (along the optical axis); depth is
the z coordinate of the surface point (not the ray length); pixel ``(row v, column u)`` has its
centre at image coordinates ``(u, v)``, so ``X = (u - cx) / fx · Z`` and ``Y = (v - cy) / fy · Z``.
Normals are unit vectors in that camera frame, oriented toward the camera (``n · P < 0``);
invalid pixels carry the zero vector, which is what the NYUv2 normal metrics mask out.
"""

from __future__ import annotations

import numpy as np


def backproject(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float,
                u: np.ndarray | None = None, v: np.ndarray | None = None) -> np.ndarray:
    """3-D points (H×W×3, camera frame) of a depth map (H×W, z-depth).

    ``u`` (W,) and ``v`` (H,) are the image coordinates of the columns and rows (default
    ``arange``); pass them when the depth map is a subsample of a larger image, with the
    intrinsics of that larger image.
    """
    H, W = depth.shape
    u = np.arange(W, dtype=np.float64) if u is None else np.asarray(u, dtype=np.float64)
    v = np.arange(H, dtype=np.float64) if v is None else np.asarray(v, dtype=np.float64)
    z = depth.astype(np.float64)
    x = (u[None, :] - cx) / fx * z
    y = (v[:, None] - cy) / fy * z
    return np.stack([x, y, z], axis=-1)


def _tangent(P: np.ndarray, valid: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Tangent along ``axis`` (1: columns, 0: rows) by finite differences of the 3-D points.

    Central difference where both neighbours are valid and the two one-sided depth steps agree,
    |Δz₊ − Δz₋| ≤ ½·max(|Δz₊|, |Δz₋|) + 0.005·z (a smooth surface; the 0.5 % of the depth term
    admits extrema such as a sphere's apex, where the steps have opposite signs); otherwise the
    one-sided difference with the smaller |Δz|, so that a pixel next to an occlusion boundary
    uses its own surface. Returns (tangent H×W×3, valid H×W).
    """
    fwd = np.zeros_like(P)
    bwd = np.zeros_like(P)
    fv = np.zeros(valid.shape, dtype=bool)
    bv = np.zeros(valid.shape, dtype=bool)
    if axis == 1:
        fwd[:, :-1] = P[:, 1:] - P[:, :-1]
        fv[:, :-1] = valid[:, 1:] & valid[:, :-1]
        bwd[:, 1:] = P[:, 1:] - P[:, :-1]
        bv[:, 1:] = fv[:, :-1]
    else:
        fwd[:-1] = P[1:] - P[:-1]
        fv[:-1] = valid[1:] & valid[:-1]
        bwd[1:] = P[1:] - P[:-1]
        bv[1:] = fv[:-1]
    zf, zb = fwd[..., 2], bwd[..., 2]
    tol = 0.5 * np.maximum(np.abs(zf), np.abs(zb)) + 0.005 * np.abs(P[..., 2])
    smooth = fv & bv & (np.abs(zf - zb) <= tol)
    use_f = fv & (~bv | (np.abs(zf) <= np.abs(zb)))
    t = np.where(use_f[..., None], fwd, bwd)
    t = np.where(smooth[..., None], 0.5 * (fwd + bwd), t)
    return t, fv | bv


def normals_from_depth(
    depth: np.ndarray, fx: float, fy: float, cx: float, cy: float,
    u: np.ndarray | None = None, v: np.ndarray | None = None, eps: float = 1e-12,
) -> np.ndarray:
    """Unit surface normals (H×W×3 float32, camera frame) computed from a z-depth map.

    1. back-project every pixel with the intrinsics (:func:`backproject`);
    2. tangents along the rows and columns by finite differences of the 3-D points: central on
       smooth surfaces, one-sided (the side with the smaller depth step) where the two sides
       disagree, so that a pixel at an occlusion edge uses its own surface (:func:`_tangent`);
    3. normal = cross product of the two tangents, normalised;
    4. oriented toward the camera: flipped where ``n · P > 0``.

    Pixels whose depth is 0 / non-finite, or that have no valid neighbour along a direction, or
    whose tangents are parallel, get the zero vector.
    """
    d = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    d = np.where(valid, d, 0.0)
    P = backproject(d, fx, fy, cx, cy, u, v)
    tu, vu = _tangent(P, valid, axis=1)
    tv, vv = _tangent(P, valid, axis=0)
    n = np.cross(tu, tv)
    norm = np.linalg.norm(n, axis=-1)
    ok = valid & vu & vv & (norm > eps)
    n = n / np.where(ok, norm, 1.0)[..., None]
    flip = np.sum(n * P, axis=-1) > 0
    n = np.where(flip[..., None], -n, n)
    n[~ok] = 0.0
    return n.astype(np.float32)
