"""GPU correctness checks of the speed-up toggles, runnable without pytest (the GPU machine
may not have it). Each check trains the same models two ways and prints PASS/FAIL with the
largest relative error. Run from the repository root with PYTHONPATH=src:

    python3 benchmarks/cuda_checks.py --out checks.txt [--part graph|compile|all]

``--part graph`` runs the CUDA-graph checks only (seconds), ``--part compile`` the
torch.compile ones (compiling takes a while). ``--out`` is rewritten after every check, so
a run cut short keeps what it checked (``--append`` adds to it instead).

The same checks live in tests/test_speed.py (marked ``cuda``) for machines with pytest.
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import rel_err, train_alone

import modelbatch
from modelbatch.bench.workloads import ResNet8
from modelbatch.speed import compile_optimizer

N = 3
LRS = [0.05, 0.02, 0.01]
DEV = "cuda"


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))


def small_resnet() -> nn.Module:
    return ResNet8(num_classes=3)


def models_of(make: Callable[[], nn.Module], n: int = N) -> list[nn.Module]:
    torch.manual_seed(0)
    return [make().to(DEV) for _ in range(n)]


def data_of(shape: tuple[int, ...], steps: int, classes: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(*shape, generator=g).to(DEV),
            torch.randint(0, classes, (shape[0],), generator=g).to(DEV),
        )
        for _ in range(steps)
    ]


OPTS: dict[str, tuple[Callable[..., Any], Callable[[int, nn.Module], Any]]] = {
    "sgd-momentum-wd": (
        lambda b: modelbatch.optim.SGD(b, lr=LRS, momentum=[0.9, 0.5, 0.8], weight_decay=0.01),
        lambda i, m: torch.optim.SGD(
            m.parameters(), lr=LRS[i], momentum=[0.9, 0.5, 0.8][i], weight_decay=0.01
        ),
    ),
    "adam-amsgrad": (
        lambda b: modelbatch.optim.Adam(b, lr=LRS, amsgrad=[True, False, True]),
        lambda i, m: torch.optim.Adam(m.parameters(), lr=LRS[i], amsgrad=[True, False, True][i]),
    ),
}


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def max_err(got: list[nn.Module], ref: list[nn.Module]) -> float:
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        sb = b.state_dict()
        for k, v in a.state_dict().items():
            if v.is_floating_point():
                worst = max(worst, rel_err(v, sb[k]))
            elif not torch.equal(v, sb[k]):
                return float("inf")
    return worst


def graph_vs_alone(arch: str, opt_name: str, conv_layout: str = "default") -> float:
    make, shape = (bn_mlp, (6, 5)) if arch == "bn-mlp" else (small_resnet, (4, 3, 32, 32))
    models = models_of(make)
    data = data_of(shape, 6)
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models], conv_layout=conv_layout)
    opt = OPTS[opt_name][0](batch)
    sched = step_lr(opt)
    step = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0])
    for x, y in data:
        step(x, y)
        sched.step()
    ref = train_alone(
        models, OPTS[opt_name][1], data, F.cross_entropy, make_scheduler=lambda i, o: step_lr(o)
    )
    return max_err(batch.extract_all(), ref)


def toggled_vs_eager(
    make: Callable[[], nn.Module], shape: tuple[int, ...], mode: str, autocast: bool
) -> float:
    models = models_of(make)
    data = data_of(shape, 5)
    amp = torch.bfloat16 if autocast else None
    results = []
    for variant in ("eager", mode):
        batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
        opt = modelbatch.optim.Adam(batch, lr=LRS)
        if "compile" in variant:
            batch.enable_compile()
            compile_optimizer(opt)
        if "graph" in variant:
            step = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0], autocast_dtype=amp)
            for x, y in data:
                step(x, y)
        else:
            for x, y in data:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = batch.compute_loss(batch(x), y, F.cross_entropy)
                opt.zero_grad()
                loss.backward()
                opt.step()
        results.append(batch.extract_all())
        torch._dynamo.reset()
    return max_err(results[1], results[0])


def quarantine_rules() -> float:
    models = models_of(bn_mlp)
    data = data_of((6, 5), 3)
    batch = modelbatch.ModelBatch(models)
    opt = modelbatch.optim.Adam(batch, lr=0.01)
    step = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0])
    step(*data[0])
    batch.quarantine(1)
    try:
        step(*data[1])
        detected = ""
    except RuntimeError as e:
        detected = str(e)
    if "quarantine_aware=True" not in detected:
        raise AssertionError("a quarantine after capture was not detected")
    batch.unquarantine(1)
    # Captured with every model active; model 1 is quarantined only afterwards.
    aware = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0], quarantine_aware=True)
    aware(*data[0])
    batch.quarantine(1)
    named = [*batch.stacked_parameters(), *batch.stacked_buffers()]
    before = {n: t.clone() for n, t in named}
    aware(*data[1])
    aware(*data[2])
    for n, t in [*batch.stacked_parameters(), *batch.stacked_buffers()]:
        assert torch.equal(t[1], before[n][1]), f"quarantined model changed ({n})"
        assert not torch.equal(t[0], before[n][0]), f"active model did not train ({n})"
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--part", choices=("all", "graph", "compile"), default="all")
    ap.add_argument("--append", action="store_true", help="append to --out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    checks: list[tuple[str, Callable[[], float], float]] = []
    for arch in ("bn-mlp", "resnet8"):
        for opt_name in OPTS:
            checks.append(
                (
                    f"cuda graph = alone, fp32, {arch}, {opt_name}",
                    lambda a=arch, o=opt_name: graph_vs_alone(a, o),
                    1e-5,
                )
            )
    for opt_name in OPTS:
        checks.append(
            (
                f"cuda graph = alone, fp32, resnet8, {opt_name}, channels_last conv",
                lambda o=opt_name: graph_vs_alone("resnet8", o, conv_layout="channels_last"),
                1e-5,
            )
        )
    checks.append(("quarantine rules of the cuda graph", quarantine_rules, 0.0))
    checks.append(
        (
            "cuda graph = eager, bf16 autocast, resnet8",
            lambda: toggled_vs_eager(small_resnet, (4, 3, 32, 32), "graph", True),
            1e-3,
        )
    )
    checks.append(
        (
            "compile = eager, fp32, resnet8",
            lambda: toggled_vs_eager(small_resnet, (4, 3, 32, 32), "compile", False),
            1e-4,
        )
    )
    checks.append(
        (
            "compile + cuda graph = eager, fp32, bn-mlp",
            lambda: toggled_vs_eager(bn_mlp, (6, 5), "compile-graph", False),
            1e-4,
        )
    )
    if args.part != "all":
        checks = [c for c in checks if ("compile" in c[0]) == (args.part == "compile")]
    prefix = args.out.read_text() if args.append and args.out and args.out.exists() else ""
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, part {args.part}"]

    def write() -> None:
        if args.out is not None:
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(prefix + "\n".join(lines) + "\n")
            tmp.replace(args.out)

    write()
    failed = 0
    for name, fn, tol in checks:
        try:
            err = fn()
            ok = err <= tol
            lines.append(f"{'PASS' if ok else 'FAIL'}  {name}: max rel err {err:.2e} (tol {tol:g})")
        except Exception as e:
            ok = False
            tb = traceback.format_exc(limit=6)
            lines.append(f"FAIL  {name}: {type(e).__name__}: {e}\n{tb}")
        failed += not ok
        print(lines[-1], flush=True)
        write()
    lines.append(f"{len(checks) - failed}/{len(checks)} checks passed ({args.part})")
    print(lines[-1])
    write()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
