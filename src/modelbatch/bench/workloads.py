"""Benchmark workloads: the MLP, the CIFAR ResNet-8 and two recurrent sequence classifiers
(LSTM, GRU), their FLOP and byte counts, and data.

Shapes: ``B`` = images (for the recurrent workloads: sequences) per model per step.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "RNNClassifier",
    "ResNet8",
    "Workload",
    "count_flops_per_image",
    "estimate_activation_bytes_per_image",
    "get_workload",
    "load_cifar10",
    "make_batches",
]


class MLP(nn.Module):
    """784-128-128-10 MLP with ReLU (118k parameters). Input ``[B, 784]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection (1x1 conv when the shape
    changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """CIFAR ResNet-8: stem 3->16, one basic block per stage (16, 32, 64 channels), global
    average pooling, linear 64->10; BatchNorm after every conv (78k parameters).
    Input ``[B, 3, 32, 32]``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(out.mean(dim=(2, 3)))


class RNNClassifier(nn.Module):
    """Sequence classifier: a one-layer LSTM or GRU (``batch_first``, hidden 128) over
    ``[B, 32, 96]`` sequences (a CIFAR image read row by row: 32 steps of 3 x 32 values),
    last time step's output -> Linear(128, 10). LSTM 116k parameters, GRU 87k."""

    def __init__(self, cell: str = "lstm", input_size: int = 96, hidden: int = 128) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(input_size, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _lstm() -> nn.Module:
    return RNNClassifier("lstm")


def _gru() -> nn.Module:
    return RNNClassifier("gru")


ARCHS = ("mlp", "resnet8", "lstm", "gru")


@dataclass(frozen=True)
class Workload:
    """A benchmark workload: model factory, per-model batch size and input shape."""

    name: str
    make_model: Callable[[], nn.Module]
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int = 10


def get_workload(arch: str, batch_size: int | None = None) -> Workload:
    """The workload called ``arch`` (one of :data:`ARCHS`)."""
    if arch == "mlp":
        return Workload("mlp", MLP, batch_size or 256, (784,))
    if arch == "resnet8":
        return Workload("resnet8", ResNet8, batch_size or 128, (3, 32, 32))
    if arch == "lstm":
        return Workload("lstm", _lstm, batch_size or 64, (32, 96))
    if arch == "gru":
        return Workload("gru", _gru, batch_size or 64, (32, 96))
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def _leaf_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def count_flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Training FLOPs per image: 2 x the multiply-adds of the forward, the weight gradient
    and, where the layer's input needs one, the input gradient.

    Counts conv, linear and recurrent layers only (the rest is a few percent). The backward
    computes the weight gradient of every layer and the input gradient of every layer but those
    fed by the data (which needs none): 3x the forward for most layers, 2x for the first. A
    recurrent layer uses each weight matrix once per time step and sample; its recurrent and
    projection matrices always need the input (hidden state) gradient.
    """
    macs = 0.0

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal macs
        passes = 3 if inp[0].requires_grad else 2
        if isinstance(mod, nn.RNNBase):
            positions = out[0].numel() // out[0].shape[-1]  # time steps x samples
            for name, w in mod.named_parameters():
                if name.startswith("weight"):
                    fed_by_input = name.startswith("weight_ih_l0")
                    macs += (passes if fed_by_input else 3) * positions * w.numel()
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            macs += passes * out.numel() * k
        elif isinstance(mod, nn.Linear):
            macs += passes * out.numel() * mod.in_features

    _forward_with_hooks(model, input_shape, hook, grad=True)
    return 2.0 * macs


def _forward_with_hooks(
    model: nn.Module, input_shape: tuple[int, ...], hook: Callable[..., None], grad: bool = False
) -> None:
    """One eval-mode forward of a ``[1, *input_shape]`` zero input with ``hook`` on every
    leaf module (the model's train/eval mode is restored); with ``grad``, autograd records
    (so a hook sees which inputs require a gradient)."""
    handles = [m.register_forward_hook(hook) for m in _leaf_modules(model)]
    try:
        was = model.training
        model.eval()
        with torch.set_grad_enabled(grad):
            model(torch.zeros(1, *input_shape))
        model.train(was)
    finally:
        for h in handles:
            h.remove()


def estimate_activation_bytes_per_image(
    model: nn.Module, input_shape: tuple[int, ...], elem_bytes: int
) -> float:
    """Rough device-memory traffic per image for one training step, unfused layers.

    Each leaf layer's output is written once in the forward, read by the next layer, read
    again in the backward and its gradient written and read: about 5 passes over every
    activation. An estimate for the bytes/s column, not a measurement. A recurrent layer
    counts its output and its gate pre-activations at every time step.
    """
    elems = 0

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal elems
        if isinstance(mod, nn.RNNBase):
            positions = out[0].numel() // out[0].shape[-1]
            gates = sum(p.shape[0] for n, p in mod.named_parameters() if n.startswith("weight_hh"))
            elems += out[0].numel() + positions * gates
        else:
            elems += out.numel()

    _forward_with_hooks(model, input_shape, hook)
    return 5.0 * elems * elem_bytes + float(np.prod(input_shape)) * elem_bytes


# ---------------------------------------------------------------------------- data
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python batches only: it refuses every global except the
    few numpy array-reconstruction functions and builtins those files use.

    The official ``cifar-10-batches-py`` files are pickled dicts; the format leaves no
    alternative to unpickling. This restriction stops a crafted file from calling arbitrary
    code (e.g. ``os.system``) while loading.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("builtins", "bytes"),
            ("builtins", "bytearray"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a CIFAR-10 batch file (only numpy arrays, "
            "lists, ints and strings are allowed)"
        )


def _load_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        raw = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict, got {type(raw).__name__}")
    data = raw.get(b"data", raw.get("data"))
    labels = raw.get(b"labels", raw.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: no 'data'/'labels' entries (keys: {sorted(map(str, raw))})")
    arr = np.asarray(data, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3072:
        raise ValueError(f"{path}: data must be [n, 3072] uint8, got {arr.shape}")
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != (arr.shape[0],):
        raise ValueError(f"{path}: {lab.shape[0]} labels for {arr.shape[0]} images")
    return arr, lab


def load_cifar10(folder: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """Load CIFAR-10 from the python batches in ``folder`` (``data_batch_1..5`` or
    ``test_batch``; the ``cifar-10-batches-py`` folder or its parent).

    Returns ``(images [n, 3, 32, 32] float32 normalised per channel, labels [n] int64)``.
    Loaded with a restricted unpickler that only accepts numpy arrays and builtins.
    """
    root = Path(folder)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise FileNotFoundError(f"no CIFAR-10 python batches ({', '.join(names)}) in {root}")
    parts = [_load_batch_file(p) for p in files]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    y = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(x).float().div_(255.0)
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (images - mean) / std, torch.from_numpy(y)


def make_batches(
    workload: Workload,
    count: int,
    device: torch.device,
    seed: int = 0,
    data: tuple[Tensor, Tensor] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches ``(x [B, ...], y [B])`` on ``device`` (rotated during timing).

    Random normal inputs and uniform labels unless ``data`` (e.g. :func:`load_cifar10`) is
    given; for the MLP, real images become 28x28 grey crops (784 features); for the
    recurrent workloads, sequences of the 32 image rows (3 x 32 values each).
    """
    g = torch.Generator().manual_seed(seed)
    b = workload.batch_size
    out = []
    for k in range(count):
        if data is None:
            x = torch.randn(b, *workload.input_shape, generator=g)
            y = torch.randint(0, workload.num_classes, (b,), generator=g)
        else:
            images, labels = data
            idx = torch.arange(k * b, (k + 1) * b) % images.shape[0]
            x, y = images[idx], labels[idx]
            if workload.name == "mlp":
                x = x.mean(dim=1)[:, 2:30, 2:30].reshape(b, 784)
            elif workload.name in ("lstm", "gru"):
                x = x.permute(0, 2, 1, 3).reshape(b, 32, 96)
        out.append((x.to(device), y.to(device)))
    return out
