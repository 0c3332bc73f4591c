"""A shim that must run before torchvision (and so timm) is imported; imported by :mod:`.backbones` only.

PyPI's torchvision wheels are CUDA builds; paired with a CPU-only torch their registration of
meta kernels fails with ``operator torchvision::nms does not exist``. Defining the two op
schemas first lets ``torchvision.models`` and ``torchvision.transforms`` import; the compiled
detection ops and ``torchvision.io`` stay unavailable (mtlens reads images with PIL).
Nothing is done when torch is a CUDA build or when torchvision already registered its ops. It
runs when :mod:`mtlens.models.backbones` (the one module that imports timm) is imported, never
on a bare ``import mtlens``; code importing torchvision itself on such a system calls
:func:`ensure_torchvision_importable` first.
"""

from __future__ import annotations

import torch

_LIB = None


def ensure_torchvision_importable() -> None:
    global _LIB
    if _LIB is not None or torch.version.cuda is not None:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # a matching torchvision build registered its ops already
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib


ensure_torchvision_importable()
