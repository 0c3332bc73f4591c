"""QM9 (T = 11) as a timing workload: the papers' MPNN and one batch of real molecules.

For the performance benchmarks (``benchmarks/``): the same shape as their other workloads,
``(encoder, heads, params, forward)`` with ``forward() -> (Z, {task: loss})``, so a QM9 row times
the engine at T = 11 on a real model (Nash-MTL's "12.5× equal weighting per epoch" setting).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def qm9_workload(
    batch_size: int = 120,
    *,
    dim: int = 64,
    complete: bool = True,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    root: str | os.PathLike | None = None,
) -> tuple[nn.Module, nn.ModuleDict, list[nn.Parameter], Callable[[], tuple[torch.Tensor, dict[str, Any]]]]:
    """The QM9 step of Nash-MTL / FAMO / LibMTL: ``mpnn-qm9`` (width ``dim``) on ``batch_size`` molecules.

    The molecules are the first ``batch_size`` of the training split (a random sample of QM9,
    :func:`mtlens.data.qm9.qm9_split` with ``split_seed``), read from the qm9pack wheel (or
    ``root``) and featurised on the spot (a few seconds: the CSV files are scanned, only these
    molecules are processed) or taken from the processed cache when a QM9 run made it; targets
    standardised over the batch. Defaults are the papers'
    (batch 120, width 64, complete graphs with distances).

    Returns ``(encoder, heads, params, forward)``: ``forward()`` runs the encoder and the 11
    linear heads and returns ``(Z, {task: MSE loss})`` with ``Z`` the B×dim molecule embedding.

    Raises :class:`~mtlens.errors.DataError` / :class:`~mtlens.errors.MissingDependencyError`
    when qm9pack, rdkit or torch_geometric is missing (``pip install 'mtlens[graph]'``).
    """
    from .. import models
    from ..data.qm9 import N_MOLECULES, QM9_TASKS, QM9Dataset, load_qm9, process_csv, qm9_split, source_files

    rows = np.sort(qm9_split(N_MOLECULES, split_seed)["train"][:batch_size])
    full = load_qm9(root, process=False)  # the processed cache when a QM9 run made it
    if full is not None:
        store, positions = full, rows
    else:
        store, positions = process_csv(source_files(root), rows=rows.tolist()), np.arange(len(rows))
    y = store.y[torch.as_tensor(positions)]
    ds = QM9Dataset(store, positions, y.mean(0), y.std(0), complete=complete)
    batch = QM9Dataset.collate_fn([ds[i] for i in range(len(ds))])
    dev = torch.device(device)
    x = batch["input"].to(dev)
    targets = {t: v.to(dev) for t, v in batch["targets"].items()}
    model = models.create("mpnn-qm9", dict.fromkeys(QM9_TASKS, 1), dim=dim).to(dev)

    def forward():
        z = model.encode(x)
        return z, {t: F.mse_loss(model.heads[t](z).squeeze(1), targets[t]) for t in QM9_TASKS}

    return model.encoder, model.heads, list(model.parameters()), forward
