"""Zoo cases for the recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells,
see :mod:`modelbatch.layers.recurrent`): a sequence classifier and a hand-rolled cell loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.zoo.cases import Case

B, T = 3, 5


def _seq(g: torch.Generator) -> tuple[Tensor]:
    return (torch.randn(B, T, 4, generator=g, dtype=torch.float64),)


class SeqHead(nn.Module):
    """A recurrent encoder (batch_first) and a linear head on every output step."""

    def __init__(self, rnn: nn.Module, out_features: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(out_features, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


class CellLoop(nn.Module):
    """An LSTMCell, a GRUCell and an RNNCell unrolled by hand over the time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, 6)
        self.gru = nn.GRUCell(6, 5)
        self.rnn = nn.RNNCell(5, 4, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        h = c = x.new_zeros(x.shape[0], 6)
        g = x.new_zeros(x.shape[0], 5)
        r = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
            r = self.rnn(g, r)
        return r


CASES = [
    Case(
        "lstm_2layer_bidirectional",
        lambda: SeqHead(nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True), 12),
        _seq,
    ),
    Case(
        "lstm_proj_size",
        lambda: SeqHead(nn.LSTM(4, 6, proj_size=3, batch_first=True), 3),
        _seq,
        optimizer="adam",
    ),
    Case("gru_2layer", lambda: SeqHead(nn.GRU(4, 6, num_layers=2, batch_first=True), 6), _seq),
    Case(
        "rnn_relu_bidirectional",
        lambda: SeqHead(
            nn.RNN(4, 5, nonlinearity="relu", bidirectional=True, batch_first=True), 10
        ),
        _seq,
    ),
    Case("rnn_cells_unrolled", CellLoop, _seq),
]
