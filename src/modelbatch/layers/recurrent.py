"""Recurrent layers under vmap: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells.

``torch.nn``'s recurrent layers call fused kernels (``aten::lstm``, ``aten::gru``,
``aten::rnn_tanh``, ``aten::lstm_cell``, ...) that have no vmap batching rule, so a model
containing one fails inside a :class:`~modelbatch.ModelBatch` ("Batching rule not implemented
for aten::lstm") or, with vmap's fallback, runs one model at a time.

When a batch is built, every exact ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` / ``nn.LSTMCell`` /
``nn.GRUCell`` / ``nn.RNNCell`` of the stacked mirror gets the matching ``Vmap*`` class below
(the class is swapped in place, so the parameter names ``weight_ih_l0``, ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0``, ``*_reverse`` and therefore checkpoints and
``extract`` are unchanged). Their forward computes the same recurrence with plain batchable
ops, for one model (it runs under ``vmap``):

* the input projection of a layer for **all** time steps at once, ``x @ W_ih^T + b`` over
  ``[T, B, I]`` (under vmap: one matmul for the N models);
* one ``h @ W_hh^T`` per time step (under vmap: one ``bmm`` over N), then the gates with
  torch's order and formulas: LSTM ``i, f, g, o``; GRU ``r, z, n`` with ``b_hn`` inside
  ``r * (W_hn h + b_hn)``; RNN ``tanh`` or ``relu``; LSTM ``proj_size`` as ``h @ W_hr^T``.

Supported as in torch: multi-layer, bidirectional, ``batch_first``, ``bias=False``, initial
states (shared ``[L*D, B, H]`` or per model with ``per_model=True``), unbatched 2-D input,
``PackedSequence`` input, and dropout between layers in training. With the batch's
``seeds=``, the dropout masks between layers are drawn as in
:class:`~modelbatch.layers.dropout.SeededDropout` (a function of the model's own seed, a
per-layer counter and the element index; extra ``[N]`` buffers ``inter_layer_dropout.k.seed``
/ ``.counter``); without seeds they come from vmap's randomness, as for ``nn.Dropout``.
``flatten_parameters()`` is a no-op: the substituted modules never use torch's flattened
weight buffer.

Importing this module also registers vmap batching rules for ``aten::_pack_padded_sequence``
and ``aten::_pad_packed_sequence`` (``pack_padded_sequence`` / ``pad_packed_sequence``), which
torch lacks, so packing a per-model tensor and padding a recurrent layer's packed output run
once for all N models instead of vmap's per-model fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from modelbatch.layers import register_substitution
from modelbatch.layers.dropout import _LAYER_COUNTER_KEY, SeededDropout

__all__ = [
    "VmapGRU",
    "VmapGRUCell",
    "VmapLSTM",
    "VmapLSTMCell",
    "VmapRNN",
    "VmapRNNCell",
]


def _gates_lstm(
    xg: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_hr: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One LSTM step for one model. ``xg``: ``[B, 4H]`` input projection (both biases
    included), ``h``: ``[B, P]`` (``P`` = proj_size or H), ``c``: ``[B, H]``."""
    gates = xg + torch.matmul(h, w_hh.t())
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = torch.matmul(h_new, w_hr.t())
    return h_new, c_new


def _gates_gru(xg: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """One GRU step for one model. ``xg``: ``[B, 3H]`` input projection with ``b_ih``,
    ``h``: ``[B, H]``; ``b_hn`` stays inside ``r * (W_hn h + b_hn)`` as in torch."""
    hg = torch.matmul(h, w_hh.t())
    if b_hh is not None:
        hg = hg + b_hh
    x_r, x_z, x_n = xg.chunk(3, dim=-1)
    h_r, h_z, h_n = hg.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return n + z * (h - n)


def _gates_rnn(xg: Tensor, h: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
    """One Elman RNN step for one model. ``xg``: ``[B, H]`` input projection (both biases
    included), ``h``: ``[B, H]``."""
    pre = xg + torch.matmul(h, w_hh.t())
    return torch.relu(pre) if relu else torch.tanh(pre)


class _VmapRNNMixin:
    """Forward shared by :class:`VmapLSTM`, :class:`VmapGRU` and :class:`VmapRNN`."""

    def flatten_parameters(self) -> None:
        """No-op: the vmappable forward reads the parameters by name, never torch's
        flattened weight buffer (which cannot hold stacked ``[N, ...]`` parameters)."""

    def _weight(self, name: str) -> Tensor | None:
        rnn: nn.RNNBase = self  # type: ignore[assignment]
        return getattr(rnn, name, None)

    def _check_input(self, x: Tensor, packed: bool) -> None:
        rnn: nn.RNNBase = self  # type: ignore[assignment]
        w = self._weight("weight_ih_l0")
        assert w is not None
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({x.dtype})"
            )
        if packed and x.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {x.dim()}")
        if x.size(-1) != rnn.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {rnn.input_size}, got {x.size(-1)}"
            )

    def _inter_layer_dropout(self, x: Tensor, layer: int) -> Tensor:
        """Dropout on the output of ``layer`` (not the last) in training mode."""
        rnn: nn.RNNBase = self  # type: ignore[assignment]
        if not rnn.training or rnn.dropout == 0.0:
            return x
        seeded = getattr(rnn, "inter_layer_dropout", None)
        if seeded is not None:
            out: Tensor = seeded[layer](x)
            return out
        return F.dropout(x, rnn.dropout, training=True)

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> Any:
        """Same contract as the torch module: ``input`` ``[T, B, I]`` (``[B, T, I]`` with
        ``batch_first``), ``[T, I]`` unbatched, or a ``PackedSequence``; ``hx`` ``[L*D, B,
        H_out]`` (a pair ``(h_0, c_0)`` for LSTM, ``c_0`` ``[L*D, B, H]``) or ``None``.
        Returns ``(output, h_n)`` or, for LSTM, ``(output, (h_n, c_n))``; under a batch of N
        models these come back as ``[N, ...]``."""
        rnn: nn.RNNBase = self  # type: ignore[assignment]
        mode = rnn.mode
        is_lstm = mode == "LSTM"
        name = type(rnn).__name__.removeprefix("Vmap")
        d = 2 if rnn.bidirectional else 1
        h_size = rnn.hidden_size
        h_out = rnn.proj_size if rnn.proj_size > 0 else h_size

        sorted_indices: Tensor | None = None
        unsorted_indices: Tensor | None = None
        batch_sizes: list[int] | None = None
        unbatched = False
        if isinstance(input, PackedSequence):
            x = input.data
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            batch_sizes = [int(b) for b in input.batch_sizes.tolist()]
            self._check_input(x, packed=True)
            batch = batch_sizes[0]
        else:
            x = input
            if x.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {x.dim()}D instead")
            self._check_input(x, packed=False)
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)
            elif rnn.batch_first:
                x = x.transpose(0, 1)
            batch = x.size(1)

        expected_h = (rnn.num_layers * d, batch, h_out)
        expected_c = (rnn.num_layers * d, batch, h_size)
        h0: Tensor | None
        c0: Tensor | None = None
        if hx is None:
            h0 = x.new_zeros(expected_h)
            if is_lstm:
                c0 = x.new_zeros(expected_c)
        else:
            pair = (hx[0], hx[1]) if is_lstm else (hx, None)
            want = 2 if unbatched else 3
            for t in pair:
                if t is not None and t.dim() != want:
                    kind = "unbatched 2-D" if unbatched else "batched 3-D"
                    what = "hx and cx" if is_lstm else "hx"
                    raise RuntimeError(
                        f"For {kind} input, {what} should also be {want}-D "
                        f"but got {t.dim()}-D tensor"
                    )
            h0, c0 = pair
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
            msg = (
                "Expected hidden[0] size {}, got {}"
                if is_lstm
                else "Expected hidden size {}, got {}"
            )
            if tuple(h0.shape) != expected_h:
                raise RuntimeError(msg.format(expected_h, list(h0.shape)))
            if c0 is not None and tuple(c0.shape) != expected_c:
                raise RuntimeError(f"Expected hidden[1] size {expected_c}, got {list(c0.shape)}")

        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        layer_in = x
        for layer in range(rnn.num_layers):
            outs = []
            for direction in range(d):
                k = layer * d + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                out, h_last, c_last = self._run_direction(
                    layer_in,
                    h0[k],
                    c0[k] if c0 is not None else None,
                    suffix,
                    reverse=bool(direction),
                    batch_sizes=batch_sizes,
                )
                outs.append(out)
                h_n.append(h_last)
                if c_last is not None:
                    c_n.append(c_last)
            layer_in = outs[0] if d == 1 else torch.cat(outs, dim=-1)
            if layer < rnn.num_layers - 1:
                layer_in = self._inter_layer_dropout(layer_in, layer)

        output = layer_in
        h_stack = torch.stack(h_n)
        c_stack = torch.stack(c_n) if is_lstm else None
        if unsorted_indices is not None:
            h_stack = h_stack.index_select(1, unsorted_indices)
            if c_stack is not None:
                c_stack = c_stack.index_select(1, unsorted_indices)
        result: Tensor | PackedSequence
        if isinstance(input, PackedSequence):
            result = PackedSequence(output, input.batch_sizes, sorted_indices, unsorted_indices)
        else:
            if unbatched:
                output = output.squeeze(1)
                h_stack = h_stack.squeeze(1)
                c_stack = c_stack.squeeze(1) if c_stack is not None else None
            elif rnn.batch_first:
                output = output.transpose(0, 1)
            result = output
        if is_lstm:
            assert c_stack is not None
            return result, (h_stack, c_stack)
        return result, h_stack

    def _run_direction(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        suffix: str,
        reverse: bool,
        batch_sizes: Sequence[int] | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer, one direction, for one model.

        ``x``: ``[T, B, I]`` or packed ``[sum_t B_t, I]``; ``h0``: ``[B, H_out]``; ``c0``:
        ``[B, H]`` (LSTM). Returns ``(output [T, B, H_out] or packed [sum_t B_t, H_out],
        h_n [B, H_out], c_n [B, H] or None)``.
        """
        rnn: nn.RNNBase = self  # type: ignore[assignment]
        mode = rnn.mode
        w_ih = self._weight("weight_ih" + suffix)
        w_hh = self._weight("weight_hh" + suffix)
        b_ih = self._weight("bias_ih" + suffix)
        b_hh = self._weight("bias_hh" + suffix)
        w_hr = self._weight("weight_hr" + suffix)
        assert w_ih is not None and w_hh is not None
        # The input projection of every time step in one matmul (one for all N under vmap).
        # As a 2-D matmul: a 3-D (e.g. batch_first, transposed) input would make vmap
        # broadcast the weight to [N, T, I, G] instead.
        xg = torch.matmul(x.reshape(-1, x.shape[-1]), w_ih.t()).view(*x.shape[:-1], -1)
        if b_ih is not None:
            # For LSTM/RNN both biases simply add to the gates: one pass over [T, B, G].
            xg = xg + (b_ih + b_hh if mode != "GRU" and b_hh is not None else b_ih)
        if batch_sizes is None:
            steps = list(xg.unbind(0))
            sizes = [x.size(1)] * len(steps)
        else:
            sizes = list(batch_sizes)
            steps = list(xg.split(sizes, dim=0))
        order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
        relu = mode == "RNN_RELU"
        h = h0[: sizes[order[0]]] if steps else h0
        c = c0[: sizes[order[0]]] if c0 is not None and steps else c0
        finished_h: list[Tensor] = []  # forward, packed: states of sequences that ended
        finished_c: list[Tensor] = []
        outs: list[Tensor] = [h0[:0]] * len(steps)
        for t in order:
            bs = sizes[t]
            if bs < h.size(0):  # forward direction, packed: the shortest sequences ended
                finished_h.append(h[bs:])
                h = h[:bs]
                if c is not None:
                    finished_c.append(c[bs:])
                    c = c[:bs]
            elif bs > h.size(0):  # reverse direction, packed: longer sequences start
                h = torch.cat([h, h0[h.size(0) : bs]])
                if c is not None and c0 is not None:
                    c = torch.cat([c, c0[c.size(0) : bs]])
            if mode == "LSTM":
                assert c is not None
                h, c = _gates_lstm(steps[t], h, c, w_hh, w_hr)
            elif mode == "GRU":
                h = _gates_gru(steps[t], h, w_hh, b_hh)
            else:
                h = _gates_rnn(steps[t], h, w_hh, relu)
            outs[t] = h
        if finished_h:
            h = torch.cat([h, *reversed(finished_h)])
            if c is not None:
                c = torch.cat([c, *reversed(finished_c)])
        output = torch.stack(outs) if batch_sizes is None else torch.cat(outs)
        return output, h, c


class VmapLSTM(_VmapRNNMixin, nn.LSTM):
    """``nn.LSTM`` computed with batchable ops (see the module docstring)."""


class VmapGRU(_VmapRNNMixin, nn.GRU):
    """``nn.GRU`` computed with batchable ops (see the module docstring)."""


class VmapRNN(_VmapRNNMixin, nn.RNN):
    """``nn.RNN`` (tanh or relu) computed with batchable ops (see the module docstring)."""


class _VmapCellMixin:
    """Forward shared by the three cells: input ``[B, I]`` or ``[I]``."""

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        """Same contract as the torch cell: ``input`` ``[B, I]`` or unbatched ``[I]``;
        ``hx`` ``[B, H]`` (a pair ``(h, c)`` for ``LSTMCell``) or ``None``. Returns
        ``h'`` or ``(h', c')``."""
        cell: nn.RNNCellBase = self  # type: ignore[assignment]
        name = type(cell).__name__.removeprefix("Vmap")
        is_lstm = isinstance(cell, nn.LSTMCell)
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.size(-1) != cell.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(-1)} "
                f"expected {cell.input_size}"
            )
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        batch = x.size(0)
        h_size = cell.hidden_size
        if hx is None:
            h = x.new_zeros(batch, h_size)
            c = x.new_zeros(batch, h_size) if is_lstm else None
        else:
            h, c = (hx[0], hx[1]) if is_lstm else (hx, None)
            for t in (h, c):
                if t is not None and t.dim() != input.dim():
                    raise RuntimeError(
                        f"{name}: Expected hidden to be {input.dim()}D (like the input), "
                        f"got {t.dim()}D instead"
                    )
            if unbatched:
                h = h.unsqueeze(0)
                c = c.unsqueeze(0) if c is not None else None
            for t in (h, c):
                if t is not None and tuple(t.shape) != (batch, h_size):
                    raise RuntimeError(
                        f"{name}: Expected hidden size {(batch, h_size)}, got {list(t.shape)}"
                    )
        xg = torch.matmul(x, cell.weight_ih.t())
        if cell.bias_ih is not None:
            xg = xg + cell.bias_ih
        if isinstance(cell, nn.GRUCell):
            out: Any = _gates_gru(xg, h, cell.weight_hh, cell.bias_hh)
            return out.squeeze(0) if unbatched else out
        if cell.bias_hh is not None:
            xg = xg + cell.bias_hh
        if is_lstm:
            assert c is not None
            h_new, c_new = _gates_lstm(xg, h, c, cell.weight_hh, None)
            if unbatched:
                return h_new.squeeze(0), c_new.squeeze(0)
            return h_new, c_new
        nonlinearity = getattr(cell, "nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
        out = _gates_rnn(xg, h, cell.weight_hh, nonlinearity == "relu")
        return out.squeeze(0) if unbatched else out


class VmapLSTMCell(_VmapCellMixin, nn.LSTMCell):
    """``nn.LSTMCell`` computed with batchable ops."""


class VmapGRUCell(_VmapCellMixin, nn.GRUCell):
    """``nn.GRUCell`` computed with batchable ops."""


class VmapRNNCell(_VmapCellMixin, nn.RNNCell):
    """``nn.RNNCell`` (tanh or relu) computed with batchable ops."""


# ---------------------------------------------------------------------------- packing
# torch has no vmap batching rule for packing and padding, so ``pack_padded_sequence`` of a
# per-model tensor (e.g. after an embedding) and ``pad_packed_sequence`` of a recurrent
# layer's packed output would run vmap's per-model fallback loop. Both ops treat every
# dimension after the (time, batch) ones as features, so the rules below move the model
# dimension there and make one call for all N models. The lengths / batch sizes must be
# the same for every model (a per-model one is refused).


def _refuse_batched_lengths(op: str, what: str) -> None:
    raise ValueError(
        f"{op} under a ModelBatch: the {what} differ per model (a batched tensor). Pass "
        f"one {what} tensor shared by every model (not an input given with "
        "per_model=True), or pad the sequences and mask instead of packing"
    )


def _pack_padded_sequence_vmap(
    info: Any, in_dims: tuple[int | None, ...], input: Tensor, lengths: Tensor, batch_first: bool
) -> tuple[tuple[Tensor, Tensor], tuple[int | None, None]]:
    """vmap rule of ``aten::_pack_padded_sequence`` (input ``[T, B, *]`` or ``[B, T, *]``
    per model -> ``(data [sum_t B_t, *], batch_sizes [T])``)."""
    x_dim, len_dim = in_dims[0], in_dims[1]
    if len_dim is not None:
        _refuse_batched_lengths("pack_padded_sequence", "lengths")
    if x_dim is None:
        return torch.ops.aten._pack_padded_sequence(input, lengths, batch_first), (None, None)
    data, batch_sizes = torch.ops.aten._pack_padded_sequence(
        input.movedim(x_dim, -1), lengths, batch_first
    )
    return (data, batch_sizes), (data.dim() - 1, None)


def _pad_packed_sequence_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    data: Tensor,
    batch_sizes: Tensor,
    batch_first: bool,
    padding_value: float,
    total_length: int,
) -> tuple[tuple[Tensor, Tensor], tuple[int | None, None]]:
    """vmap rule of ``aten::_pad_packed_sequence`` (``data [sum_t B_t, *]`` per model ->
    ``(padded [T, B, *] or [B, T, *], lengths [B])``)."""
    d_dim, bs_dim = in_dims[0], in_dims[1]
    if bs_dim is not None:
        _refuse_batched_lengths("pad_packed_sequence", "batch sizes")
    pad = torch.ops.aten._pad_packed_sequence
    if d_dim is None:
        return pad(data, batch_sizes, batch_first, padding_value, total_length), (None, None)
    padded, lengths = pad(
        data.movedim(d_dim, -1), batch_sizes, batch_first, padding_value, total_length
    )
    return (padded, lengths), (padded.dim() - 1, None)


torch.library.register_vmap("aten::_pack_padded_sequence", _pack_padded_sequence_vmap)
torch.library.register_vmap("aten::_pad_packed_sequence", _pad_packed_sequence_vmap)


_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: VmapLSTM,
    nn.GRU: VmapGRU,
    nn.RNN: VmapRNN,
    nn.LSTMCell: VmapLSTMCell,
    nn.GRUCell: VmapGRUCell,
    nn.RNNCell: VmapRNNCell,
}


def seeded_inter_layer_dropout(module: nn.Module, seed: int | Tensor, first: int) -> int:
    """Give a recurrent layer (``nn.LSTM``/``nn.GRU``/``nn.RNN``, replaced in place by its
    ``Vmap*`` class) seeded dropout between its layers, numbered ``first, first + 1, ...``
    among the model's dropout layers; ``seed`` is one model's seed (an int, a model alone:
    :func:`modelbatch.use_seeded_dropout`) or the ``[N]`` seeds of a batch. Returns the
    next free layer number (``first`` when the layer has no dropout between layers)."""
    if type(module) in _REPLACEMENTS:
        module.__class__ = _REPLACEMENTS[type(module)]
        module._init_flat_weights()  # type: ignore[operator]
    assert isinstance(module, nn.RNNBase)
    if not (module.dropout > 0 and module.num_layers > 1):
        return first
    gaps = module.num_layers - 1
    drops = [SeededDropout(module.dropout, seed, layer=first + k) for k in range(gaps)]
    for drop in drops:
        drop.train(module.training)
    module.add_module("inter_layer_dropout", nn.ModuleList(drops))
    return first + gaps


def _substitute(module: nn.Module, context: dict[str, Any]) -> nn.Module:
    module.__class__ = _REPLACEMENTS[type(module)]
    if isinstance(module, nn.RNNBase):
        # Drop the references to model 0's original (unstacked) weights: the substituted
        # forward reads the parameters by name, so the flat list is only kept consistent.
        module._init_flat_weights()
        seeds = context.get("seeds")
        if seeds is not None:
            seed_t = torch.as_tensor(list(seeds), dtype=torch.int64, device=context.get("device"))
            first = int(context.get(_LAYER_COUNTER_KEY, 0))
            context[_LAYER_COUNTER_KEY] = seeded_inter_layer_dropout(module, seed_t, first)
    return module


for _cls in _REPLACEMENTS:
    register_substitution(_cls, _substitute)
