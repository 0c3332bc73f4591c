"""Dynamic Weight Average (DWA): weights from the ratio of the last two epoch-mean losses."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, LossWeighting
from ..errors import ConfigurationError
from ._calls import EpochCalls
from ._loss_common import TaskCount, as_vector, check_int, check_num_tasks
from ._registry import register
from ._utils import positive


@register
class DWA(LossWeighting):
    """Dynamic Weight Average: ``w = T·softmax(r / temperature)``, ``r_t = L̄_t(e-1) / L̄_t(e-2)``.

    Reference: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
    arXiv:1803.10704 (Eq. 7). ``L̄_t(e)`` is task t's mean training loss over epoch ``e``; the
    caller reports it with :meth:`on_epoch_end` once per epoch (the method reads no trainer
    state). During the first two epochs (fewer than two reports) every weight is 1.

    ``steps_per_epoch`` (optional, the number of weighting calls per epoch, e.g. ``len(loader)``)
    lets DWA check that :meth:`on_epoch_end` is called: more than one call beyond an epoch
    without it raises :class:`~mtlens.errors.ConfigurationError`. Without it the epoch length is
    learnt from the first report, and the first weighting call warns once that the method needs
    the epoch boundaries.

    Defaults: ``temperature = 2.0`` (paper and the MTAN code).
    """

    name = "dwa"
    reference = "Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019, arXiv:1803.10704"
    defaults_source = "temperature 2 (paper Sec. 3.3, MTAN code)"
    stateful = True
    state_attrs = ("_history", "_epochs", "_tasks", "_calls")
    user_calls = ("on_epoch_end",)

    claims = {
        "permutation_invariant": SYMMETRIC,
        "weights_total": Claim("Liu et al., CVPR 2019, Eq. 7: T·softmax(r/τ)", total="T"),
    }

    def __init__(self, temperature: float = 2.0, num_tasks: int | None = None, steps_per_epoch: int | None = None):
        self.temperature = positive("temperature", temperature, "dwa")
        check_num_tasks(num_tasks, "dwa")
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 1, "dwa")
        self._calls = EpochCalls("dwa", steps_per_epoch, "weights the tasks by their epoch-mean losses and stays at "
                                                          "equal weights until two epochs have been reported")
        self._tasks = TaskCount("dwa", num_tasks)
        self._history: list[Tensor] = []  # the last two epoch-mean loss vectors (float64, CPU)
        self._epochs = 0

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        v = as_vector(mean_losses, "dwa", "mean_losses").to("cpu", torch.float64)
        self._tasks.bind(v.shape[0])
        if bool((v <= 0).any()):
            raise ConfigurationError(
                f"dwa: epoch-mean losses must be positive (they are divided by), got {v.tolist()}; "
                "DWA is defined for non-negative losses with a non-zero mean"
            )
        self._history = (self._history + [v])[-2:]
        self._epochs += 1
        self._calls.epoch_ended()

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        self._calls.weighting_call()
        T = self._tasks.bind(losses.shape[0])
        if len(self._history) < 2:
            return torch.ones(T, dtype=losses.dtype, device=losses.device)
        ratio = self._history[1] / self._history[0]
        w = T * torch.softmax(ratio / self.temperature, dim=0)
        return w.to(device=losses.device, dtype=losses.dtype)

    def log_values(self) -> dict[str, float]:
        return {"epochs_seen": float(self._epochs)}
