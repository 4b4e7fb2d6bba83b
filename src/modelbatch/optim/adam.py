"""Vectorised Adam and AdamW with per-model hyper-parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modelbatch.optim.base import BatchOptimizer, _capturing, _Slot, check_range, gathered_grad

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["Adam", "AdamW"]

Hp = float | Sequence[float]
Betas = tuple[float, float] | Sequence[tuple[float, float]]


class Adam(BatchOptimizer):
    """Adam over a :class:`~modelbatch.ModelBatch`, matching :class:`torch.optim.Adam`
    applied to each model alone (L2 weight decay added to the gradient).

    Every argument is a scalar or a length-N list; ``betas`` is one pair or N pairs.

    Args:
        batch: the ModelBatch to optimise.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: L2 penalty.
        amsgrad: use the AMSGrad variant.
        maximize: maximise the objective instead of minimising it.
    """

    _float_hparams = ("lr", "eps", "weight_decay", "betas")
    _bool_hparams = ("amsgrad", "maximize")
    _decoupled_weight_decay = False
    # exp_avg_sq would square complex gradients; torch.optim.Adam works on real views.
    _supports_complex = False

    def __init__(
        self,
        batch: ModelBatch,
        lr: Hp = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: Hp = 1e-8,
        weight_decay: Hp = 0.0,
        amsgrad: bool | Sequence[bool] = False,
        *,
        maximize: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(
            batch,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
                "maximize": maximize,
            },
        )

    _small_width = 3  # [bias correction 1, bias correction 2, step]
    # The host path's coefficients reach the kernel through a copied [1, 2] device tensor
    # (always off the CPU; True on the CPU too only to test that variant there).
    _host_ke_copy = False

    def _validate(self, group: Mapping[str, Any], i: int) -> None:
        for name in ("lr", "eps", "weight_decay"):
            check_range(self, group, i, name)
        for k, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise self._error(i, f"invalid beta parameter at index {k}: {beta}")

    def _state_keys(self) -> tuple[str, ...]:
        keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
        if any(self._hp_host_now()["amsgrad"]):
            keys += ("max_exp_avg_sq",)
        return keys

    def _hp_host_now(self) -> dict[str, list[Any]]:
        if not self._hp_host:
            self._hp_host = self._host_values()
        return self._hp_host

    def _constants(self, hp: dict[str, Tensor], host: dict[str, list[Any]]) -> dict[str, Any]:
        active = hp["active"]
        act = active.to(torch.float64)
        b1, b2, lr, eps = hp["betas[0]"], hp["betas[1]"], hp["lr"], hp["eps"]
        one = torch.ones_like(b1)
        zero = torch.zeros_like(b1)
        # Step state [bc1, bc2, t] -> [bc1, bc2, t] * M + A: bc <- (1 - beta) + beta * bc is
        # 1 - beta^t; inactive models keep theirs (M = 1, A = 0).
        m_col = torch.cat([b1, b2, one], 1)
        a_col = torch.cat([1 - b1, 1 - b2, one], 1)
        c: dict[str, Any] = {
            "f64_M": torch.where(active, m_col, 1.0),
            "f64_A": torch.where(active, a_col, 0.0),
            "f64_E": torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64, device=b1.device),
            "f64_L": torch.cat([lr, lr / eps], 1),
            "f64_lr": lr,
            "f64_eps": eps,
            "w1": (1 - b1) * act,
            "w2": (1 - b2) * act,
            # 16-bit parameters: m = m * m1 + g * w1 in float32 (lerp wants one dtype).
            "m1": torch.where(active, b1, 1.0),
            "m2": torch.where(active, b2, 1.0),
            "active": active,
            "inactive": ~active,
            # Output of the per-step coefficients [k, e] in the coefficient dtype (the last
            # float64 op writes it: no separate cast kernel; kept at one address).
            "ke": torch.zeros(active.shape[0], 2, dtype=torch.float64, device=b1.device),
            # Their denominators [sqrt(bc2) * lr (written every step), lr / eps].
            "f64_den": torch.cat([zero, lr / eps], 1),
        }
        amsgrad = host["amsgrad"]
        maximize = host["maximize"]
        wds = host["weight_decay"]
        flags = {
            "maximize": any(maximize),
            "wd": (2 if self._decoupled_weight_decay else 1) if any(wds) else 0,
            "amsgrad": (1 if all(amsgrad) else 2) if any(amsgrad) else 0,
            "safe": any(v == 0 for v in host["lr"]),
        }
        if flags["maximize"]:
            c["sign"] = torch.where(hp["maximize"] != 0, -one, one)
        if flags["wd"] == 1:
            c["wd"] = hp["weight_decay"]
        elif flags["wd"] == 2:
            c["decay"] = torch.where(active, 1 - lr * hp["weight_decay"], one)
        if flags["amsgrad"] == 2:
            c["ams"] = hp["amsgrad"] != 0
        c["flags"] = flags
        # The host path needs one lr, betas and eps for all models (the bias corrections
        # and coefficients are then one pair of numbers); the rest stays per model.
        names = ("lr", "betas[0]", "betas[1]", "eps")
        uniform = all(len(set(host[k])) == 1 for k in names) and flags["amsgrad"] != 2
        nonzero = host["lr"][0] != 0 and host["eps"][0] != 0  # (Python would divide by 0)
        self._uniform = {k: host[k][0] for k in names} if uniform and nonzero else None
        return c

    # ---------------------------------------------------------------- host path
    def _fast_step(
        self, slot: _Slot, p: Tensor, grads: list[Tensor], c: dict[str, Any], flags: dict[str, Any]
    ) -> bool:
        """The step when every model has the same lr, betas and eps and the same step count
        (known on the host), and every model is active: the step state and the coefficients
        are Python numbers, computed exactly as the device path computes them (the same IEEE
        operations in float64), so a model's numbers never depend on which path ran. The
        element-wise kernels are the device path's: 7 for float32 Adam (gather, two moments,
        g², sqrt, denominator, update). The step state is written lazily
        (:meth:`_write_pending`)."""
        u = self.__dict__.get("_uniform")
        if (
            u is None
            or slot.host_t is None
            or flags["masked"]
            or flags["lowp"]
            or slot.rows.dtype != torch.float64  # (MPS: the device path is float32)
            or not self._fresh(slot)
            or (p.device.type == "cuda" and _capturing())
        ):
            return False
        b1, b2, lr, eps = u["betas[0]"], u["betas[1]"], u["lr"], u["eps"]
        bc1, bc2 = slot.host_bc
        # As rows.mul_(M).add_(A), sqrt, mul and div on the device.
        bc1 = bc1 * b1 + (1.0 - b1)
        bc2 = bc2 * b2 + (1.0 - b2)
        k = bc1 / (math.sqrt(bc2) * lr)
        e = bc1 / (lr / eps)
        g = gathered_grad(p, grads, c, flags, slot.scratch)
        state = slot.state
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, c["w1"])
        g.mul_(g)
        exp_avg_sq.lerp_(g, c["w2"])
        second = exp_avg_sq
        if flags["amsgrad"]:
            second = state["max_exp_avg_sq"]
            torch.maximum(second, exp_avg_sq, out=second)
        torch.sqrt(second, out=g)
        ke = c["ke"]
        if p.device.type == "cpu" and not self._host_ke_copy:
            # d = e + g * k as one add with alpha: the same fused multiply-add as the device
            # path's addcmul, bit for bit, but vectorised (CPU addcmul with two broadcast
            # operands runs a scalar loop, 5-10x slower). e and k are rounded to the
            # coefficient dtype (in the kernel for k) as the device path's [N, 2] write
            # rounds its float64 results.
            # (A zero-dimensional tensor and a Python number: no kernel, no copy.)
            torch.add(torch.tensor(e, dtype=ke.dtype), g, alpha=k, out=g)
        else:
            # Elsewhere one non-blocking copy from pinned memory into a [1, 2] device
            # tensor (same dtype and cast as the device path's; then the same kernel).
            cuda = p.device.type == "cuda"
            host = torch.tensor([[k, e]], dtype=ke.dtype, pin_memory=cuda)
            dev = slot.host_ke
            if dev is None or dev.device != p.device or dev.dtype != ke.dtype:
                dev = slot.host_ke = torch.empty(1, 2, dtype=ke.dtype, device=p.device)
            dev.copy_(host, non_blocking=cuda)
            torch.addcmul(dev[:, 1:2], g, dev[:, 0:1], out=g)
        p.addcdiv_(exp_avg, g, value=-1)
        slot.host_t += 1
        slot.host_bc = (bc1, bc2)
        slot.pending += 1
        return True

    def _write_pending(self, slot: _Slot) -> None:
        assert slot.host_t is not None
        row = torch.tensor([[*slot.host_bc, float(slot.host_t)]], dtype=slot.rows.dtype)
        slot.rows.copy_(row.expand_as(slot.rows))  # every tensor's row, one copy

    def _host_steps(self, slot: _Slot) -> int | None:
        """After loading: every model at the same step state (read once; loading is not a
        hot path) continues on the host path from it."""
        if slot.split or slot.rows.shape[0] == 0:
            return None
        small = slot.rows[0].cpu()  # (the rows are equal)
        if not torch.equal(small, small[0:1].expand_as(small)):
            return None
        bc1, bc2, t = small[0].tolist()
        if not (t.is_integer() and t >= 0):
            return None
        slot.host_bc = (bc1, bc2)
        return int(t)

    def _small_keys(self) -> tuple[str, ...]:
        return ("step", "bias_correction1", "bias_correction2")

    def _small_entries(self, small: Tensor) -> dict[str, Tensor]:
        return {
            "step": small[:, 2],
            "bias_correction1": small[:, 0],
            "bias_correction2": small[:, 1],
        }

    def _small_from_steps(self, steps: Tensor, c: dict[str, Any]) -> Tensor:
        t = steps.view(-1, 1)
        saved = c.get("saved", {})
        if "bias_correction1" in saved and "bias_correction2" in saved:
            # Exactly as saved (a resumed run continues bit for bit).
            cols = [
                torch.as_tensor(saved[k]).to(device=t.device, dtype=torch.float64).view(-1, 1)
                for k in ("bias_correction1", "bias_correction2")
            ]
            return torch.cat([*cols, t], 1)
        b1, b2 = c["betas[0]"], c["betas[1]"]
        return torch.cat([1 - b1**t, 1 - b2**t, t], 1)

    def _on_hparams_changed(self, old: dict[str, list[Any]], new: dict[str, list[Any]]) -> None:
        # torch.optim computes the bias corrections from the current betas (which e.g.
        # OneCycleLR cycles): recompute them from the step counts.
        if old.get("betas[0]") == new["betas[0]"] and old.get("betas[1]") == new["betas[1]"]:
            return
        # (Recomputed on the device; the host path hands over to the device path.)
        self._recompute_small()

    @staticmethod
    def _update(  # type: ignore[override]
        p: Tensor,
        grads: list[Tensor],
        state: dict[str, Tensor],
        small: Tensor,
        c: dict[str, Any],
        flags: dict[str, Any],
        scratch: Tensor | None,
    ) -> None:
        if scratch is None:
            coef = Adam._coefficients(small, c, flags)
            Adam._apply_functional(p, grads, state, coef, c, flags)
            return
        masked = flags["masked"]
        g = gathered_grad(p, grads, c, flags, scratch, masked)
        # Per-model step state, once per step: [bc1, bc2, t] <- [bc1, bc2, t] * M + A, and
        # the coefficients, one IEEE operation per kernel (no fused multiply-add, no pow):
        # the host path computes the same numbers in Python (Adam._host_coefficients).
        # Every row of ``small`` [R, N, 3] at once (broadcast); the coefficients from row 0.
        small.mul_(c["f64_M"]).add_(c["f64_A"])
        head = small[0]
        root = torch.sqrt(head[:, 1:2])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if flags["lowp"]:
            exp_avg.mul_(c["m1"]).addcmul_(g, c["w1"])
            g.mul_(g)
            exp_avg_sq.mul_(c["m2"]).addcmul_(g, c["w2"])
        else:
            exp_avg.lerp_(g, c["w1"])
            g.mul_(g)
            exp_avg_sq.lerp_(g, c["w2"])
        second = exp_avg_sq
        if flags["amsgrad"]:
            max_sq = state["max_exp_avg_sq"]
            torch.maximum(max_sq, exp_avg_sq, out=max_sq)
            second = max_sq if flags["amsgrad"] == 1 else torch.where(c["ams"], max_sq, exp_avg_sq)
        torch.sqrt(second, out=g)
        # p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), written as p -= m / d with
        # d = (bc1 / lr) * (sqrt(v) / sqrt(bc2) + eps) = sqrt(v) * k + e.
        ke = c["ke"]  # [N, 2] in the coefficient dtype: the float64 results cast on write
        den = c["f64_den"]
        torch.mul(root, c["f64_lr"], out=den[:, 0:1])
        if flags["safe"]:  # some lr == 0: d = (sqrt(v) + eps * sqrt(bc2)) * k, k may be inf
            torch.div(head[:, 0:1], den[:, 0:1], out=ke[:, 0:1])
            torch.mul(root, c["f64_eps"], out=ke[:, 1:2])
            g.add_(ke[:, 1:2]).mul_(ke[:, 0:1])
        else:  # k = bc1 / (sqrt(bc2) * lr), e = bc1 / (lr / eps)
            torch.div(head[:, 0:1], den, out=ke)
            torch.addcmul(ke[:, 1:2], g, ke[:, 0:1], out=g)
        if masked:
            torch.addcdiv(p, exp_avg, g, value=-1, out=g)
            torch.where(c["active"], g, p, out=p)
        else:
            p.addcdiv_(exp_avg, g, value=-1)

    @staticmethod
    def _coefficients(small: Tensor, c: dict[str, Any], flags: dict[str, Any]) -> Tensor:
        """The per-step per-model coefficients ``[N, 2]`` (compiled path), updating the step
        state ``small`` ``[R, N, 3]`` (R equal rows) in place: ``[k, e]`` with the denominator
        ``sqrt(v) * k + e``, or ``[k, eps * sqrt(bc2)]`` when some lr is 0 (then
        ``(sqrt(v) + e) * k``)."""
        new_small = c["f64_A"] + small[0] * c["f64_M"]
        small.copy_(new_small.expand_as(small))
        z = torch.pow(new_small, c["f64_E"])
        if flags["safe"]:
            k = torch.div(z[:, 0:1], z[:, 1:2] * c["f64_lr"])
            return torch.cat([k, z[:, 1:2] * c["f64_eps"]], 1).to(c["w1"].dtype)
        return torch.div(z[:, 0:1], z[:, 1:3] * c["f64_L"]).to(c["w1"].dtype)

    @staticmethod
    def _apply_functional(
        p: Tensor,
        grads: list[Tensor],
        state: dict[str, Tensor],
        coef: Tensor,
        c: dict[str, Any],
        flags: dict[str, Any],
    ) -> None:
        """The element-wise update without in-place temporaries, always quarantine-aware
        (compiled path: Inductor fuses all of it, the gradient gather included)."""
        g = torch.cat(grads, 1)
        if flags["maximize"]:
            g = g * c["sign"]
        p_in = p
        if flags["wd"]:
            decay = torch.zeros_like(p[:1])
            for a, b in flags["decay_runs"]:
                decay[:, a:b] = 1
            if flags["wd"] == 1:
                g = g + p * (c["wd"] * decay)
            else:
                p_in = p * torch.where(decay != 0, c["decay"], 1.0)
        g = torch.where(c["active"], g, 0.0)
        if flags["lowp"]:
            exp_avg = state["exp_avg"] * c["m1"] + g * c["w1"]
            exp_avg_sq = state["exp_avg_sq"] * c["m2"] + g * g * c["w2"]
        else:
            exp_avg = torch.lerp(state["exp_avg"], g, c["w1"])
            exp_avg_sq = torch.lerp(state["exp_avg_sq"], g * g, c["w2"])
        second = exp_avg_sq
        if flags["amsgrad"]:
            max_sq = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            state["max_exp_avg_sq"].copy_(max_sq)
            second = max_sq if flags["amsgrad"] == 1 else torch.where(c["ams"], max_sq, exp_avg_sq)
        root = torch.sqrt(second)
        if flags["safe"]:
            d = (root + coef[:, 1:2]) * coef[:, 0:1]
        else:
            d = torch.addcmul(coef[:, 1:2], root, coef[:, 0:1])
        new_p = torch.where(c["active"], torch.addcdiv(p_in, exp_avg, d, value=-1), p)
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)
        p.copy_(new_p)


class AdamW(Adam):
    """AdamW (decoupled weight decay) over a :class:`~modelbatch.ModelBatch`, matching
    :class:`torch.optim.AdamW` applied to each model alone. Same arguments as :class:`Adam`;
    ``weight_decay`` defaults to 0.01 as in PyTorch."""

    _decoupled_weight_decay = True

    def __init__(
        self,
        batch: ModelBatch,
        lr: Hp = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: Hp = 1e-8,
        weight_decay: Hp = 1e-2,
        amsgrad: bool | Sequence[bool] = False,
        *,
        maximize: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(batch, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
