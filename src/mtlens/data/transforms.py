"""Train-time augmentations of the dense benchmarks and the image pipeline of the Office benchmarks.

Randomness comes from torch's global generator, which ``torch.manual_seed`` seeds in the main
process and DataLoader seeds per worker, so a seeded run sees the same augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

#: ImageNet channel statistics (torchvision's pretrained-weights convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Scales of the random scale crop used by MTAN (arXiv:1803.10704), CAGrad, Nash-MTL, FAMO, LibMTL.
PAPER_SCALES = (1.0, 1.2, 1.5)


def random_scale_crop(
    image: Tensor, targets: dict[str, Tensor], kinds: dict[str, str], scales: Sequence[float] = PAPER_SCALES
) -> tuple[Tensor, dict[str, Tensor]]:
    """Crop a random window of size ``(H/s, W/s)`` and resize it back to ``(H, W)``.

    The protocol of MTAN (arXiv:1803.10704) and its successors: ``s`` drawn uniformly from
    ``scales`` (default 1.0/1.2/1.5); the image is resized bilinearly (align_corners=True);
    segmentation labels and depth with nearest neighbour, and depth is divided by ``s`` (zooming in
    by ``s`` is moving the camera ``s`` times closer). Normals are resized with nearest neighbour
    too (MTAN uses bilinear): that keeps them unit length and keeps the invalid (all-zero) mask exact.

    ``image``: C×H×W; ``targets[t]``: H×W (segmentation) or C×H×W; ``kinds[t]`` in
    {"segmentation", "depth", "normal"}.
    """
    H, W = image.shape[-2:]
    s = float(scales[int(torch.randint(len(scales), (1,)))])
    h, w = int(H / s), int(W / s)
    i = int(torch.randint(H - h + 1, (1,)))
    j = int(torch.randint(W - w + 1, (1,)))
    img = F.interpolate(
        image[None, :, i : i + h, j : j + w], size=(H, W), mode="bilinear", align_corners=True
    )[0]
    out: dict[str, Tensor] = {}
    for t, y in targets.items():
        kind = kinds[t]
        if kind == "segmentation":
            crop = y[None, None, i : i + h, j : j + w].float()
            out[t] = F.interpolate(crop, size=(H, W), mode="nearest")[0, 0].to(y.dtype)
        elif kind == "depth":
            out[t] = F.interpolate(y[None, :, i : i + h, j : j + w], size=(H, W), mode="nearest")[0] / s
        elif kind == "normal":
            out[t] = F.interpolate(y[None, :, i : i + h, j : j + w], size=(H, W), mode="nearest")[0]
        else:  # pragma: no cover - guarded by the datasets
            raise ValueError(f"unknown dense target kind {kind!r}")
    return img, out


def random_hflip(
    image: Tensor, targets: dict[str, Tensor], kinds: dict[str, str], p: float = 0.5
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flip image and targets left-right with probability ``p``; a normal's x component is negated."""
    if float(torch.rand(1)) >= p:
        return image, targets
    out = {}
    for t, y in targets.items():
        f = torch.flip(y, dims=[-1])
        if kinds[t] == "normal":
            f = f.clone()
            f[0] = -f[0]
        out[t] = f
    return torch.flip(image, dims=[-1]), out


def pil_to_tensor(img: Image.Image) -> Tensor:
    """A PIL RGB image as a float32 3×H×W tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize_imagenet(x: Tensor) -> Tensor:
    """Subtract the ImageNet mean and divide by its std, channel-wise (3×H×W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """A random crop box ``(left, top, right, bottom)``: ``scale`` of the area, aspect in ``ratio``.

    The sampling of Inception-style random resized crops (as torchvision's RandomResizedCrop): area
    fraction uniform in ``scale``, log-aspect uniform in ``log(ratio)``, ten tries, then the
    centred full image.
    """
    area = width * height
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        log_r = float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])))
        r = math.exp(log_r)
        w = math.sqrt(target * r)
        h = math.sqrt(target / r)
        if 0 < w <= width and 0 < h <= height:
            left = float(torch.empty(1).uniform_(0, width - w))
            top = float(torch.empty(1).uniform_(0, height - h))
            return left, top, left + w, top + h
    return 0.0, 0.0, float(width), float(height)
