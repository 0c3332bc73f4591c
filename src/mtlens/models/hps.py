"""Hard parameter sharing: encoder → Z → one head per task, with Z explicit for the engine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigurationError


class HPSModel(nn.Module):
    """Hard-parameter-sharing multi-task model.

    ``encode(x) -> Z`` (B×C×H×W for dense tasks, B×C for vector features);
    ``decode(z, tasks=None, out_size=None) -> {task: prediction}``; ``forward(x)`` does both and,
    for dense heads, resizes predictions to the input's spatial size.

    The engine needs ``Z`` and the encoder's parameters::

        z = model.encode(x)
        preds = model.decode(z, out_size=x.shape[-2:])
        record = mtl_backward(losses, features=z, shared_params=model.shared_parameters(), ...)
    """

    # Set by the preset builders (mtlens.models.create); absent on a model built by hand.
    preset: str
    feature_channels: int
    output_stride: int | None

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], dense: bool):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.dense = dense

    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor, tasks: Iterable[str] | None = None,
               out_size: Sequence[int] | None = None) -> dict[str, Tensor]:
        out = {}
        names = list(tasks) if tasks is not None else list(self.heads.keys())
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise ConfigurationError(f"no head for task(s) {unknown}; this model's tasks: {self.task_names}")
        for t in names:
            y = self.heads[t](z)
            if self.dense and out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
                y = F.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=False)
            out[t] = y
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x), out_size=x.shape[-2:] if self.dense else None)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self, task: str | None = None) -> list[nn.Parameter]:
        if task is None:
            return list(self.heads.parameters())
        return list(self.heads[task].parameters())
