"""GO4Align: group-wise alignment of the task weights from the tasks' risk history."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import LossWeighting
from ..errors import NonFiniteError
from ._loss_common import TaskCount, check_int, check_num_tasks
from ._registry import register
from ._utils import positive


def kmeans_1d(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Globally optimal k-means of the values ``x`` (n,) into ``min(k, #distinct)`` groups.

    In one dimension the optimal clusters are contiguous in sorted order, so dynamic
    programming over split points finds the exact minimum of the within-group sum of squares
    (O(k n²); n is the number of tasks). Returns ``(labels (n,), centres (k',))``, centres in
    increasing order. Ties between equal-cost splits go to the earliest split.
    """
    n = x.shape[0]
    k = max(1, min(k, len(np.unique(x))))
    order = np.argsort(x, kind="stable")
    v = x[order]
    c1 = np.concatenate([[0.0], np.cumsum(v)])
    c2 = np.concatenate([[0.0], np.cumsum(v * v)])

    def sse(i: int, j: int) -> float:  # values v[i:j]
        s = c1[j] - c1[i]
        return float(c2[j] - c2[i] - s * s / (j - i))

    cost = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):
                c = cost[g - 1, i] + sse(i, j)
                if c < cost[g, j] - 1e-15 * abs(c):
                    cost[g, j], arg[g, j] = c, i
    bounds = [n]
    for g in range(k, 0, -1):
        bounds.append(int(arg[g, bounds[-1]]))
    bounds = bounds[::-1]
    labels_sorted = np.zeros(n, dtype=np.int64)
    centres = np.zeros(k)
    for g in range(k):
        i, j = bounds[g], bounds[g + 1]
        labels_sorted[i:j] = g
        centres[g] = v[i:j].mean()
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return labels, centres


@register
class GO4Align(LossWeighting):
    """GO4Align: task weights from the risk history, aligned within groups of similar tasks.

    Reference: Shen, Wang, Zhao, Wang, Tan & Zhen, "GO4Align: Group Optimization for Multi-Task
    Alignment", NeurIPS 2024, arXiv:2404.06486. At every step, with the detached losses L:

    1. scale ``σ_t = Σ_s L_s / L_t`` (tasks with small current risk are scaled up);
    2. risk history ``p ← p ⊙ exp(−η L)``, ``p ← p / Σp`` (``p`` starts uniform; a group-DRO
       style exponentiated update with step η);
    3. ``γ_t = σ_t p_t``; the tasks are grouped by k-means on γ into ``num_groups`` groups and
       every task's weight is its group's mean γ (one group: the mean of γ for every task).

    The objective is ``Σ_t w_t L_t``. This follows the authors' code (``GO4ALIGN`` in
    ``methods/cluster_methods.py`` of github.com/autumn9999/GO4Align; the NTKMTL authors' copy in
    github.com/jianke0604/NTKMTL is the same), with one difference: they cluster with a local
    k-means search (``kmeans_pytorch`` with random initial centres; the NTKMTL copy uses
    scikit-learn's ``KMeans(random_state=42)``), we use the exact 1-D k-means of
    :func:`kmeans_1d` (the global optimum, deterministic and dependency-free); they agree
    whenever the local search finds the optimum. When fewer distinct γ values than
    ``num_groups`` exist (e.g. 2 tasks and 5 groups) every distinct value is its own group
    (k-means with more centres than points is undefined; the libraries raise), which leaves γ
    unchanged.

    Hyper-parameters (defaults): ``num_groups=1`` and ``robust_step_size=1e-4`` (η) — the
    defaults of the authors' NYUv2 trainer (``experiments/nyuv2/trainer.py``, run by their README
    as ``python trainer.py --method go4align``); with one group every task gets the mean of γ,
    so the grouping itself needs ``num_groups ≥ 2`` (the NTKMTL authors' copy defaults to 5, for
    many-task benchmarks such as CelebA's 40 tasks); ``num_tasks`` (None: inferred at the first
    call). A zero or negative loss has no scale ``ΣL/L_t``: NonFiniteError. The history p is in
    :meth:`state_dict`.
    """

    name = "go4align"
    p: Tensor | None  # buffer
    reference = "Shen et al., GO4Align: Group Optimization for Multi-Task Alignment, NeurIPS 2024, arXiv:2404.06486"
    defaults_source = "num_groups = 1, robust_step_size = 1e-4 (authors' NYUv2 trainer, github.com/autumn9999/GO4Align)"
    stateful = True
    state_attrs = ("_tasks",)
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "its scales Σ_s L_s / L_t and risk history need positive losses, and log-transformed losses "
        "log(L_t + 1e-8) are negative whenever L_t < 1"
    )

    def __init__(self, num_groups: int = 1, robust_step_size: float = 1e-4, num_tasks: int | None = None) -> None:
        self.num_groups = check_int("num_groups", num_groups, 1, self.name)
        self.robust_step_size = positive("robust_step_size", robust_step_size, self.name)
        self._tasks = TaskCount(self.name, check_num_tasks(num_tasks, self.name))
        self.register_buffer("p", None)  # the group-DRO distribution p (T,), float64
        self._log: dict[str, float] = {}

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        L = losses.detach().to("cpu", torch.float64).reshape(-1).numpy()
        T = self._tasks.bind(L.shape[0])
        if not np.isfinite(L).all() or not (L > 0).all():
            raise NonFiniteError(f"go4align: the scale Σ L / L_t needs positive finite losses, got {L.tolist()}")
        if self.p is None:
            self.p = torch.full((T,), 1.0 / T, dtype=torch.float64)
        scale = L.sum() / L
        p = self.p.numpy() * np.exp(-self.robust_step_size * L)
        p = p / p.sum()
        self.p = torch.from_numpy(p)
        gamma = scale * p
        if self.num_groups == 1:
            w = np.full(T, gamma.mean())
            groups = 1
        else:
            labels, centres = kmeans_1d(gamma, self.num_groups)
            w = centres[labels]
            groups = len(centres)
        self._log = {"go4align/groups": float(groups)}
        return torch.as_tensor(w, dtype=losses.dtype, device=losses.device)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
