"""The MPNN encoder of the QM9 papers (PyTorch Geometric) and its preset."""

from __future__ import annotations

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")

from torch_geometric.data import Batch, Data  # noqa: E402
from torch_geometric.nn import NNConv  # noqa: E402

import mtlens.models.graph as graph  # noqa: E402
from mtlens.errors import MissingDependencyError, ShapeError  # noqa: E402
from mtlens.models import create  # noqa: E402
from mtlens.train.loaders import to_device  # noqa: E402


def _batch(sizes=(3, 5, 4), node_dim=11, edge_dim=5):
    graphs = []
    for n in sizes:
        r = torch.arange(n).repeat_interleave(n)
        c = torch.arange(n).repeat(n)
        keep = r != c
        ei = torch.stack([r[keep], c[keep]])
        graphs.append(Data(x=torch.randn(n, node_dim), edge_index=ei, edge_attr=torch.rand(ei.shape[1], edge_dim)))
    return Batch.from_data_list(graphs)


def test_mpnn_preset_shapes_heads_and_shared_parameters():
    m = create("mpnn-qm9", {"mu": 1, "alpha": 1}, in_channels=11, dim=16)
    b = _batch()
    z = m.encode(b)
    assert z.shape == (3, 16) and bool((z >= 0).all())  # ReLU(lin1(Set2Set)) per molecule
    out = m.decode(z)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"mu": (3, 1), "alpha": (3, 1)}
    assert m.forward(b)["mu"].shape == (3, 1)
    names = {n for n, _ in m.encoder.named_parameters()}
    assert {"lin0.weight", "conv.nn.0.weight", "conv.nn.2.weight", "gru.weight_hh_l0", "lin1.weight"} <= names
    assert m.feature_channels == 16


def test_shared_edge_weights_equal_pyg_nnconv_every_step():
    """Computing the edge network once equals PyG's NNConv recomputing it at each step (values and grads)."""
    torch.manual_seed(0)
    enc = graph.MPNNEncoder(dim=8, edge_hidden=16)
    ref_conv = NNConv(8, 8, enc.conv.nn, aggr="mean")
    ref_conv.load_state_dict(enc.conv.state_dict())
    b = _batch()

    def reference(data):
        import torch.nn.functional as F

        out = F.relu(enc.lin0(data.x))
        h = out.unsqueeze(0)
        for _ in range(3):
            m = F.relu(ref_conv(out, data.edge_index, data.edge_attr))
            out, h = enc.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        return F.relu(enc.lin1(enc.set2set(out, data.batch)))

    z = enc(b)
    g = torch.autograd.grad(z.square().sum(), list(enc.conv.nn.parameters()))
    z_ref = reference(b)
    g_ref = torch.autograd.grad(z_ref.square().sum(), list(enc.conv.nn.parameters()))
    assert torch.allclose(z, z_ref, atol=1e-6)
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(g, g_ref))


def test_shape_errors_and_missing_dependency(monkeypatch):
    enc = graph.MPNNEncoder(dim=8)
    with pytest.raises(ShapeError, match="node features N×11"):
        enc(_batch(node_dim=7))
    with pytest.raises(ShapeError, match="edge features E×5"):
        enc(_batch(edge_dim=4))

    def missing(module, extra, purpose):
        raise MissingDependencyError(f"{purpose} needs '{module}'. Install it with: pip install 'mtlens[{extra}]'")

    monkeypatch.setattr(graph, "require", missing)
    with pytest.raises(MissingDependencyError, match=r"mtlens\[graph\]"):
        create("mpnn-qm9", {"mu": 1})


def test_to_device_moves_pyg_batches():
    b = _batch()
    moved = to_device({"input": b, "targets": {"mu": torch.zeros(3)}}, torch.device("cpu"))
    assert isinstance(moved["input"], Batch) and moved["input"].num_graphs == 3
