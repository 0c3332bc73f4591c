"""Graph encoders (PyTorch Geometric, optional extra ``mtlens[graph]``).

:class:`MPNNEncoder` is the QM9 model of the MTL-optimisation papers — Nash-MTL
(arXiv:2202.01017, ``experiments/quantum_chemistry/models.py``), FAMO and LibMTL
(``examples/qm9``) — which is PyTorch Geometric's ``examples/qm9_nn_conv.py`` rendering of the
MPNN of Gilmer et al. 2017 (arXiv:1704.01212): edge-network message passing (``NNConv``), a GRU
update, ``Set2Set`` readout.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError, require


class MPNNEncoder(nn.Module):
    """MPNN encoder: molecule graph → pooled embedding ``Z`` (B×``dim`` float32).

    Layers (Nash-MTL / LibMTL QM9 ``Net``; defaults are theirs):

    1. ``h⁰ = ReLU(Linear(in_channels → dim)(x))`` per atom;
    2. ``steps = 3`` times: ``m = ReLU(NNConv(h))`` with the edge network
       ``Linear(edge_dim → edge_hidden=128) → ReLU → Linear(→ dim·dim)`` and mean aggregation,
       then ``h = GRU(m, h)`` (one GRU cell shared across steps). The edge network runs once per
       forward and its per-edge matrices serve all steps (PyG's ``NNConv`` reruns it each step:
       identical outputs and gradients, a third of the dominant cost; the parameters and their
       state-dict names are NNConv's);
    3. ``Set2Set(dim, processing_steps=3)`` over each molecule's atoms → B×2·dim;
    4. ``Z = ReLU(Linear(2·dim → dim))`` — the shared representation the per-task linear heads
       read (``features=`` for the engine, Nash-MTL's ``return_representation``).

    Input: a ``torch_geometric.data.Batch`` with ``x`` (N×in_channels), ``edge_index``
    (2×E), ``edge_attr`` (E×edge_dim) and ``batch`` (N). Defaults ``in_channels = 11`` and
    ``edge_dim = 5`` are QM9's featurisation (:mod:`mtlens.data.qm9`).

    Raises :class:`~mtlens.errors.MissingDependencyError` (with ``pip install 'mtlens[graph]'``)
    when torch_geometric is missing, :class:`~mtlens.errors.ShapeError` on mismatched features.
    """

    def __init__(
        self,
        in_channels: int = 11,
        edge_dim: int = 5,
        dim: int = 64,
        steps: int = 3,
        edge_hidden: int = 128,
        set2set_steps: int = 3,
    ):
        super().__init__()
        pyg_nn = require("torch_geometric.nn", "graph", "the MPNN encoder")
        self.in_channels, self.edge_dim, self.dim, self.steps = int(in_channels), int(edge_dim), int(dim), int(steps)
        self.lin0 = nn.Linear(self.in_channels, self.dim)
        edge_net = nn.Sequential(
            nn.Linear(self.edge_dim, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, self.dim * self.dim)
        )
        self.conv = _nnconv_class(pyg_nn)(self.dim, self.dim, edge_net, aggr="mean")
        self.gru = nn.GRU(self.dim, self.dim)
        self.set2set = pyg_nn.aggr.Set2Set(self.dim, processing_steps=set2set_steps)
        self.lin1 = nn.Linear(2 * self.dim, self.dim)
        self.out_channels = self.dim

    def forward(self, data: Any) -> Tensor:
        x, edge_index, edge_attr = data.x, data.edge_index, data.edge_attr
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ShapeError(f"MPNNEncoder expects node features N×{self.in_channels}, got {tuple(x.shape)}")
        if edge_attr is None or edge_attr.dim() != 2 or edge_attr.shape[1] != self.edge_dim:
            got = None if edge_attr is None else tuple(edge_attr.shape)
            raise ShapeError(f"MPNNEncoder expects edge features E×{self.edge_dim}, got {got}")
        out = F.relu(self.lin0(x))
        h = out.unsqueeze(0)
        # The edge network's output depends on edge_attr only: computed once, used by every step
        # (PyG's NNConv recomputes it at each of the 3 steps; same function and gradient, 3x cheaper).
        weight = self.conv.nn(edge_attr).view(-1, self.dim, self.dim)
        for _ in range(self.steps):
            m = F.relu(self.conv(out, edge_index, weight))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        out = self.set2set(out, data.batch, dim_size=int(data.num_graphs))
        return F.relu(self.lin1(out))


_NNCONV_CLASS = None


def _nnconv_class(pyg_nn: Any) -> type:
    """``NNConv`` whose ``edge_attr`` argument is the precomputed per-edge weight (E×in×out)."""
    global _NNCONV_CLASS
    if _NNCONV_CLASS is None:
        import torch

        nnconv: Any = pyg_nn.NNConv

        class NNConvSharedWeights(nnconv):
            def message(self, x_j, edge_attr):
                return torch.matmul(x_j.unsqueeze(1), edge_attr).squeeze(1)

        _NNCONV_CLASS = NNConvSharedWeights
    return _NNCONV_CLASS
