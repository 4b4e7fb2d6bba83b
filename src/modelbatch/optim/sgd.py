"""Vectorised SGD with per-model momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modelbatch.optim.base import BatchOptimizer, check_range, gathered_grad

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["SGD"]

Hp = float | Sequence[float]


class SGD(BatchOptimizer):
    """Stochastic gradient descent over a :class:`~modelbatch.ModelBatch`, matching
    :class:`torch.optim.SGD` applied to each model alone.

    Every argument is a scalar (shared by all models) or a length-N list (one per model).

    Args:
        batch: the ModelBatch to optimise.
        lr: learning rate.
        momentum: momentum factor (0 disables momentum for that model).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximise the objective instead of minimising it.
    """

    _float_hparams = ("lr", "momentum", "dampening", "weight_decay")
    _bool_hparams = ("nesterov", "maximize")

    def __init__(
        self,
        batch: ModelBatch,
        lr: Hp = 1e-3,
        momentum: Hp = 0.0,
        dampening: Hp = 0.0,
        weight_decay: Hp = 0.0,
        nesterov: bool | Sequence[bool] = False,
        *,
        maximize: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(
            batch,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": maximize,
            },
        )

    _small_width = 2  # [momentum buffer started (0/1), step]

    def _validate(self, group: Mapping[str, Any], i: int) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            check_range(self, group, i, name)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise self._error(i, "Nesterov momentum requires a momentum and zero dampening")

    def _state_keys(self) -> tuple[str, ...]:
        if not self._hp_host:
            self._hp_host = self._host_values()
        return ("momentum_buffer",) if any(self._hp_host["momentum"]) else ()

    def _small_keys(self) -> tuple[str, ...]:
        return ("step", "momentum_started")

    def _small_entries(self, small: Tensor) -> dict[str, Tensor]:
        return {"step": small[:, 1], "momentum_started": small[:, 0]}

    def _constants(self, hp: dict[str, Tensor], host: dict[str, list[Any]]) -> dict[str, Any]:
        active = hp["active"]
        mom, damp, lr = hp["momentum"], hp["dampening"], hp["lr"]
        one = torch.ones_like(mom)
        zero = torch.zeros_like(mom)
        moving = (mom != 0) & active  # models whose buffer this step updates
        # Buffer coefficients [c1, c2]: buf = buf * c1 + grad * c2. A model's first step with
        # momentum copies the gradient ([0, 1]), later ones apply momentum and dampening;
        # models without momentum (or quarantined) keep their buffer ([1, 0]).
        keep = torch.cat([one, zero], 1)
        first = torch.where(moving, torch.cat([zero, one], 1), keep)
        later = torch.where(moving, torch.cat([mom, 1 - damp], 1), keep)
        nesterov = hp["nesterov"] != 0
        has_mom = mom != 0
        # Update = k1 * grad + k2 * buf, times -lr.
        k1 = torch.where(has_mom, torch.where(nesterov, one, zero), one)
        k2 = torch.where(has_mom, torch.where(nesterov, mom, one), zero)
        neg_lr = -lr * active.to(lr.dtype)
        c: dict[str, Any] = {
            "first": first,
            "later": later,
            "f64_moving": moving.to(torch.float64),
            "f64_active": active.to(torch.float64),
            "raw_lr": neg_lr,
            "k1": neg_lr * k1,
            "k2": neg_lr * k2,
            "active": active,
            "inactive": ~active,
        }
        flags = {
            "maximize": any(host["maximize"]),
            "wd": 1 if any(host["weight_decay"]) else 0,
            "momentum": any(host["momentum"]),
            "raw_grad": any(
                m == 0 or nest for m, nest in zip(host["momentum"], host["nesterov"], strict=True)
            ),
        }
        if flags["maximize"]:
            c["sign"] = torch.where(hp["maximize"] != 0, -one, one)
        if flags["wd"]:
            c["wd"] = hp["weight_decay"]
        c["flags"] = flags
        return c

    def _slot_flags(self, slot: Any, masked: bool, k: int | None = None) -> dict[str, Any]:
        flags = super()._slot_flags(slot, masked, k)
        # Settled: every model with momentum already has its buffer (known after a step
        # with all models active and the same set of models with momentum): the buffer
        # coefficients are then constant and need no per-step work.
        nz = self.__dict__.get("_nz")
        if nz is None or self.__dict__.get("_nz_of") is not self._hp_host:
            host = self._hp_host
            nz = tuple(m != 0 for m in host["momentum"])  # O(N), on a change only
            self._plain = all(nz) and not any(host["dampening"])
            self._nz, self._nz_of = nz, host
        settled = self._settled is nz or (
            self._settled is not None
            and all(s or not z for s, z in zip(self._settled, nz, strict=True))
        )
        if settled:
            self._settled = nz
        flags["settled"] = settled and not masked and k is None and self._compiled is None
        # Every model with momentum and no dampening: the buffer update is one kernel,
        # buf = g + buf * c0, on every path (the same arithmetic whichever path runs, so a
        # model's numbers do not depend on the others'). Not in static mode, where
        # `masked=False` is the caller's promise, not a fact.
        flags["plain_hp"] = not self._static and self.__dict__.get("_plain", False)
        flags["plain"] = flags["settled"] and flags["plain_hp"]
        return flags

    def _fast_step(
        self, slot: Any, p: Tensor, grads: list[Tensor], c: dict[str, Any], flags: dict[str, Any]
    ) -> bool:
        """A settled step with every model active, with momentum and without dampening:
        the step counts are kept on the host (written into the step state when it is read),
        the step is 3 kernels (gather, buffer, parameters) plus one for Nesterov."""
        if not flags["plain"] or not self._fresh(slot):
            return False
        g = torch.cat(grads, 1, out=slot.scratch)
        if flags["maximize"]:
            g.mul_(c["sign"])
        if flags["wd"]:
            for a, b in flags["decay_runs"]:
                g[:, a:b].addcmul_(p[:, a:b], c["wd"])
        buf = slot.state["momentum_buffer"]
        torch.addcmul(g, buf, c["later"][:, 0:1], out=buf)
        if flags["raw_grad"]:
            p.addcmul_(g, c["k1"])
        p.addcmul_(buf, c["k2"])
        slot.pending += 1
        return True

    def _write_pending(self, slot: Any) -> None:
        slot.rows[..., 1].add_(float(slot.pending))  # every tensor's row, one kernel

    def _after_step(self, masked: bool) -> None:
        if not masked and self._slots is not None and not any(s.split for s in self._slots):
            self._settled = self.__dict__.get("_nz")

    def _small_from_steps(self, steps: Tensor, c: dict[str, Any]) -> Tensor:
        saved = c.get("saved", {})
        started = saved.get("momentum_started")
        t = steps.view(-1, 1)
        if started is None:  # older state dicts: a model that stepped has its buffer
            hb = (t > 0).to(torch.float64)
        else:
            hb = torch.as_tensor(started).to(device=t.device, dtype=torch.float64).view(-1, 1)
        return torch.cat([hb, t], 1)

    def _import_state(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        super()._import_state(saved)
        self._settled = None

    def _to_torch_state(self, s: dict[str, Any]) -> dict[str, Any]:
        buf = s.get("momentum_buffer")
        started = bool(s.get("momentum_started", 0))
        return {"momentum_buffer": buf if (buf is not None and started) else None}

    def _missing_torch_state(self, like: Tensor) -> dict[str, Any] | None:
        # torch.optim.SGD keeps no state for a parameter stepped without momentum.
        return self._from_torch_state({}, like)

    def _from_torch_state(self, s: dict[str, Any], like: Tensor) -> dict[str, Any]:
        buf = s.get("momentum_buffer")
        if buf is None:
            return {
                "momentum_buffer": torch.zeros_like(like),
                "momentum_started": torch.tensor(0.0, dtype=torch.float64),
                "step": torch.tensor(0.0, dtype=torch.float64),
            }
        if buf.shape != like.shape:
            raise ValueError(
                f"torch.optim SGD momentum_buffer has shape {tuple(buf.shape)}, the parameter "
                f"{tuple(like.shape)}"
            )
        return {
            "momentum_buffer": buf.detach().to(like.dtype),
            "momentum_started": torch.tensor(1.0, dtype=torch.float64),
            "step": torch.tensor(1.0, dtype=torch.float64),
        }

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
            coef = SGD._coefficients(small, c, flags)
            SGD._apply_functional(p, grads, state, coef, c, flags)
            return
        masked = flags["masked"]
        g = gathered_grad(p, grads, c, flags, scratch, masked)
        # ``small`` [R, N, 2]: R equal rows, all written by each (broadcast) operation.
        if not flags["momentum"]:
            small[..., 1:2].add_(c["f64_active"])
            p.addcmul_(g, c["raw_lr"])
            return
        buf = state["momentum_buffer"]
        if flags["settled"]:
            coef = c["later"]
            small[..., 1:2].add_(1.0)
        else:
            hb = small[..., 0:1]
            coef = torch.where(small[0, :, 0:1] > 0, c["later"], c["first"])
            torch.maximum(hb, c["f64_moving"], out=hb)  # started |= moving
            small[..., 1:2].add_(c["f64_active"])
        if flags["plain_hp"]:  # coef[:, 1] is 1 (or 0 where g is 0: quarantined models)
            torch.addcmul(g, buf, coef[:, 0:1], out=buf)
        else:
            buf.mul_(coef[:, 0:1]).addcmul_(g, coef[:, 1:2])
        if masked:  # the same arithmetic as below, then kept for active models only
            new = torch.addcmul(p, g, c["k1"], out=g) if flags["raw_grad"] else g.copy_(p)
            new.addcmul_(buf, c["k2"])
            torch.where(c["active"], new, p, out=p)
            return
        if flags["raw_grad"]:
            p.addcmul_(g, c["k1"])
        p.addcmul_(buf, c["k2"])

    @staticmethod
    def _coefficients(small: Tensor, c: dict[str, Any], flags: dict[str, Any]) -> Tensor:
        """The buffer coefficients ``[N, 2]`` of this step (compiled path), updating the
        step state ``small`` ``[R, N, 2]`` (R equal rows: started, step) in place."""
        head = small[0]
        hb = head[:, 0:1]
        coef = torch.where(hb > 0, c["later"], c["first"])
        new = torch.cat([torch.maximum(hb, c["f64_moving"]), head[:, 1:2] + c["f64_active"]], 1)
        small.copy_(new.expand_as(small))
        return coef

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
        (compiled path)."""
        g = torch.cat(grads, 1)
        if flags["maximize"]:
            g = g * c["sign"]
        if flags["wd"]:
            decay = torch.zeros_like(p[:1])
            for a, b in flags["decay_runs"]:
                decay[:, a:b] = 1
            g = g + p * (c["wd"] * decay)
        g = torch.where(c["active"], g, 0.0)
        if not flags["momentum"]:
            p.copy_(torch.addcmul(p, g, c["raw_lr"]))
            return
        buf = state["momentum_buffer"]
        new_buf = torch.addcmul(buf * coef[:, 0:1], g, coef[:, 1:2])
        new = torch.addcmul(p, g, c["k1"]) if flags["raw_grad"] else p
        new = torch.addcmul(new, new_buf, c["k2"])
        buf.copy_(new_buf)
        p.copy_(torch.where(c["active"], new, p))
