"""Recurrent layers in a batch: each model equals the same module trained alone."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from modelbatch import ModelBatch
from modelbatch.layers.recurrent import VmapGRU, VmapLSTM, VmapLSTMCell
from modelbatch.optim import Adam
from tests.helpers import TOL, assert_close_models, rel_err

N = 3
T, B, F = 5, 2, 4  # time steps, samples, input features


class Seq(nn.Module):
    """A recurrent layer inside a model; returns ``(output, h_n[, c_n])``."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h0: Tensor | None = None, c0: Tensor | None = None) -> Any:
        self.rnn.flatten_parameters()  # what user code often does; a no-op in a batch
        hx = None if h0 is None else ((h0, c0) if c0 is not None else h0)
        out, state = self.rnn(x, hx)
        if isinstance(state, tuple):
            return out, state[0], state[1]
        return out, state


def _loss(outs: Any, weights: list[Tensor]) -> Tensor:
    """A fixed random projection of every output (so every output carries gradient)."""
    return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))  # type: ignore[return-value]


def _weights_like(outs: Any, seed: int = 7) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape[1:], generator=g, dtype=o.dtype) for o in outs]


def _check_training(
    make: Callable[[], nn.Module],
    inputs: tuple[Tensor, ...],
    dtype: torch.dtype = torch.float64,
    per_model: bool = False,
    steps: int = 3,
) -> None:
    """Outputs, final states, first gradients and parameters after ``steps`` Adam steps of
    a batch of N equal those of each model trained alone with ``torch.optim.Adam``."""
    torch.manual_seed(0)
    models = [make().to(dtype) for _ in range(N)]
    alone = [copy.deepcopy(m) for m in models]
    batch = ModelBatch(models)
    opt = Adam(batch, lr=0.05)
    outs = batch(*inputs, per_model=per_model)
    weights = _weights_like(outs)
    tol = TOL[dtype]
    ref_opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in alone]
    for step in range(steps):
        if step:
            outs = batch(*inputs, per_model=per_model)
        opt.zero_grad()
        _loss(outs, weights).backward()
        for i, (m, ref_opt) in enumerate(zip(alone, ref_opts, strict=True)):
            mine = tuple(x[i] for x in inputs) if per_model else inputs
            ref = m(*mine)
            for k, (o, r) in enumerate(zip(outs, ref, strict=True)):
                err = rel_err(o[i], r)
                assert err <= tol, f"step {step} model {i} output {k}: {err:.3g}"
            ref_opt.zero_grad()
            _loss(ref, weights).backward()
            if step == 0:
                grads = dict(batch.stacked.named_parameters())
                for name, p in m.named_parameters():
                    g = grads[name].grad
                    assert g is not None and p.grad is not None
                    err = rel_err(g[i], p.grad)
                    assert err <= tol, f"model {i} grad {name}: {err:.3g}"
            ref_opt.step()
        opt.step()
    assert_close_models(batch.extract_all(), alone, dtype, "after training")


CONFIGS: list[tuple[str, Callable[[], nn.RNNBase]]] = [
    (
        "lstm-2layer-bidir-batch_first",
        lambda: nn.LSTM(F, 6, 2, bidirectional=True, batch_first=True),
    ),
    ("lstm-proj", lambda: nn.LSTM(F, 6, 2, proj_size=3)),
    ("lstm-proj-bidir", lambda: nn.LSTM(F, 6, proj_size=3, bidirectional=True)),
    ("lstm-nobias", lambda: nn.LSTM(F, 6, bias=False)),
    ("gru-2layer-bidir", lambda: nn.GRU(F, 6, 2, bidirectional=True)),
    ("gru-batch_first-nobias", lambda: nn.GRU(F, 6, batch_first=True, bias=False)),
    ("rnn-relu-2layer-bidir", lambda: nn.RNN(F, 6, 2, nonlinearity="relu", bidirectional=True)),
    ("rnn-tanh", lambda: nn.RNN(F, 6)),
]


@pytest.mark.parametrize("make", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_training_equals_alone_float64(make: Callable[[], nn.RNNBase]) -> None:
    x = torch.randn(T, B, F, dtype=torch.float64)  # batch_first reads it as [B=5, T=2, I]
    _check_training(lambda: Seq(make()), (x,))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_training_equals_alone_float32(kind: str) -> None:
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    x = torch.randn(T, B, F)
    _check_training(lambda: Seq(cls(F, 6, 2, bidirectional=True)), (x,), dtype=torch.float32)


class OnlyPart(nn.Module):
    """Uses only the output sequence's last step, or only the final hidden state (the
    gradients of the unused outputs are None in backward)."""

    def __init__(self, rnn: nn.Module, part: str) -> None:
        super().__init__()
        self.rnn = rnn
        self.part = part

    def forward(self, x: Tensor) -> tuple[Tensor]:
        out, state = self.rnn(x)
        if self.part == "output":
            return (out[-1],)
        h = state[0] if isinstance(state, tuple) else state
        return (h[-1],)


@pytest.mark.parametrize("part", ["output", "state"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=["lstm", "gru", "rnn"])
def test_unused_outputs(cls: type[nn.Module], part: str) -> None:
    x = torch.randn(T, B, F, dtype=torch.float64)
    _check_training(lambda: OnlyPart(cls(F, 6, 2, bidirectional=True), part), (x,))
    if cls is nn.LSTM:
        _check_training(lambda: OnlyPart(nn.LSTM(F, 6, proj_size=3), part), (x,))


def test_dropout_between_layers_in_eval_mode_equals_alone() -> None:
    def make() -> nn.Module:
        return Seq(nn.LSTM(F, 6, 3, dropout=0.4)).eval()

    _check_training(make, (torch.randn(T, B, F, dtype=torch.float64),))


def test_shared_initial_states() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, F, generator=g, dtype=torch.float64)
    h0 = torch.randn(4, B, 3, generator=g, dtype=torch.float64)
    c0 = torch.randn(4, B, 6, generator=g, dtype=torch.float64)
    _check_training(lambda: Seq(nn.LSTM(F, 6, 2, bidirectional=True, proj_size=3)), (x, h0, c0))
    h0 = torch.randn(2, B, 6, generator=g, dtype=torch.float64)
    _check_training(lambda: Seq(nn.GRU(F, 6, 2)), (x, h0))


def test_per_model_inputs_and_initial_states() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, B, T, F, generator=g, dtype=torch.float64)
    h0 = torch.randn(N, 2, B, 6, generator=g, dtype=torch.float64)
    c0 = torch.randn(N, 2, B, 6, generator=g, dtype=torch.float64)
    make = lambda: Seq(nn.LSTM(F, 6, bidirectional=True, batch_first=True))  # noqa: E731
    _check_training(make, (x, h0, c0), per_model=True)
    _check_training(lambda: Seq(nn.RNN(F, 6, 2)), (x.transpose(1, 2), h0), per_model=True)


def test_unbatched_2d_input() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, F, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    c0 = torch.randn(2, 6, generator=g, dtype=torch.float64)
    _check_training(lambda: Seq(nn.LSTM(F, 6, 2)), (x,))
    _check_training(lambda: Seq(nn.LSTM(F, 6, bidirectional=True)), (x, h0, c0))
    _check_training(lambda: Seq(nn.GRU(F, 6, bidirectional=True)), (x, h0))


class Packed(nn.Module):
    """Packs a padded ``[T, B, I]`` batch of variable lengths before the recurrent layer."""

    def __init__(self, rnn: nn.Module, lengths: Tensor) -> None:
        super().__init__()
        self.rnn = rnn
        self.lengths = lengths

    def forward(self, x: Tensor, h0: Tensor | None = None) -> Any:
        packed = pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        hx = None if h0 is None else ((h0, torch.tanh(h0)) if isinstance(self.rnn, nn.LSTM) else h0)
        out, state = self.rnn(packed, hx)
        h = state[0] if isinstance(state, tuple) else state
        return out.data, h


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_packed_sequence_input(kind: str) -> None:
    lengths = torch.tensor([3, 5, 1, 4])
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, 4, F, generator=g, dtype=torch.float64)
    h0 = torch.randn(4, 4, 6, generator=g, dtype=torch.float64)
    _check_training(lambda: Packed(cls(F, 6, 2, bidirectional=True), lengths), (x,))
    _check_training(lambda: Packed(cls(F, 6, 2, bidirectional=True), lengths), (x, h0))


class PackPad(nn.Module):
    """Embedding -> pack (per-model data) -> LSTM -> pad_packed_sequence -> linear head."""

    def __init__(self, lengths: Tensor | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, F)
        self.rnn = nn.LSTM(F, 6, 2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 3)
        self.lengths = lengths

    def forward(self, tokens: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lengths = self.lengths if lengths is None else lengths
        packed = pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        out, (h, _) = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.head(padded), h


def test_pack_and_pad_of_per_model_tensors_run_batched() -> None:
    """pack_padded_sequence of a per-model tensor and pad_packed_sequence of the layer's
    output have batching rules (no per-model fallback, which the suite turns into an
    error): the model trains as alone."""
    tokens = torch.randint(0, 10, (4, T))
    lengths = torch.tensor([3, 5, 1, 4])
    _check_training(lambda: PackPad(lengths).double(), (tokens,))


def test_per_model_lengths_are_refused() -> None:
    batch = ModelBatch([PackPad() for _ in range(2)])
    tokens = torch.randint(0, 10, (2, 4, T))
    lengths = torch.tensor([[3, 5, 1, 4], [2, 5, 1, 4]])
    with pytest.raises(ValueError, match=r"lengths differ per model .* pad the sequences"):
        batch(tokens, lengths, per_model=True)


class CellLoop(nn.Module):
    """A cell unrolled over time by the model's own Python loop."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor) -> Any:
        state: Any = None
        hs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            hs.append(state[0] if isinstance(state, tuple) else state)
        if isinstance(state, tuple):
            return torch.stack(hs), state[1]
        return (torch.stack(hs),)


CELLS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("lstmcell", lambda: nn.LSTMCell(F, 6)),
    ("grucell", lambda: nn.GRUCell(F, 6)),
    ("rnncell-relu", lambda: nn.RNNCell(F, 6, nonlinearity="relu")),
    ("lstmcell-nobias", lambda: nn.LSTMCell(F, 6, bias=False)),
    ("grucell-nobias", lambda: nn.GRUCell(F, 6, bias=False)),
]


@pytest.mark.parametrize("make", [c[1] for c in CELLS], ids=[c[0] for c in CELLS])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cells_equal_alone(make: Callable[[], nn.Module], batched: bool) -> None:
    x = torch.randn(T, B, F, dtype=torch.float64) if batched else torch.randn(T, F).double()
    _check_training(lambda: CellLoop(make()), (x,))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_names_and_extract_are_unchanged() -> None:
    models = [Seq(nn.LSTM(F, 6, 2, bidirectional=True, proj_size=3)) for _ in range(2)]
    batch = ModelBatch(models)
    assert type(batch.stacked.rnn) is VmapLSTM
    names = [n for n, _ in models[0].named_parameters()]
    assert [n for n, _ in batch.stacked_parameters()] == names
    assert "rnn.weight_hr_l1_reverse" in names
    back = batch.extract(1)
    assert type(back.rnn) is nn.LSTM
    assert back.state_dict().keys() == models[1].state_dict().keys()
    for name, value in models[1].state_dict().items():
        assert torch.equal(back.state_dict()[name], value)
    x = torch.randn(T, B, F)
    assert torch.allclose(back(x)[0], models[1](x)[0])  # cuDNN/flat-weight path still works
    cells = ModelBatch([CellLoop(nn.LSTMCell(F, 6)) for _ in range(2)])
    assert type(cells.stacked.cell) is VmapLSTMCell


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _count_matmuls(n: int, make: Callable[[], nn.Module], x: Tensor) -> tuple[int, int]:
    """Matmul kernels (mm/bmm/addmm) in the forward and in the backward of a batch of n."""
    batch = ModelBatch([make() for _ in range(n)])
    with _CountMatmuls() as fwd:
        outs = batch(x)
    loss = sum(o.sum() for o in outs)
    with _CountMatmuls() as bwd:
        loss.backward()  # type: ignore[union-attr]
    return fwd.count, bwd.count


def test_matmuls_per_step_do_not_grow_with_n() -> None:
    """Per layer and direction: one matmul for the input projection of all T steps and one
    per step for the recurrence (plus one per step for the LSTM projection); the same
    number for any N. Backward, per layer and direction: 2T - 1 for the recurrence (no
    gradient for the zero initial state), one for W_ih, one more for the layer's input
    above the first layer (the shared input needs none), 2T for the projection."""
    t, layers, dirs = 6, 2, 2
    x = torch.randn(t, B, F)
    stack_fwd = layers * dirs * (1 + t)
    stack_bwd = layers * dirs * 2 * t + (layers - 1) * dirs
    cases: list[tuple[Callable[[], nn.Module], tuple[int, int]]] = [
        (lambda: Seq(nn.LSTM(F, 6, layers, bidirectional=True)), (stack_fwd, stack_bwd)),
        (lambda: Seq(nn.GRU(F, 6, layers, bidirectional=True)), (stack_fwd, stack_bwd)),
        (lambda: Seq(nn.RNN(F, 6)), (1 + t, 2 * t)),
        (lambda: Seq(nn.LSTM(F, 6, proj_size=3)), (1 + 2 * t, 4 * t)),
    ]
    for make, expected in cases:
        assert _count_matmuls(2, make, x) == expected
        assert _count_matmuls(7, make, x) == expected


def _dropout_lstm() -> nn.Module:
    return Seq(nn.LSTM(F, 6, 3, dropout=0.5))


def test_dropout_between_layers_trains_with_per_model_masks() -> None:
    torch.manual_seed(0)
    model = _dropout_lstm().double()
    x = torch.randn(T, B, F, dtype=torch.float64)
    for seeds in (None, [5, 6, 7]):
        batch = ModelBatch([copy.deepcopy(model) for _ in range(N)], seeds=seeds)
        out = batch(x)[0]
        # Same weights, same input: only the dropout masks can tell the models apart.
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
        batch.eval()
        evals = batch(x)[0]
        assert torch.allclose(evals[0], evals[1])
        assert rel_err(evals[0], model.eval()(x)[0]) <= TOL[torch.float64]
        batch.train()
        model.train()
        opt = Adam(batch, lr=0.05)
        target = torch.zeros(T, B, 6, dtype=torch.float64)
        losses = []
        for _ in range(30):
            loss = ((batch(x)[0] - target) ** 2).mean(dim=(1, 2, 3))
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            losses.append(loss.detach())
        assert bool((torch.stack(losses[-5:]).mean(0) < 0.5 * losses[0]).all())


def test_seeded_dropout_masks_depend_on_the_models_own_seed_only() -> None:
    torch.manual_seed(0)
    models = [_dropout_lstm().double() for _ in range(4)]
    x = torch.randn(T, B, F, dtype=torch.float64)
    small = ModelBatch([models[1], models[3]], seeds=[11, 13])
    big = ModelBatch(models, seeds=[10, 11, 12, 13])
    names = [n for n, _ in big.stacked_buffers()]
    assert names == [
        f"rnn.inter_layer_dropout.{k}.{b}" for k in (0, 1) for b in ("seed", "counter")
    ]
    for _ in range(2):  # successive calls advance each model's own counters
        a, b = small(x), big(x)
        for k in range(len(a)):
            assert torch.equal(a[k][0], b[k][1])
            assert torch.equal(a[k][1], b[k][3])
    assert big.extract(2).state_dict().keys() == models[2].state_dict().keys()


def test_errors_name_the_cause() -> None:
    batch = ModelBatch([Seq(nn.LSTM(F, 6, 2)) for _ in range(2)])
    with pytest.raises(RuntimeError, match=r"input_size\. Expected 4, got 3"):
        batch(torch.randn(T, B, 3))
    with pytest.raises(
        RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 6\), got \[1, 2, 6\]"
    ):
        batch(torch.randn(T, B, F), torch.zeros(1, B, 6), torch.zeros(2, B, 6))
    with pytest.raises(RuntimeError, match="For batched 3-D input, hx and cx should also be 3-D"):
        batch(torch.randn(T, B, F), torch.zeros(2, 6), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        batch(torch.randn(1, T, B, F))
    gru = ModelBatch([Seq(nn.GRU(F, 6)) for _ in range(2)])
    with pytest.raises(ValueError, match="does not match weight dtype"):
        gru(torch.randn(T, B, F, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"'rnn' \(LSTM\): attribute 'dropout' is 0.2 where model 0 has 0.1"
    ):
        ModelBatch([Seq(nn.LSTM(F, 6, 2, dropout=p)) for p in (0.1, 0.2)])
    with pytest.raises(ValueError, match="batch_first"):
        ModelBatch([Seq(nn.GRU(F, 6, batch_first=bf)) for bf in (False, True)])
    assert isinstance(gru.stacked.rnn, VmapGRU)


def test_a_model_that_is_an_lstm_trains_as_alone() -> None:
    """The root module itself is substituted: a bare ``nn.LSTM`` as the model."""
    x = torch.randn(T, B, F, dtype=torch.float64)

    models = [nn.LSTM(F, 6, 2).double() for _ in range(N)]
    alone = [copy.deepcopy(m) for m in models]
    batch = ModelBatch(models)
    assert isinstance(batch.stacked, VmapLSTM)
    opt = Adam(batch, lr=0.05)
    ref_opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in alone]
    for _ in range(2):
        out, (h, c) = batch(x)
        opt.zero_grad()
        (out.square().sum() + h.sum() + c.sum()).backward()
        opt.step()
        for m, ref_opt in zip(alone, ref_opts, strict=True):
            o, (hh, cc) = m(x)
            ref_opt.zero_grad()
            (o.square().sum() + hh.sum() + cc.sum()).backward()
            ref_opt.step()
    assert_close_models(batch.extract_all(), alone, torch.float64, "after training")
    assert type(batch.extract(0)) is nn.LSTM
