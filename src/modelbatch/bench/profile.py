"""Where a training step goes: device kernels per phase, host time, bytes saved for backward
and optimizer bytes per parameter element, for ModelBatch, the hand-written torch.func recipe
and one model alone, side by side. Runs on any device (counts, not timings, are the claim).

* **Kernels**: every ATen operator that reaches the backend under a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode`, except views and allocations
  without a kernel (``empty``, ``detach``, ``alias``, ...): on a GPU each is a kernel launch.
  Counted per phase of one steady-state step: forward, loss, backward, optimizer, zero_grad.
* **Bytes moved** (optimizer phase): per kernel, the bytes it reads (its tensor arguments,
  except ``out=`` buffers, which are only written) and writes (the arguments it mutates, in
  place or as ``out=``; otherwise its outputs), divided by the number of parameter elements
  of the batch: the fused
  Adam floor is 28 B/element in fp32 (read param, grad, two moments; write param, two
  moments).
* **Saved for backward**: the distinct storages autograd keeps from the forward and the loss
  (:func:`torch.autograd.graph.saved_tensors_hooks`), per model.
* **Host time**: the fastest of the timed steps at a tiny batch with one thread (on a GPU,
  with a synchronisation at the end of each step): at N = 1 it is Python and dispatch cost;
  on a CPU at large N it includes the (small) compute.

Used by ``benchmarks/profile_step.py`` (see ``docs/profile.md``).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "PHASES",
    "KernelCounter",
    "ProfileRow",
    "main",
    "profile",
    "saved_bytes",
]

PHASES = ("forward", "loss", "backward", "optimizer", "zero_grad")

# Operators that allocate or re-describe memory without launching a kernel.
_NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::_unsafe_view",
    "aten::_reshape_alias",
    "aten::set_",
    "aten::resize_",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::is_same_size",
    "aten::_has_compatible_shallow_copy_type",
    "aten::record_stream",
    "aten::_local_scalar_dense",  # .item() of a host (CPU) tensor: no device kernel
    "profiler::_record_function_enter_new",
    "profiler::_record_function_exit",
}


def _tensor_bytes(values: Any) -> int:
    total = 0
    for v in torch.utils._pytree.tree_leaves(values):
        if isinstance(v, Tensor):
            total += v.numel() * v.element_size()
    return total


class KernelCounter(TorchDispatchMode):
    """Count kernel-launching ATen operators (and their bytes) by phase.

    Example:
        >>> x = torch.ones(3)
        >>> with KernelCounter() as k:
        ...     with k.phase("forward"):
        ...         y = (x + 1).view(3, 1)  # one kernel; the view is free
        >>> k.counts["forward"]
        1
    """

    def __init__(self, host_tensors: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.host: set[int] = {t.data_ptr() for t in host_tensors}
        self.current = "other"
        self.counts: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.ops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    @property
    def total(self) -> int:
        """Kernels over all phases."""
        return sum(self.counts.values())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the kernels run inside to phase ``name``."""
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def _host_only(self, args: Any) -> bool:
        """Whether the operator works on registered host tensors (torch.optim's CPU step
        counters, which stay on the host when the parameters are on a GPU) and host scalars
        only: no device kernel."""
        if not self.host:
            return False
        tensors = [v for v in torch.utils._pytree.tree_leaves(args) if isinstance(v, Tensor)]
        host = [t.data_ptr() in self.host for t in tensors]
        # e.g. ``_foreach_add_(steps, tensor(1.))``: host counters and host scalars only.
        return any(host) and all(h or t.dim() == 0 for h, t in zip(host, tensors, strict=True))

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if not func.is_view and name not in _NO_KERNEL and not self._host_only(args):
            self.counts[self.current] += 1
            self.ops[self.current][str(func.overloadpacket.__name__)] += 1
            self.bytes[self.current] += _moved_bytes(func, args, kwargs or {}, out)
        return out


def _moved_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Bytes one kernel reads and writes: every tensor argument is read except ``out=``
    buffers; the arguments the schema marks as written (in place or ``out=``) are written,
    and when there are none, the returned tensors are."""
    read = written = 0
    mutated = False
    for i, arg in enumerate(func._schema.arguments):
        value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        if value is None:
            continue
        size = _tensor_bytes(value)
        is_write = arg.alias_info is not None and arg.alias_info.is_write
        if not arg.is_out:
            read += size
        if is_write:
            written += size
            mutated = True
    return read + (written if mutated else _tensor_bytes(out))


@contextmanager
def saved_bytes() -> Iterator[dict[str, int]]:
    """Bytes of the distinct storages autograd saves for backward inside the block
    (``result["bytes"]``; read it after the block)."""
    seen: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


# ---------------------------------------------------------------------------- the three ways
class _Runner:
    """One way to train N models; a step is its five phases."""

    n_models: int
    opt: torch.optim.Optimizer

    def __init__(self, models: list[nn.Module]) -> None:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def param_elements(self) -> int:
        return sum(p.numel() for g in self.opt.param_groups for p in g["params"])

    def host_tensors(self) -> list[Tensor]:
        """torch.optim's step counters: CPU scalars (capturable=False), no device kernel."""
        out = []
        for state in self.opt.state.values():
            step = state.get("step") if isinstance(state, dict) else None
            if isinstance(step, Tensor) and step.dim() == 0 and step.device.type == "cpu":
                out.append(step)
        return out


class _Alone(_Runner):
    def __init__(self, models: list[nn.Module]) -> None:
        self.model = models[0]
        self.n_models = 1
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)


class _Recipe(_Runner):
    def __init__(self, models: list[nn.Module]) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.params, self.buffers = stack_module_state(models)  # type: ignore[arg-type]
        base = copy.deepcopy(models[0]).to("meta")
        self.n_models = len(models)

        def fmodel(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, (p, b), (x,))

        self.ensemble = vmap(fmodel, in_dims=(0, 0, None), randomness="different")
        self.opt = torch.optim.Adam(list(self.params.values()), lr=1e-3, foreach=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble(self.params, self.buffers, x)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        n = self.n_models
        return n * F.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(n))


class _ModelBatch(_Runner):
    def __init__(self, models: list[nn.Module]) -> None:
        import modelbatch

        self.batch = modelbatch.ModelBatch(models)
        self.n_models = len(models)
        self.opt = modelbatch.optim.Adam(self.batch, lr=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return self.batch(x)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return self.batch.compute_loss(out, y, F.cross_entropy)

    def param_elements(self) -> int:
        return sum(p.numel() for p in self.batch.parameters())

    def host_tensors(self) -> list[Tensor]:
        return []


METHODS: dict[str, type[_Runner]] = {
    "modelbatch": _ModelBatch,
    "recipe": _Recipe,
    "alone": _Alone,
}


def _step(r: _Runner, x: Tensor, y: Tensor, counter: KernelCounter | None = None) -> None:
    def ph(name: str) -> Any:
        return counter.phase(name) if counter is not None else _null()

    with ph("forward"):
        out = r.forward(x)
    with ph("loss"):
        loss = r.loss(out, y)
    with ph("backward"):
        loss.backward()
    with ph("optimizer"):
        r.opt.step()
    with ph("zero_grad"):
        r.opt.zero_grad(set_to_none=True)


@contextmanager
def _null() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------- the report
@dataclass
class ProfileRow:
    """One (workload, method, N) of the report."""

    arch: str
    method: str
    n: int
    kernels: dict[str, int] = field(default_factory=dict)
    opt_bytes_per_element: float = 0.0
    saved_mib_per_model: float = 0.0
    host_ms: float = 0.0
    top_ops: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total_kernels(self) -> int:
        return sum(self.kernels.get(p, 0) for p in PHASES)


def _workload(arch: str, spatial: int | None) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    from modelbatch.bench.workloads import MLP, ResNet8

    if arch == "mlp":
        return MLP, (784,)
    if arch == "resnet8":
        s = spatial or 32
        return ResNet8, (3, s, s)
    raise ValueError(f"unknown arch {arch!r}; choose 'mlp' or 'resnet8'")


def profile(
    arch: str,
    method: str,
    n: int,
    *,
    device: torch.device | str = "cpu",
    count_batch: int = 8,
    saved_batch: int | None = None,
    time_batch: int = 2,
    time_steps: int = 20,
    spatial: int | None = None,
) -> ProfileRow:
    """Profile one method at N models.

    Args:
        arch: ``"mlp"`` or ``"resnet8"`` (:mod:`modelbatch.bench.workloads`).
        method: ``"modelbatch"``, ``"recipe"`` or ``"alone"`` (one model; N is ignored).
        n: number of models.
        device: where to run.
        count_batch: samples per model for the kernel count (it does not depend on it).
        saved_batch: samples per model for the saved-bytes measurement (0/None: skipped).
        time_batch: samples per model for the host time.
        time_steps: timed steps (after 3 warm-up steps); 0 skips the timing.
        spatial: image side for ResNet-8 (default 32).
    """
    device = torch.device(device)
    make, shape = _workload(arch, spatial)
    n_eff = 1 if method == "alone" else n
    torch.manual_seed(0)
    models = [make().to(device) for _ in range(n_eff)]
    runner = METHODS[method](models)
    row = ProfileRow(arch, method, n)

    def data(b: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, *shape, generator=g).to(device)
        return x, torch.randint(0, 10, (b,), generator=g).to(device)

    x, y = data(count_batch)
    for _ in range(2):  # optimizer state exists: a steady-state step
        _step(runner, x, y)
    counter = KernelCounter(runner.host_tensors())
    with counter:
        _step(runner, x, y, counter)
    row.kernels = {p: counter.counts.get(p, 0) for p in PHASES}
    row.top_ops = {p: dict(counter.ops[p]) for p in PHASES}
    row.opt_bytes_per_element = counter.bytes.get("optimizer", 0) / max(runner.param_elements(), 1)
    if saved_batch:
        xs, ys = data(saved_batch)
        with saved_bytes() as saved:
            loss = runner.loss(runner.forward(xs), ys)
        del loss
        runner.opt.zero_grad(set_to_none=True)
        row.saved_mib_per_model = saved["bytes"] / n_eff / 2**20
    if time_steps:
        xt, yt = data(time_batch)
        times = []
        for k in range(3 + time_steps):
            t0 = time.perf_counter()
            _step(runner, xt, yt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k >= 3:
                times.append(time.perf_counter() - t0)
        row.host_ms = 1e3 * min(times)  # the least disturbed step: host + (tiny) compute
    return row


def format_table(rows: Sequence[ProfileRow]) -> str:
    """The report as a Markdown table, one line per (workload, method, N)."""
    head = (
        "| workload | method | N | kernels/step | forward | loss | backward | optimizer | "
        "zero_grad | opt B/elem | saved MiB/model | host ms/step |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        k = r.kernels
        saved = f"{r.saved_mib_per_model:.1f}" if r.saved_mib_per_model else "-"
        host = f"{r.host_ms:.2f}" if r.host_ms else "-"
        lines.append(
            f"| {r.arch} | {r.method} | {r.n} | {r.total_kernels} | "
            + " | ".join(str(k.get(p, 0)) for p in PHASES)
            + f" | {r.opt_bytes_per_element:.1f} | {saved} | {host} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/profile_step.py [--arch mlp resnet8] [--models 1 8 64] ...``."""
    p = argparse.ArgumentParser(
        prog="profile_step",
        description="Kernels per step by phase, host time, bytes saved for backward and "
        "optimizer bytes per parameter element: ModelBatch, the torch.func recipe with "
        "foreach Adam, and one model alone.",
    )
    p.add_argument("--arch", nargs="+", default=["mlp", "resnet8"], choices=("mlp", "resnet8"))
    p.add_argument("--models", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--count-batch", type=int, default=8)
    p.add_argument(
        "--saved-batch",
        type=int,
        default=128,
        help="samples per model for bytes saved for backward (ResNet-8 only; 0 skips)",
    )
    p.add_argument("--saved-models", type=int, default=2, help="N for the saved-bytes run")
    p.add_argument("--time-batch", type=int, default=2)
    p.add_argument("--time-steps", type=int, default=20)
    p.add_argument("--spatial", type=int, default=None, help="ResNet-8 image side (default 32)")
    p.add_argument("--ops", action="store_true", help="also print the operators per phase")
    args = p.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in args.arch:
        for method in args.methods:
            for n in [1] if method == "alone" else args.models:
                row = profile(
                    arch,
                    method,
                    n,
                    device=args.device,
                    count_batch=args.count_batch,
                    time_batch=args.time_batch,
                    time_steps=args.time_steps,
                    spatial=args.spatial,
                )
                rows.append(row)
                if args.ops:
                    print(f"{arch} {method} N={n}: {row.top_ops}")
        if args.saved_batch and arch == "resnet8":
            for method in args.methods:
                saved = profile(
                    arch,
                    method,
                    args.saved_models,
                    device=args.device,
                    count_batch=2,
                    saved_batch=args.saved_batch,
                    time_steps=0,
                    spatial=args.spatial,
                )
                for row in rows:
                    if row.arch == arch and row.method == method:
                        row.saved_mib_per_model = saved.saved_mib_per_model
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s); "
        f"kernels at batch {args.count_batch}, host time at batch {args.time_batch}, saved "
        f"bytes at batch {args.saved_batch} (N={args.saved_models})"
    )
    print(format_table(rows))
    return 0
