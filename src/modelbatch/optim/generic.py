"""The slow but general path: any ``torch.optim.Optimizer`` over per-model views.

Each model's parameters are exposed as leaf tensors that *view* the stacked ``[N, ...]``
storage, one param group per model, and the wrapped optimizer updates them in place, so
the stacked tensors see every update. It is correct for any optimizer but loops over the
N models in Python inside the optimizer's ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from modelbatch.optim.base import _optimizer_getstate, expand_hyperparameter, zero_stacked_grads

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["PerModelOptimizer"]


def _validate_per_model(
    optimizer_cls: type[torch.optim.Optimizer],
    per_model: Mapping[str, list[Any]],
    model_ids: Sequence[int | str],
) -> None:
    """Check every model's hyper-parameters as ``optimizer_cls``'s constructor would (it
    checks only its own arguments, not the values of extra param groups): one throwaway
    optimizer per distinct configuration, on a dummy tensor."""
    seen: dict[str, int] = {}
    for i, mid in enumerate(model_ids):
        config = {k: v[i] for k, v in per_model.items()}
        key = repr(sorted(config.items(), key=lambda kv: kv[0]))
        if key in seen:
            continue
        seen[key] = i
        dummy = torch.zeros(1, requires_grad=True)
        try:
            optimizer_cls([dummy], **config)  # type: ignore[call-arg]
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"{optimizer_cls.__name__}, model {i} (id {mid!r}): invalid hyper-parameters "
                f"{config}: {e}"
            ) from None


class PerModelOptimizer(torch.optim.Optimizer):
    """Wrap any ``torch.optim.Optimizer`` class so it trains each model of a batch alone.

    ``param_groups[i]`` is model i's group of the wrapped optimizer (with ``"model_id"``
    added), so LR schedulers work unchanged. Quarantined models are skipped (their views
    get no gradient, which every torch optimizer treats as "do not update").

    Args:
        batch: the ModelBatch.
        optimizer_cls: any ``torch.optim.Optimizer`` subclass.
        hyperparams: the optimizer's keyword arguments, each a scalar or a length-N list.
    """

    def __init__(
        self,
        batch: ModelBatch,
        optimizer_cls: type[torch.optim.Optimizer],
        **hyperparams: Any,
    ) -> None:
        n = len(batch)
        self.batch = batch
        self.optimizer_cls = optimizer_cls
        per_model = {k: expand_hyperparameter(k, v, n) for k, v in hyperparams.items()}
        _validate_per_model(optimizer_cls, per_model, batch.model_ids)
        self._names = [name for name, p in batch.stacked_parameters() if p.requires_grad]
        self._views: list[list[nn.Parameter]] = [[] for _ in range(n)]
        self._bind_views()
        groups = []
        for i in range(n):
            group: dict[str, Any] = {"params": self._views[i]}
            group.update({k: v[i] for k, v in per_model.items()})
            groups.append(group)
        try:
            self.inner = optimizer_cls(groups)  # type: ignore[call-arg]
        except (TypeError, ValueError) as e:
            raise type(e)(f"building {optimizer_cls.__name__} for each model failed: {e}") from e
        for g, mid in zip(self.inner.param_groups, batch.model_ids, strict=False):
            g["model_id"] = mid
        # ``defaults`` / ``param_groups`` / ``state`` are the wrapped optimizer's (properties
        # below), so schedulers, hooks and users that read or edit them see the real thing.
        self._share_hooks()
        self._zero_grad_profile_name = "Optimizer.zero_grad#PerModelOptimizer.zero_grad"
        batch._register_optimizer(self)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ shared containers
    def _share_hooks(self) -> None:
        """Hooks registered on this wrapper are the wrapped optimizer's (they run in its
        ``step``, ``state_dict`` and ``load_state_dict``)."""
        for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            name = f"_optimizer_{kind}_hooks"
            setattr(self, name, getattr(self.inner, name))

    # Properties, not copies: ``inner.load_state_dict`` replaces the wrapped optimizer's
    # ``state`` and ``param_groups`` objects.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Model i's param group of the wrapped optimizer (with ``"model_id"``)."""
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's state, keyed by the per-model view parameters."""
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    # ------------------------------------------------------------------ views
    def _bind_views(self) -> None:
        """(Re)point model i's view parameters at slice i of the stacked tensors.

        Called on construction and whenever the stacked storage moved (``.to()``, a load).
        The view objects keep their identity, so the wrapped optimizer's state survives.
        """
        stacked = dict(self.batch.stacked_parameters())
        for i in range(len(self.batch)):
            views = self._views[i]
            for k, name in enumerate(self._names):
                data = stacked[name].data[i]
                if k < len(views):
                    views[k].data = data
                else:
                    views.append(nn.Parameter(data))

    def _views_stale(self) -> bool:
        stacked = dict(self.batch.stacked_parameters())
        first = stacked[self._names[0]] if self._names else None
        return first is not None and (
            self._views[0][0].data_ptr() != first.data[0].data_ptr()
            or self._views[0][0].device != first.device
        )

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Give every active model's views its gradient slice, then step the wrapped
        optimizer (one Python loop over models inside it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._views_stale():
            self._bind_views()
        stacked = dict(self.batch.stacked_parameters())
        active = self.batch.active.tolist()
        for i, views in enumerate(self._views):
            for view, name in zip(views, self._names, strict=False):
                g = stacked[name].grad
                view.grad = g[i] if (g is not None and active[i]) else None
        self.inner.step()
        for views in self._views:
            for view in views:
                view.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the stacked parameters."""
        zero_stacked_grads(self.batch, set_to_none)
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = self.inner.state_dict()
        sd["model_ids"] = list(self.batch.model_ids)
        return sd

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the param groups are the N models, one each."""
        raise TypeError(
            "PerModelOptimizer.add_param_group is not supported: it has exactly one param "
            "group per model of its ModelBatch, each covering all of that model's parameters; "
            "use a separate optimizer for other parameters"
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        if "model_ids" not in state_dict:
            raise ValueError(
                "PerModelOptimizer.load_state_dict got a state dict without 'model_ids': a "
                "plain torch.optim state dict of one model? This optimizer's state holds all N "
                "models; load what its own state_dict() returned"
            )
        ids = list(state_dict.get("model_ids", []))
        if ids != list(self.batch.model_ids):
            raise ValueError(
                f"optimizer state is for models {ids}, but the batch holds {self.batch.model_ids}"
            )
        sd = {k: v for k, v in state_dict.items() if k != "model_ids"}
        if self._views_stale():
            self._bind_views()
        self.inner.load_state_dict(sd)

    def _follow_batch(self) -> None:
        """Re-point the views and move the wrapped optimizer's state to the parameters'
        device and dtype after the batch moved (``batch.to(...)``, ``batch.double()``)."""
        self._bind_views()
        if self.inner.state:
            # torch.optim's own loading casts the state as each parameter needs it.
            self.inner.load_state_dict(self.inner.state_dict())

    def __getstate__(self) -> dict[str, Any]:
        return _optimizer_getstate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._share_hooks()
        self.batch._register_optimizer(self)  # type: ignore[arg-type]

    def _keep_positions(self, keep: Sequence[int]) -> None:
        old_views = self._views
        new_views = [old_views[i] for i in keep]
        new_state: dict[Tensor, Any] = {}
        for views in new_views:
            for v in views:
                if v in self.inner.state:
                    new_state[v] = self.inner.state[v]
        self.inner.state.clear()
        self.inner.state.update(new_state)
        self.inner.param_groups[:] = [self.inner.param_groups[i] for i in keep]
        self._views = new_views
        self._bind_views()

    def __repr__(self) -> str:
        return f"PerModelOptimizer({self.optimizer_cls.__name__}, N={len(self.param_groups)})"
