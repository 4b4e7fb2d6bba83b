"""Zoo cases from torch_geometric (the ``zoo`` extra): GCN, GAT, GraphSAGE and GIN on one
tiny shared graph (node features and edges shared by every model)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.zoo.cases import Case

CASES: list[Case] = []
SKIPPED: dict[str, str] = {}

try:
    import torch_geometric.nn as gnn
except ImportError as e:  # pragma: no cover - installed with the zoo extra
    SKIPPED["torch_geometric"] = f"torch_geometric is not installed: {e!r}"
    gnn = None

NODES = 7


def _graph(g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(NODES, 5, generator=g, dtype=torch.float64)
    src = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 2, 4])
    dst = torch.tensor([1, 2, 3, 4, 5, 6, 0, 3, 5, 1])
    return x, torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])


class GNN(nn.Module):
    def __init__(self, conv1: nn.Module, conv2: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv1, conv2

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)


if gnn is not None:
    CASES += [
        Case("pyg_gcn", lambda: GNN(gnn.GCNConv(5, 8), gnn.GCNConv(8, 3)), _graph),
        Case("pyg_gat", lambda: GNN(gnn.GATConv(5, 4, heads=2), gnn.GATConv(8, 3)), _graph),
        Case(
            "pyg_graphsage",
            lambda: GNN(gnn.SAGEConv(5, 8), gnn.SAGEConv(8, 3, aggr="max")),
            _graph,
            optimizer="adam",
        ),
        Case(
            "pyg_gin",
            lambda: GNN(gnn.GINConv(nn.Linear(5, 8), train_eps=True), gnn.GINConv(nn.Linear(8, 3))),
            _graph,
        ),
    ]
