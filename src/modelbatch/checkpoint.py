"""Checkpoints of a whole ModelBatch: versioned folders, safetensors + JSON only.

Layout of ``save_all(batch, "ckpt")`` (format version 2, see ``docs/checkpoints.md``)::

    ckpt/latest.json                      the commit pointer: the kept versions, oldest
                                          first, each with its step and the SHA-256 and
                                          size of its manifest (and an optional HMAC)
    ckpt/v00000007/manifest.json          format version, N, model ids and folders,
                                          quarantine mask, seeds, each model's per-model
                                          settings (dropout p, norm eps, BatchNorm
                                          momentum, LeakyReLU slope), architecture fingerprint,
                                          optimizer class, scheduler states, per-model loss
                                          scales, RNG (Python/NumPy), step, extra, SHA-256
                                          and size of every other file
    ckpt/v00000007/rng.safetensors        torch CPU (and CUDA) generator states
    ckpt/v00000007/models/<id>/model.safetensors   the model's plain ``state_dict``
    ckpt/v00000007/models/<id>/batch_state.safetensors  batch-only buffers (dropout counters)
    ckpt/v00000007/models/<id>/hparams.json        its optimizer param group
    ckpt/v00000007/models/<id>/optimizer.safetensors  its slice of the optimizer state

Commit protocol (as TensorFlow's and Orbax's checkpoint managers): a save writes and
fsyncs a new version in ``ckpt/.tmp-<random>/``, renames it to the next ``vNNNNNNNN``
folder, then replaces ``latest.json`` by an atomic rename (the commit), and only then
deletes the versions beyond ``keep``. Nothing is ever stored outside ``ckpt/``; the folder
itself is never renamed or replaced (a symlinked ``ckpt`` keeps pointing where it did).

Loading reads only regular files inside the committed version (no symlink is followed, a
FIFO or device is refused without being read, every read is bounded by the recorded
size), checks the manifest against the pointer and every file against the manifest,
validates every entry, and modifies nothing unless everything is valid.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import inspect
import json
import math
import os
import random
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

if TYPE_CHECKING:
    from modelbatch.amp import BatchGradScaler
    from modelbatch.core import ModelBatch

__all__ = [
    "CheckpointError",
    "list_versions",
    "load_all",
    "load_model",
    "load_weights",
    "model_folder_name",
    "read_manifest",
    "save_all",
]

FORMAT = "modelbatch-checkpoint"
VERSION = 2
_POINTER = "latest.json"
_MANIFEST = "manifest.json"
_LOCK = ".lock"
_TMP_PREFIXES = (".tmp-", f".{_POINTER}.tmp-")
_VERSION_NAME = re.compile(r"v([0-9]{8,18})")
_RNG_FILE = "rng.safetensors"
_MODEL_FILE = "model.safetensors"
_BATCH_FILE = "batch_state.safetensors"
_OPT_FILE = "optimizer.safetensors"
_HP_FILE = "hparams.json"
_SAFE_CHARS = re.compile(r"[A-Za-z0-9_.\-]")
_INT_NAME = re.compile(r"-?[0-9]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 200
_MAX_POINTER = 1 << 20

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC | _O_BINARY
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded: missing or corrupt file, another
    architecture, another number of models, unknown model id, unsupported state."""


# ---------------------------------------------------------------------------- names
def model_folder_name(model_id: int | str) -> str:
    """The folder name of a model id: safe on every file system, unique per id.

    Integer ids become their decimal form (``3``, ``-1``). String ids keep
    ``[A-Za-z0-9_.-]`` and percent-encode every other UTF-8 byte, a leading ``.`` and,
    when the result would look like an integer, its first character; so ``..``, ``/``,
    absolute paths and NUL cannot leave the ``models`` folder, and ``3`` and ``"3"`` differ.
    """
    if isinstance(model_id, bool) or not isinstance(model_id, (int, str)):
        raise TypeError(f"model ids must be int or str, got {type(model_id).__name__}")
    if isinstance(model_id, int):
        return str(model_id)
    if model_id == "":
        raise CheckpointError("the empty string cannot be a model id in a checkpoint")
    out = []
    for k, ch in enumerate(model_id):
        if _SAFE_CHARS.fullmatch(ch) and not (k == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    name = "".join(out)
    if _INT_NAME.fullmatch(name):
        name = f"%{ord(name[0]):02X}{name[1:]}"
    if len(name) > _MAX_NAME:
        raise CheckpointError(
            f"model id {model_id!r} is too long for a folder name ({len(name)} > {_MAX_NAME} "
            "characters once escaped)"
        )
    return name


def _version_name(number: int) -> str:
    return f"v{number:08d}"


def _version_number(name: str) -> int | None:
    m = _VERSION_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- helpers
def _optimizer_kind(optimizer: Any) -> str:
    from modelbatch.optim.base import BatchOptimizer
    from modelbatch.optim.generic import PerModelOptimizer

    if isinstance(optimizer, BatchOptimizer):
        cls = type(optimizer)
        return f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(optimizer, PerModelOptimizer):
        inner = optimizer.optimizer_cls
        return f"modelbatch.optim.PerModelOptimizer[{inner.__module__}.{inner.__qualname__}]"
    raise TypeError(
        "save_all/load_all support the optimizers of modelbatch.optim (vectorised ones and "
        f"PerModelOptimizer), got {type(optimizer).__name__}"
    )


def _json_ready(value: Any, where: str) -> Any:
    """A JSON-encodable copy of ``value`` (tuples become lists) or a CheckpointError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{k}]") for k, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a string; cannot store as JSON")
            out[k] = _json_ready(v, f"{where}.{k}")
        return out
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise CheckpointError(
        f"{where} is a {type(value).__name__}, which a checkpoint cannot store (only JSON "
        "values; tensors belong in the model's state or optimizer state)"
    )


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, allow_nan=True).encode("utf-8")


def _fingerprint(batch: ModelBatch) -> dict[str, Any]:
    template: nn.Module = batch._template  # type: ignore[has-type,assignment]
    plain_keys = list(template.state_dict().keys())
    stacked = batch.stacked.state_dict()
    params = {name for name, _ in batch.stacked.named_parameters()}
    entries = []
    for name, t in stacked.items():
        entries.append(
            {
                "name": name,
                "kind": "parameter" if name in params else "buffer",
                "shape": list(t.shape[1:]),
                "dtype": str(t.dtype).removeprefix("torch."),
                "in_model": name in plain_keys,
            }
        )
    return {"tensors": entries}


def _per_model_optimizer_state(optimizer: Any, i: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Model i's optimizer state: tensors ``{"<param>/<key>": tensor}`` and JSON scalars."""
    from modelbatch.optim.base import BatchOptimizer

    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    if isinstance(optimizer, BatchOptimizer):
        items = [(name, s) for name, s in optimizer.state.items()]
        sliced = True
    else:
        views = optimizer._views[i]
        items = [
            (name, optimizer.inner.state[v])
            for name, v in zip(optimizer._names, views, strict=True)
            if v in optimizer.inner.state
        ]
        sliced = False
    for name, s in items:
        for key, v in s.items():
            full = f"{name}/{key}"
            if isinstance(v, Tensor):
                t = v[i] if sliced and v.dim() > 0 else v
                tensors[full] = t.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[full] = _json_ready(v, f"optimizer state {full!r} of model {i}")
    return tensors, scalars


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{d}"] = s
    py = random.getstate()
    np_state: Any = np.random.get_state()
    meta = {
        "cuda_devices": sum(1 for k in tensors if k.startswith("torch_cuda_")),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "name": np_state[0],
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    return tensors, meta


def _scaler_meta(batch: ModelBatch, scaler: BatchGradScaler) -> dict[str, Any]:
    """The scaler's state for the manifest: its factors and one entry per model id."""
    if getattr(scaler, "batch", None) is not batch:
        raise CheckpointError("the scaler was not built for this batch")
    state = scaler.state_dict()
    if not state:
        return {"enabled": False}
    return {
        "enabled": True,
        "growth_factor": state["growth_factor"],
        "backoff_factor": state["backoff_factor"],
        "growth_interval": state["growth_interval"],
        "per_model": {
            json.dumps(mid): {"scale": scale, "growth_tracker": tracker}
            for mid, scale, tracker in zip(
                state["model_ids"], state["scale"], state["_growth_tracker"], strict=True
            )
        },
    }


def _as_list(scheduler: Any) -> list[Any]:
    if scheduler is None:
        return []
    if isinstance(scheduler, (list, tuple)):
        return list(scheduler)
    return [scheduler]


# ---------------------------------------------------------------------------- disk
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file or a symlink) with ``data``, fsynced."""
    fd = os.open(path, _WRITE_FLAGS, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _record(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _discard(path: Path) -> None:
    """Remove ``path`` without following a symlink: a folder is first renamed to a
    temporary name (so a crash mid-removal leaves only a temporary), then deleted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if not path.name.startswith(_TMP_PREFIXES):
        doomed = path.parent / f".tmp-{uuid.uuid4().hex}"
        os.rename(path, doomed)
        path = doomed
    shutil.rmtree(path)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


@contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """One saving process per checkpoint folder (POSIX ``flock``; released if it dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer per folder is the caller's job
        yield
        return
    fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"another process is saving to {root} (it holds {root / _LOCK}); one writer "
                "per checkpoint folder"
            ) from None
        yield
    finally:
        os.close(fd)


def _checkpoint_root(directory: str | os.PathLike[str]) -> Path:
    """The real folder a checkpoint path names: symlinks (the path itself or a parent) are
    resolved once, so a save writes where a link points and never replaces the link."""
    return Path(os.path.realpath(os.fspath(directory)))


# ---------------------------------------------------------------------------- save
def save_all(
    batch: ModelBatch,
    directory: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: BatchGradScaler | None = None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 1,
    signing_key: bytes | None = None,
) -> Path:
    """Save every model of ``batch`` (and optionally its optimizer and schedulers) as a new
    version of the checkpoint folder ``directory``, atomically.

    Args:
        batch: the ModelBatch.
        directory: checkpoint folder (created if missing; a symlink is followed and stays a
            symlink). A non-empty folder that is not a checkpoint is refused.
        optimizer: a ``modelbatch.optim`` optimizer built for ``batch`` (vectorised or
            :class:`~modelbatch.optim.PerModelOptimizer`): each model's param group goes to
            its ``hparams.json``, its state slice to its ``optimizer.safetensors``.
        scheduler: an LR scheduler or a list of them; ``state_dict()`` is stored as JSON
            (``LambdaLR`` stores no lambdas: rebuild them the same way before loading).
        scaler: a :class:`~modelbatch.BatchGradScaler` built for ``batch``: each model's loss
            scale and growth tracker go to the manifest, so fp16 training resumes with them.
        step: your step or epoch counter (an int), returned by :func:`load_all`.
        extra: further JSON-encodable metadata, returned by :func:`load_all`.
        keep: how many committed versions to keep (the newest ``keep``); older ones are
            deleted after the new one is committed.
        signing_key: optional secret; the pointer then carries an HMAC-SHA256 of the
            manifest, and ``load_all(..., signing_key=...)`` refuses anything not signed
            with it (a forged or re-hashed manifest).

    Returns:
        The folder of the new version (``<directory>/vNNNNNNNN``).

    The torch CPU generator (and CUDA generators when CUDA is initialised), Python's
    ``random`` and NumPy's global generator are saved too, so a resumed run continues the
    same random streams.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise CheckpointError(f"step must be an int or None, got {step!r}")
    if signing_key is not None and not isinstance(signing_key, bytes):
        raise TypeError("signing_key must be bytes")
    kind = _optimizer_kind(optimizer) if optimizer is not None else None
    if optimizer is not None and getattr(optimizer, "batch", None) is not batch:
        raise CheckpointError("the optimizer was not built for this batch")
    scaler_meta = _scaler_meta(batch, scaler) if scaler is not None else None
    root = _checkpoint_root(directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder; refusing to replace it")
    root.mkdir(parents=True, exist_ok=True)
    _existing_entries(root)  # refuse a foreign folder before writing anything into it
    with _writer_lock(root):
        entries = _existing_entries(root)
        for name in os.listdir(root):
            if name.startswith(_TMP_PREFIXES):  # left by a crashed save: never committed
                _discard(root / name)
        used = [_version_number(e["folder"]) for e in entries]
        used += [_version_number(name) for name in os.listdir(root)]
        folder = _version_name(max([u for u in used if u is not None], default=0) + 1)
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            manifest = _write_checkpoint(
                batch, tmp, folder, optimizer, kind, _as_list(scheduler), scaler_meta, step, extra
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, root / folder)
        _fsync_dir(root)
        new_entry = {
            "folder": folder,
            "step": step,
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "manifest_size": len(manifest),
            "signature": None
            if signing_key is None
            else hmac.new(signing_key, manifest, hashlib.sha256).hexdigest(),
        }
        still_there = [e for e in entries if _is_real_dir(root / e["folder"])]
        kept = [*still_there, new_entry][-keep:]
        pointer = {"format": FORMAT, "version": VERSION, "versions": kept}
        pointer_tmp = root / f".{_POINTER}.tmp-{uuid.uuid4().hex}"
        _write_file(pointer_tmp, _json_bytes(pointer))
        os.replace(pointer_tmp, root / _POINTER)  # the commit
        _fsync_dir(root)
        keep_names = {e["folder"] for e in kept}
        for name in os.listdir(root):
            if _version_number(name) is not None and name not in keep_names:
                _discard(root / name)
    return root / folder


def _existing_entries(root: Path) -> list[dict[str, Any]]:
    """The committed versions of ``root`` (``[]`` for a new folder); refuses a folder that
    is not a version-2 checkpoint."""
    names = os.listdir(root)
    if _POINTER in names:
        with _Dir.open_root(root) as d:
            return _read_pointer(d, root)
    if _MANIFEST in names:
        raise CheckpointError(_v1_message(root))
    ours = [n for n in names if n == _LOCK or n.startswith(_TMP_PREFIXES)]
    if len(ours) != len(names) and not any(_version_number(n) is not None for n in names):
        raise CheckpointError(
            f"{root} exists and is not a ModelBatch checkpoint (no {_POINTER}); "
            "refusing to write into it"
        )
    return []


def _v1_message(root: Path) -> str:
    return (
        f"{root} holds a checkpoint in format version 1 ({_MANIFEST} at its top, no "
        f"{_POINTER}); this ModelBatch reads and writes format version {VERSION} only. Its "
        "weights stay readable with safetensors (models/<id>/model.safetensors); save to a "
        "new folder to start a version-2 checkpoint"
    )


def _write_checkpoint(
    batch: ModelBatch,
    root: Path,
    folder: str,
    optimizer: Any,
    kind: str | None,
    schedulers: list[Any],
    scaler_meta: dict[str, Any] | None,
    step: int | None,
    extra: Mapping[str, Any] | None,
) -> bytes:
    """Write one version into ``root`` (a fresh folder); returns the manifest's bytes."""
    files: dict[str, dict[str, Any]] = {}

    def write(rel: str, data: bytes) -> None:
        _write_file(root / rel, data)
        files[rel] = _record(data)

    fingerprint = _fingerprint(batch)
    in_model = {e["name"] for e in fingerprint["tensors"] if e["in_model"]}
    stacked = batch.stacked.state_dict()
    active = batch.active.cpu().tolist()
    seeds = getattr(batch, "seeds", None)
    (root / "models").mkdir()
    models_meta = []
    for i, mid in enumerate(batch.model_ids):
        name = model_folder_name(mid)
        base = f"models/{name}"
        (root / base).mkdir()
        weights = {k: v[i].detach().to("cpu", copy=True).contiguous() for k, v in stacked.items()}
        model_sd = {k: v for k, v in weights.items() if k in in_model}
        batch_sd = {k: v for k, v in weights.items() if k not in in_model}
        write(f"{base}/{_MODEL_FILE}", st_save(model_sd, metadata={"model_id": json.dumps(mid)}))
        if batch_sd:
            write(f"{base}/{_BATCH_FILE}", st_save(batch_sd))
        if optimizer is not None:
            tensors, scalars = _per_model_optimizer_state(optimizer, i)
            write(
                f"{base}/{_OPT_FILE}", st_save(tensors, metadata={"scalars": json.dumps(scalars)})
            )
            group = {k: v for k, v in optimizer.param_groups[i].items() if k != "params"}
            group["model_id"] = mid
            write(f"{base}/{_HP_FILE}", _json_bytes(_json_ready(group, f"param group of {mid!r}")))
        _fsync_dir(root / base)
        models_meta.append(
            {
                "id": mid,
                "folder": name,
                "active": bool(active[i]),
                "seed": None if seeds is None else int(seeds[i]),
                "settings": _json_ready(
                    batch._current_settings(i), f"per-model settings of model {mid!r}"
                ),
            }
        )
    _fsync_dir(root / "models")
    sched_meta = [
        {
            "class": f"{type(s).__module__}.{type(s).__qualname__}",
            "state": _json_ready(s.state_dict(), f"state of scheduler {k} ({type(s).__name__})"),
        }
        for k, s in enumerate(schedulers)
    ]
    rng_tensors, rng_meta = _rng_state()
    write(_RNG_FILE, st_save(rng_tensors))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "folder": folder,
        "num_models": len(batch),
        "models": models_meta,
        "architecture": fingerprint,
        "optimizer": kind,
        "schedulers": sched_meta,
        "scaler": scaler_meta,
        "rng": rng_meta,
        "step": step,
        "extra": _json_ready(dict(extra or {}), "extra"),
        "torch_version": torch.__version__,
        "files": files,
    }
    data = _json_bytes(manifest)
    _write_file(root / _MANIFEST, data)
    _fsync_dir(root)
    return data


# ---------------------------------------------------------------------------- read
class _Dir:
    """A folder read without following symlinks: an open descriptor where the platform
    has ``dir_fd`` (so a folder swapped for a link meanwhile is not followed either),
    else ``lstat`` checks on paths."""

    def __init__(self, path: Path, fd: int | None, stack: ExitStack) -> None:
        self.path = path
        self.fd = fd
        self._stack = stack

    @classmethod
    @contextmanager
    def open_root(cls, root: Path) -> Iterator[_Dir]:
        with ExitStack() as stack:
            fd = None
            if _DIR_FD:
                try:
                    fd = os.open(root, _DIR_FLAGS)
                except FileNotFoundError:
                    raise CheckpointError(f"no checkpoint at {root}") from None
                except OSError as e:
                    raise CheckpointError(
                        f"cannot open the checkpoint folder {root}: {e}"
                    ) from None
                stack.callback(os.close, fd)
            elif not root.is_dir():
                raise CheckpointError(f"no checkpoint at {root}")
            yield cls(root, fd, stack)

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            if self.fd is not None:
                return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return os.lstat(self.path / name)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self._lstat(name) is not None

    def _open(self, name: str, flags: int, want_dir: bool) -> int | None:
        where = self.path / name
        st = self._lstat(name)
        if st is None:
            raise CheckpointError(f"missing {'folder' if want_dir else 'file'} {where}")
        _check_kind(st, want_dir, where)
        if self.fd is None and want_dir:
            return None
        try:
            if self.fd is not None:
                fd = os.open(name, flags, dir_fd=self.fd)
            else:
                fd = os.open(where, flags)
        except OSError as e:  # e.g. ELOOP: replaced by a symlink since the lstat
            raise CheckpointError(f"cannot open {where}: {e}") from None
        _check_kind(os.fstat(fd), want_dir, where, fd)
        return fd

    def sub(self, name: str) -> _Dir:
        """The child folder ``name`` (refused when it is a symlink or not a folder)."""
        fd = self._open(name, _DIR_FLAGS, True)
        if fd is not None:
            self._stack.callback(os.close, fd)
        return _Dir(self.path / name, fd, self._stack)

    def read(
        self,
        name: str,
        size: int | None,
        limit: int = _MAX_POINTER,
        recorded_by: str = "the manifest",
    ) -> bytes:
        """The bytes of the regular file ``name``: exactly ``size`` of them (or, without a
        recorded size, at most ``limit``); nothing else is read."""
        where = self.path / name
        fd = self._open(name, _READ_FLAGS, False)
        assert fd is not None
        try:
            actual = os.fstat(fd).st_size
            if size is None:
                if actual > limit:
                    raise CheckpointError(f"{where} has {actual} bytes; at most {limit} expected")
                size = actual
            elif actual != size:
                raise CheckpointError(
                    f"{where} is corrupt: it has {actual} bytes, {recorded_by} records {size}"
                )
            chunks = []
            left = size
            while left:
                chunk = os.read(fd, min(left, 1 << 24))
                if not chunk:
                    raise CheckpointError(f"{where} shrank while being read")
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as e:
            raise CheckpointError(f"cannot read {where}: {e}") from None
        finally:
            os.close(fd)


def _check_kind(st: os.stat_result, want_dir: bool, where: Path, fd: int | None = None) -> None:
    mode = st.st_mode
    problem = None
    if stat.S_ISLNK(mode):
        problem = (
            "is a symbolic link; a checkpoint is read only from regular files inside its folder"
        )
    elif want_dir and not stat.S_ISDIR(mode):
        problem = "is not a folder"
    elif not want_dir and not stat.S_ISREG(mode):
        what = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else "not a regular file"
        )
        problem = f"is {what}; a checkpoint is read only from regular files"
    if problem is not None:
        if fd is not None:
            os.close(fd)
        raise CheckpointError(f"{where} {problem}")


def _loads(data: bytes, where: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None


def _read_pointer(root_dir: _Dir, root: Path) -> list[dict[str, Any]]:
    where = root / _POINTER
    pointer = _loads(root_dir.read(_POINTER, None), where)
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a ModelBatch checkpoint pointer")
    if pointer.get("version") != VERSION:
        raise CheckpointError(
            f"{where} has format version {pointer.get('version')!r}; this ModelBatch reads "
            f"format version {VERSION}"
        )
    versions = pointer.get("versions")
    if not isinstance(versions, list) or not versions:
        _need(False, where, "versions", "a non-empty list")
    assert isinstance(versions, list)
    seen = set()
    for k, e in enumerate(versions):
        field = f"versions[{k}]"
        _need(isinstance(e, dict), where, field, "an object")
        folder = e.get("folder")
        _need(
            isinstance(folder, str) and _version_number(folder) is not None,
            where,
            f"{field}.folder",
            "a version folder name vNNNNNNNN",
        )
        _need(folder not in seen, where, f"{field}.folder", "unique")
        seen.add(folder)
        _need(
            e.get("step") is None or _is_int(e.get("step")),
            where,
            f"{field}.step",
            "an int or null",
        )
        _need(
            isinstance(e.get("manifest_sha256"), str)
            and _HEX64.fullmatch(e["manifest_sha256"]) is not None,
            where,
            f"{field}.manifest_sha256",
            "a SHA-256 hex digest",
        )
        _need(
            _is_int(e.get("manifest_size")) and 0 < e["manifest_size"] <= 1 << 30,
            where,
            f"{field}.manifest_size",
            "a positive int",
        )
        sig = e.get("signature")
        _need(
            sig is None or (isinstance(sig, str) and _HEX64.fullmatch(sig) is not None),
            where,
            f"{field}.signature",
            "null or an HMAC-SHA256 hex digest",
        )
    return versions


def _need(ok: bool, where: Path | str, field: str, expected: str) -> None:
    if not ok:
        raise CheckpointError(f"{where} is malformed: {field} must be {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Version:
    """One committed version, opened for reading: its verified, validated manifest and
    checked reads of its files."""

    def __init__(self, d: _Dir, manifest: dict[str, Any], entry: dict[str, Any]) -> None:
        self.dir = d
        self.path = d.path
        self.manifest = manifest
        self.entry = entry

    def read(self, rel: str, what: str) -> bytes:
        record = self.manifest["files"].get(rel)
        where = self.path / rel
        if record is None:
            raise CheckpointError(f"{where} ({what}) is not listed in the manifest")
        *folders, name = rel.split("/")
        d = self.dir
        for part in folders:
            d = d.sub(part)
        data = d.read(name, record["size"])
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CheckpointError(
                f"{where} ({what}) is corrupt: its SHA-256 does not match the manifest"
            )
        return data

    def tensors(self, rel: str, what: str) -> dict[str, Tensor]:
        return _safetensors(self.read(rel, what), self.path / rel, what)


def _safetensors(data: bytes, where: Path, what: str) -> dict[str, Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where} ({what}) is not a valid safetensors file: {e}") from None


@contextmanager
def _open_version(
    directory: str | os.PathLike[str], version: int | None, signing_key: bytes | None
) -> Iterator[_Version]:
    root = _checkpoint_root(directory)
    with _Dir.open_root(root) as d:
        if not d.exists(_POINTER):
            if d.exists(_MANIFEST):
                raise CheckpointError(_v1_message(root))
            found = sorted(n for n in os.listdir(root) if _version_number(n) is not None)
            hint = (
                f"; it holds uncommitted or orphaned version folders {found} (pass version= to "
                "load one of them only if you know it is complete)"
                if found
                else ""
            )
            raise CheckpointError(f"no checkpoint at {root}: {_POINTER} is missing{hint}")
        entries = _read_pointer(d, root)
        if version is None:
            entry = entries[-1]
        else:
            if isinstance(version, bool) or not isinstance(version, int):
                raise TypeError(f"version must be an int, got {version!r}")
            matches = [e for e in entries if _version_number(e["folder"]) == version]
            entry = matches[0] if matches else _orphan_entry(d, root, version)
        folder = entry["folder"]
        if not d.exists(folder):
            raise CheckpointError(
                f"the committed version {root / folder} is missing (deleted?); an older "
                f"version is not loaded in its place. Kept versions: "
                f"{[_version_number(e['folder']) for e in entries]}; pass version= to load one"
            )
        vdir = d.sub(folder)
        where = vdir.path / _MANIFEST
        data = vdir.read(_MANIFEST, entry["manifest_size"], recorded_by=str(root / _POINTER))
        if entry["manifest_sha256"] is not None and (
            hashlib.sha256(data).hexdigest() != entry["manifest_sha256"]
        ):
            raise CheckpointError(
                f"{where} is corrupt or was edited: its SHA-256 does not match {root / _POINTER}"
            )
        if signing_key is not None:
            sig = entry.get("signature")
            good = hmac.new(signing_key, data, hashlib.sha256).hexdigest()
            if sig is None or not hmac.compare_digest(sig, good):
                raise CheckpointError(
                    f"{where} is not signed with the given signing_key "
                    f"({'no signature' if sig is None else 'wrong signature'}); refusing it"
                )
        manifest = _loads(data, where)
        _check_manifest(manifest, where, folder)
        yield _Version(vdir, manifest, entry)


def _orphan_entry(d: _Dir, root: Path, version: int) -> dict[str, Any]:
    """An explicitly requested version that the pointer does not list (no manifest
    digest to check it against: only its files' checksums are verified)."""
    folder = _version_name(version)
    if not d.exists(folder):
        raise CheckpointError(f"no version {version} in the checkpoint at {root}")
    st = d.sub(folder)._lstat(_MANIFEST)
    if st is None:
        raise CheckpointError(f"version {version} at {root} is incomplete: no {_MANIFEST}")
    return {
        "folder": folder,
        "step": None,
        "manifest_sha256": None,
        "manifest_size": int(st.st_size),
        "signature": None,
    }


def list_versions(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The committed versions of a checkpoint folder, oldest first:
    ``[{"version": 7, "step": 70, "path": Path(".../v00000007")}, ...]``."""
    root = _checkpoint_root(directory)
    with _Dir.open_root(root) as d:
        if not d.exists(_POINTER):
            if d.exists(_MANIFEST):
                raise CheckpointError(_v1_message(root))
            return []
        entries = _read_pointer(d, root)
    return [
        {"version": _version_number(e["folder"]), "step": e["step"], "path": root / e["folder"]}
        for e in entries
    ]


def read_manifest(
    directory: str | os.PathLike[str], *, version: int | None = None
) -> dict[str, Any]:
    """The verified and validated ``manifest.json`` of the latest (or given) version."""
    with _open_version(directory, version, None) as v:
        return v.manifest


# ---------------------------------------------------------------------------- manifest
def _check_manifest(m: Any, where: Path, folder: str) -> None:
    """Validate every entry of a manifest (types, ranges, consistency) or raise a
    CheckpointError naming the field; run before anything is read into a batch."""
    _need(isinstance(m, dict), where, "the manifest", "a JSON object")
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a ModelBatch checkpoint manifest")
    if m.get("version") != VERSION:
        raise CheckpointError(
            f"{where} has format version {m.get('version')!r}; this ModelBatch reads "
            f"format version {VERSION}"
        )
    _need(m.get("folder") == folder, where, "folder", f"{folder!r} (the version it is in)")
    models = m.get("models")
    _need(isinstance(models, list) and len(models) > 0, where, "models", "a non-empty list")
    _need(m.get("num_models") == len(models), where, "num_models", f"{len(models)}")
    ids = []
    for k, e in enumerate(models):
        f = f"models[{k}]"
        _need(isinstance(e, dict), where, f, "an object")
        mid = e.get("id")
        _need(
            _is_int(mid) or (isinstance(mid, str) and mid != ""),
            where,
            f"{f}.id",
            "an int or a non-empty string",
        )
        _need(
            e.get("folder") == model_folder_name(mid),
            where,
            f"{f}.folder",
            f"{model_folder_name(mid)!r} (the folder of id {mid!r})",
        )
        _need(isinstance(e.get("active"), bool), where, f"{f}.active", "true or false")
        seed = e.get("seed")
        _need(
            seed is None or (_is_int(seed) and seed >= 0),
            where,
            f"{f}.seed",
            "null or a non-negative int",
        )
        _check_settings_meta(e.get("settings"), where, f"{f}.settings")
        ids.append(mid)
    _need(len(set(map(json.dumps, ids))) == len(ids), where, "models[].id", "unique")
    arch = m.get("architecture")
    _need(
        isinstance(arch, dict) and isinstance(arch.get("tensors"), list),
        where,
        "architecture.tensors",
        "a list",
    )
    names = set()
    for k, e in enumerate(arch["tensors"]):
        f = f"architecture.tensors[{k}]"
        _need(
            isinstance(e, dict) and isinstance(e.get("name"), str), where, f"{f}.name", "a string"
        )
        _need(e["name"] not in names, where, f"{f}.name", "unique")
        names.add(e["name"])
        _need(
            e.get("kind") in ("parameter", "buffer"), where, f"{f}.kind", "'parameter' or 'buffer'"
        )
        shape = e.get("shape")
        _need(
            isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape),
            where,
            f"{f}.shape",
            "a list of non-negative ints",
        )
        _need(isinstance(e.get("dtype"), str), where, f"{f}.dtype", "a string")
        _need(isinstance(e.get("in_model"), bool), where, f"{f}.in_model", "true or false")
    _need(
        m.get("optimizer") is None or isinstance(m.get("optimizer"), str),
        where,
        "optimizer",
        "null or a class name",
    )
    scheds = m.get("schedulers")
    _need(isinstance(scheds, list), where, "schedulers", "a list")
    for k, s in enumerate(scheds):
        _need(
            isinstance(s, dict)
            and isinstance(s.get("class"), str)
            and isinstance(s.get("state"), dict),
            where,
            f"schedulers[{k}]",
            "an object with a 'class' string and a 'state' object",
        )
    _check_scaler_meta(m.get("scaler"), ids, where)
    _check_rng_meta(m.get("rng"), where)
    _need(m.get("step") is None or _is_int(m.get("step")), where, "step", "null or an int")
    _need(isinstance(m.get("extra"), dict), where, "extra", "an object")
    files = m.get("files")
    _need(isinstance(files, dict), where, "files", "an object")
    allowed = {_RNG_FILE} | {
        f"models/{model_folder_name(mid)}/{name}"
        for mid in ids
        for name in (_MODEL_FILE, _BATCH_FILE, _OPT_FILE, _HP_FILE)
    }
    for rel, rec in files.items():
        _need(rel in allowed, where, f"files[{rel!r}]", "a file of this checkpoint's layout")
        _need(
            isinstance(rec, dict)
            and isinstance(rec.get("sha256"), str)
            and _HEX64.fullmatch(rec["sha256"]) is not None
            and _is_int(rec.get("size"))
            and rec["size"] >= 0,
            where,
            f"files[{rel!r}]",
            "an object with a 'sha256' hex digest and a non-negative 'size'",
        )


def _check_settings_meta(s: Any, where: Path, field: str) -> None:
    """A model's per-model settings: absent (``None``, a checkpoint written before they
    were recorded) or ``{submodule path: {attribute: number or null}}``."""
    if s is None:
        return
    _need(isinstance(s, dict), where, field, "an object of submodule paths")
    for path, attrs in s.items():
        _need(
            isinstance(attrs, dict)
            and len(attrs) > 0
            and all(v is None or _is_number(v) for v in attrs.values()),
            where,
            f"{field}[{path!r}]",
            "a non-empty object of attribute: number or null",
        )


def _check_scaler_meta(s: Any, ids: list[Any], where: Path) -> None:
    if s is None:
        return
    _need(
        isinstance(s, dict) and isinstance(s.get("enabled"), bool),
        where,
        "scaler.enabled",
        "true or false",
    )
    if not s["enabled"]:
        return
    for name in ("growth_factor", "backoff_factor"):
        v = s.get(name)
        _need(
            _is_number(v) and math.isfinite(v) and v > 0,
            where,
            f"scaler.{name}",
            "a finite positive number",
        )
    gi = s.get("growth_interval")
    _need(_is_int(gi) and gi > 0, where, "scaler.growth_interval", "a positive int")
    per = s.get("per_model")
    keys = {json.dumps(mid) for mid in ids}
    _need(
        isinstance(per, dict) and set(per) == keys,
        where,
        "scaler.per_model",
        f"an object with one entry per model id {sorted(keys)}",
    )
    for key, e in per.items():
        _need(
            isinstance(e, dict)
            and _is_number(e.get("scale"))
            and math.isfinite(e["scale"])
            and e["scale"] > 0,
            where,
            f"scaler.per_model[{key}].scale",
            "a finite positive number",
        )
        _need(
            _is_int(e.get("growth_tracker")) and e["growth_tracker"] >= 0,
            where,
            f"scaler.per_model[{key}].growth_tracker",
            "a non-negative int",
        )


def _check_rng_meta(r: Any, where: Path) -> None:
    _need(isinstance(r, dict), where, "rng", "an object")
    cuda = r.get("cuda_devices")
    _need(_is_int(cuda) and cuda >= 0, where, "rng.cuda_devices", "a non-negative int")
    py = r.get("python")
    _need(
        isinstance(py, list) and len(py) == 3 and isinstance(py[1], list),
        where,
        "rng.python",
        "[version, [state ints], gauss]",
    )
    try:
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
    except (TypeError, ValueError, OverflowError, IndexError) as e:
        raise CheckpointError(
            f"{where} is malformed: rng.python is not a Python random state: {e}"
        ) from None
    nps = r.get("numpy")
    _need(isinstance(nps, dict), where, "rng.numpy", "an object")
    try:
        keys = nps["keys"]
        _need(
            isinstance(keys, list) and all(_is_int(k) and 0 <= k < 2**32 for k in keys),
            where,
            "rng.numpy.keys",
            "a list of uint32",
        )
        for name in ("pos", "has_gauss"):
            _need(_is_int(nps[name]), where, f"rng.numpy.{name}", "an int")
        _need(_is_number(nps["cached_gaussian"]), where, "rng.numpy.cached_gaussian", "a number")
        np.random.RandomState().set_state(
            (
                nps["name"],
                np.asarray(keys, dtype=np.uint32),
                nps["pos"],
                nps["has_gauss"],
                nps["cached_gaussian"],
            )
        )
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
        raise CheckpointError(
            f"{where} is malformed: rng.numpy is not a NumPy random state: {e!r}"
        ) from None


def _check_like(saved: Any, current: Any, where: str, none_matches: bool = True) -> Any:
    """``saved`` (from JSON) shaped like ``current`` (the live object's state): same keys,
    same list lengths, same kinds of scalars; returns it with tuples where ``current``
    has tuples. ``None`` on either side matches anything unless ``none_matches`` is off
    (then only ``current`` may be None). Raises CheckpointError naming the field."""
    if current is None or (saved is None and none_matches):
        return saved
    if isinstance(current, bool):
        ok = isinstance(saved, bool)
    elif _is_number(current):
        ok = _is_number(saved)
    elif isinstance(current, str):
        ok = isinstance(saved, str)
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            n = len(saved) if isinstance(saved, list) else type(saved).__name__
            raise CheckpointError(f"{where}: expected a list of {len(current)} entries, got {n}")
        out = [
            _check_like(s, c, f"{where}[{k}]", none_matches)
            for k, (s, c) in enumerate(zip(saved, current, strict=True))
        ]
        return tuple(out) if isinstance(current, tuple) else out
    elif isinstance(current, Mapping):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{where}: expected an object, got {type(saved).__name__}")
        missing = sorted(set(map(str, current)) - set(saved))
        unexpected = sorted(set(saved) - set(map(str, current)))
        if missing or unexpected:
            raise CheckpointError(f"{where}: missing entries {missing}, unexpected {unexpected}")
        return {
            k: _check_like(saved[str(k)], v, f"{where}.{k}", none_matches)
            for k, v in current.items()
        }
    else:
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: expected a {type(current).__name__}, got {saved!r}")
    return saved


def _check_hparams(
    optimizer: Any, i: int, mid: int | str, group: Any, where: Path
) -> dict[str, Any]:
    """Model ``mid``'s param group from ``hparams.json``, checked as the optimizer's
    constructor checks its arguments (types, ranges, NaN), for position ``i``."""
    from modelbatch.optim.base import _PAIR_HPARAMS, BatchOptimizer

    if not isinstance(group, dict) or group.get("model_id") != mid:
        raise CheckpointError(f"{where} does not belong to model {mid!r}")
    current = {k: v for k, v in optimizer.param_groups[i].items() if k != "params"}
    missing = sorted(set(current) - set(group))
    unexpected = sorted(set(group) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"{where} (model {mid!r}) does not fit {type(optimizer).__name__}: missing "
            f"hyper-parameters {missing}, unexpected {unexpected}"
        )
    out: dict[str, Any] = {"model_id": mid}
    for k, cur in current.items():
        if k == "model_id":
            continue
        v = group[k]
        field = f"{where} (model {mid!r}), hyper-parameter {k!r}"
        if isinstance(optimizer, BatchOptimizer) and k in _PAIR_HPARAMS:
            cur = (0.0, 0.0)
        elif isinstance(optimizer, BatchOptimizer) and k in optimizer._float_hparams:
            cur = 0.0
        v = _check_like(v, cur, field, none_matches=False)
        flat = list(v) if isinstance(v, (list, tuple)) else [v]
        for x in flat:
            if _is_number(x) and not math.isfinite(x):
                raise CheckpointError(f"{field} is {x!r}; hyper-parameters must be finite")
        out[k] = v
    try:
        if isinstance(optimizer, BatchOptimizer):
            optimizer._validate({k: v for k, v in out.items()}, i)
        else:
            # The constructor validates its keyword arguments (not param-group entries).
            like = next(p for _, p in optimizer.batch.stacked_parameters())
            dummy = torch.zeros(1, dtype=like.dtype, device=like.device, requires_grad=True)
            accepted = inspect.signature(optimizer.optimizer_cls).parameters
            kwargs = {k: v for k, v in out.items() if k in accepted and k != "params"}
            optimizer.optimizer_cls([dummy], **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{where} (model {mid!r}) has invalid hyper-parameters: {e}"
        ) from None
    return out


# ---------------------------------------------------------------------------- load
def load_all(
    batch: ModelBatch,
    directory: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: BatchGradScaler | None = None,
    model_ids: Sequence[int | str] | None = None,
    restore_rng: bool = True,
    version: int | None = None,
    signing_key: bytes | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_all` into ``batch`` (in place).

    Everything is read and checked before anything in ``batch``, the optimizer, the
    schedulers, the scaler or the RNG changes; on any problem a :class:`CheckpointError`
    is raised and nothing is modified (all or nothing).

    Args:
        batch: a ModelBatch with the checkpoint's architecture.
        directory: the checkpoint folder.
        optimizer: restore this optimizer (same class as the saved one) from each model's
            ``hparams.json`` and ``optimizer.safetensors``.
        scheduler: a scheduler or list of schedulers (same classes and number as saved).
        scaler: a :class:`~modelbatch.BatchGradScaler` of ``batch``: restores each loaded
            model's loss scale and growth tracker (the checkpoint must have been saved with
            ``scaler=``).
        model_ids: which saved models to load into positions ``0..N-1`` of ``batch``; the
            batch then carries these ids. By default the batch's own ids, which must all be
            in the checkpoint, which must hold exactly N models.
        restore_rng: also restore the torch CPU (and CUDA, same device count) generator,
            Python's ``random`` and NumPy's global generator.
        version: load this kept version (see :func:`list_versions`) instead of the latest.
        signing_key: refuse the checkpoint unless its manifest is signed with this key
            (see :func:`save_all`).

    Returns:
        ``{"step": ..., "extra": {...}, "model_ids": [...], "version": int, "manifest": {...}}``.
    """
    with _open_version(directory, version, signing_key) as ck:
        plan = _plan_load(batch, ck, optimizer, _as_list(scheduler), scaler, model_ids, restore_rng)
    _commit_load(batch, optimizer, _as_list(scheduler), scaler, restore_rng, plan)
    m = ck.manifest
    return {
        "step": m["step"],
        "extra": m["extra"],
        "model_ids": plan["ids"],
        "version": _version_number(m["folder"]),
        "manifest": m,
    }


def _plan_load(
    batch: ModelBatch,
    ck: _Version,
    optimizer: Any,
    schedulers: list[Any],
    scaler: Any,
    model_ids: Sequence[int | str] | None,
    restore_rng: bool,
) -> dict[str, Any]:
    """Read and check everything a load needs; modifies nothing."""
    manifest = ck.manifest
    root = ck.path
    n = len(batch)
    saved_ids = [m["id"] for m in manifest["models"]]
    by_id = {json.dumps(m["id"]): m for m in manifest["models"]}
    if model_ids is None:
        if len(saved_ids) != n:
            raise CheckpointError(
                f"the checkpoint at {root} holds {len(saved_ids)} models, the batch {n}; "
                "pass model_ids=[...] to load some of them"
            )
        ids = list(batch.model_ids)
    else:
        ids = list(model_ids)
        if len(ids) != n:
            raise CheckpointError(f"model_ids names {len(ids)} models for a batch of {n}")
        if len(set(ids)) != n:
            raise CheckpointError(f"model_ids must be unique, got {ids}")
    unknown = [mid for mid in ids if json.dumps(mid) not in by_id]
    if unknown:
        raise CheckpointError(
            f"model id(s) {unknown} are not in the checkpoint at {root}; it holds {saved_ids}"
        )

    mine = _fingerprint(batch)["tensors"]
    _compare_architecture(mine, manifest["architecture"]["tensors"], root)
    expected = {e["name"]: e for e in mine}
    for i, mid in enumerate(ids):
        _check_slot_settings(batch, i, mid, by_id[json.dumps(mid)].get("settings"), root)

    if optimizer is not None:
        kind = _optimizer_kind(optimizer)
        if getattr(optimizer, "batch", None) is not batch:
            raise CheckpointError("the optimizer was not built for this batch")
        if manifest["optimizer"] is None:
            raise CheckpointError(f"the checkpoint at {root} has no optimizer state")
        if manifest["optimizer"] != kind:
            raise CheckpointError(
                f"the checkpoint's optimizer is {manifest['optimizer']}, the given one is {kind}"
            )
    saved_sched = manifest["schedulers"]
    sched_states = []
    if schedulers:
        if ids != saved_ids:
            raise CheckpointError(
                "schedulers can only be restored when loading every saved model in its saved "
                f"order ({saved_ids})"
            )
        if len(schedulers) != len(saved_sched):
            raise CheckpointError(
                f"the checkpoint has {len(saved_sched)} scheduler(s), {len(schedulers)} given"
            )
        for k, (s, saved) in enumerate(zip(schedulers, saved_sched, strict=True)):
            cls = f"{type(s).__module__}.{type(s).__qualname__}"
            if cls != saved["class"]:
                raise CheckpointError(
                    f"scheduler {k} is a {cls}, the checkpoint has {saved['class']}"
                )
            sched_states.append(
                _check_like(
                    saved["state"], s.state_dict(), f"{root / _MANIFEST}: schedulers[{k}].state"
                )
            )

    scaler_state = None
    if scaler is not None:
        if getattr(scaler, "batch", None) is not batch:
            raise CheckpointError("the scaler was not built for this batch")
        scaler_state = _scaler_state(manifest["scaler"], scaler, ids, root)

    per_model: list[dict[str, Tensor]] = []
    groups: list[dict[str, Any]] = []
    opt_tensors: list[dict[str, Tensor]] = []
    opt_scalars: list[dict[str, Any]] = []
    for i, mid in enumerate(ids):
        folder = by_id[json.dumps(mid)]["folder"]
        base = f"models/{folder}"
        what = f"model {mid!r}"
        weights = ck.tensors(f"{base}/{_MODEL_FILE}", what)
        if any(not e["in_model"] for e in mine):
            weights.update(ck.tensors(f"{base}/{_BATCH_FILE}", what))
        missing = sorted(set(expected) - set(weights))
        extra_keys = sorted(set(weights) - set(expected))
        if missing or extra_keys:
            raise CheckpointError(
                f"{what}: the saved tensors do not match the batch: missing {missing}, "
                f"unexpected {extra_keys}"
            )
        for name, t in weights.items():
            e = expected[name]
            if list(t.shape) != e["shape"] or str(t.dtype).removeprefix("torch.") != e["dtype"]:
                raise CheckpointError(
                    f"{what}, tensor {name!r}: saved shape {tuple(t.shape)} dtype {t.dtype}, "
                    f"the batch expects shape {tuple(e['shape'])} dtype {e['dtype']}"
                )
        per_model.append(weights)
        if optimizer is not None:
            rel = f"{base}/{_OPT_FILE}"
            data = ck.read(rel, f"{what} optimizer state")
            opt_tensors.append(_safetensors(data, root / rel, what))
            try:
                scalars = json.loads(_read_metadata(data).get("scalars", "{}"))
            except (ValueError, UnicodeDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{root / rel} ({what}) has bad metadata: {e}") from None
            if not isinstance(scalars, dict):
                raise CheckpointError(f"{root / rel} ({what}): scalars must be an object")
            opt_scalars.append(scalars)
            hp_rel = f"{base}/{_HP_FILE}"
            group = _loads(ck.read(hp_rel, f"{what} hyper-parameters"), root / hp_rel)
            groups.append(_check_hparams(optimizer, i, mid, group, root / hp_rel))
    rng_tensors = _check_rng_tensors(ck, manifest["rng"]) if restore_rng else {}
    opt_state = (
        _build_optimizer_state(optimizer, ids, groups, opt_tensors, opt_scalars)
        if optimizer is not None
        else None
    )
    return {
        "ids": ids,
        "weights": per_model,
        "active": [bool(by_id[json.dumps(mid)]["active"]) for mid in ids],
        "seeds": [by_id[json.dumps(mid)]["seed"] for mid in ids],
        "opt_state": opt_state,
        "sched_states": sched_states,
        "scaler_state": scaler_state,
        "rng_tensors": rng_tensors,
        "rng_meta": manifest["rng"],
    }


class _Absent:
    """Stands for a per-model setting that one side does not have."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _settings_differences(
    have: Mapping[str, Mapping[str, Any]], saved: Mapping[str, Mapping[str, Any]]
) -> Iterator[tuple[str, str, Any, Any]]:
    """``(submodule path, attribute, value in have, saved value)`` for every per-model
    setting that differs (``_ABSENT`` where one side lacks it)."""
    from modelbatch._structure import same_setting

    absent = _ABSENT
    for path in [*have, *(p for p in saved if p not in have)]:
        mine, theirs = have.get(path, {}), saved.get(path, {})
        for attr in [*mine, *(a for a in theirs if a not in mine)]:
            a, b = mine.get(attr, absent), theirs.get(attr, absent)
            if a is absent or b is absent or not same_setting(a, b):
                yield path, attr, a, b


def _check_slot_settings(
    batch: ModelBatch, i: int, mid: int | str, saved: Any, root: Path
) -> None:
    """Refuse to load saved model ``mid`` into position ``i`` unless the slot runs the
    model's own per-model settings (dropout p, norm eps, BatchNorm momentum, LeakyReLU
    slope). ``saved`` is ``None`` for a checkpoint that did not record them: not checked."""
    if saved is None:
        return
    have = batch._current_settings(i)
    for path, attr, value, saved_value in _settings_differences(have, saved):
        sub = dict(batch.stacked.named_modules()).get(path)
        cls = f" ({type(sub).__name__})" if sub is not None else ""
        raise CheckpointError(
            f"cannot load model {mid!r} of the checkpoint at {root} into position {i} of the "
            f"batch: submodule {path or '<root>'!r}{cls}, attribute {attr!r} is "
            f"{saved_value!r} in the checkpoint where the batch's model at that position "
            f"(id {batch.model_ids[i]!r}) was built with {value!r}. Per-model settings are "
            "fixed when a batch is built: build the batch from models with the saved "
            "settings (modelbatch.load_model gives each saved model with its own), or load "
            "into the position that has them (model_ids=[...])"
        )


def _check_rng_tensors(ck: _Version, meta: Mapping[str, Any]) -> dict[str, Tensor]:
    where = ck.path / _RNG_FILE
    tensors = ck.tensors(_RNG_FILE, "RNG state")
    n_cuda = meta["cuda_devices"]
    want = {"torch_cpu"} | {f"torch_cuda_{d}" for d in range(n_cuda)}
    if set(tensors) != want:
        raise CheckpointError(
            f"{where} holds {sorted(tensors)}, the manifest implies {sorted(want)}"
        )
    for name, t in tensors.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise CheckpointError(
                f"{where}: {name} must be a 1-d uint8 tensor, got {t.dtype} {tuple(t.shape)}"
            )
    try:
        torch.Generator().set_state(tensors["torch_cpu"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{where}: torch_cpu is not a CPU generator state: {e}") from None
    if _restores_cuda(n_cuda):
        for d in range(n_cuda):
            if tensors[f"torch_cuda_{d}"].numel() != torch.cuda.get_rng_state(d).numel():
                raise CheckpointError(f"{where}: torch_cuda_{d} is not a CUDA generator state")
    return tensors


def _restores_cuda(n_cuda: int) -> bool:
    return bool(n_cuda) and torch.cuda.is_available() and torch.cuda.device_count() == n_cuda


def _commit_load(
    batch: ModelBatch,
    optimizer: Any,
    schedulers: list[Any],
    scaler: Any,
    restore_rng: bool,
    plan: dict[str, Any],
) -> None:
    """Write a checked plan into the live objects; on any failure restore what was there."""
    before = _snapshot(batch, optimizer, schedulers, scaler)
    try:
        _apply(batch, optimizer, schedulers, scaler, restore_rng, plan)
    except Exception as e:
        try:
            _apply(batch, optimizer, schedulers, scaler, True, before)
        except Exception as undo:
            raise CheckpointError(
                f"loading failed ({e!r}) and undoing it failed too ({undo!r}): the batch, "
                "optimizer, schedulers or scaler may be inconsistent; rebuild them"
            ) from e
        raise CheckpointError(f"loading failed and was undone: {e!r}") from e


def _snapshot(
    batch: ModelBatch, optimizer: Any, schedulers: list[Any], scaler: Any
) -> dict[str, Any]:
    stacked = batch.stacked.state_dict()
    n = len(batch)
    return {
        "ids": batch.model_ids,
        "weights": [{k: v[i].clone() for k, v in stacked.items()} for i in range(n)],
        "active": batch.active.tolist(),
        "seeds": [None] * n if batch.seeds is None else list(batch.seeds),
        "opt_state": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        "sched_states": [copy.deepcopy(s.state_dict()) for s in schedulers],
        "scaler_state": None if scaler is None else copy.deepcopy(scaler.state_dict()),
        "rng_tensors": {"torch_cpu": torch.get_rng_state()},
        "rng_meta": None,
        "rng_python": random.getstate(),
        "rng_numpy": np.random.get_state(),
    }


def _apply(
    batch: ModelBatch,
    optimizer: Any,
    schedulers: list[Any],
    scaler: Any,
    restore_rng: bool,
    plan: dict[str, Any],
) -> None:
    with torch.no_grad():
        for name, stacked in batch.stacked.state_dict(keep_vars=True).items():
            for i, weights in enumerate(plan["weights"]):
                stacked[i].copy_(weights[name])
        batch.active.copy_(torch.tensor(plan["active"], dtype=torch.bool))
    batch._model_ids = list(plan["ids"])
    if getattr(batch, "seeds", None) is not None and all(s is not None for s in plan["seeds"]):
        batch.seeds = [int(s) for s in plan["seeds"]]
    if optimizer is not None and plan["opt_state"] is not None:
        optimizer.load_state_dict(plan["opt_state"])
    for s, state in zip(schedulers, plan["sched_states"], strict=False):
        s.load_state_dict(state)
    if scaler is not None and plan["scaler_state"]:
        scaler.load_state_dict(plan["scaler_state"])
    if restore_rng:
        if plan["rng_meta"] is None:  # an undo: the states taken by _snapshot
            torch.set_rng_state(plan["rng_tensors"]["torch_cpu"])
            random.setstate(plan["rng_python"])
            np.random.set_state(plan["rng_numpy"])
        else:
            _restore_rng(plan["rng_tensors"], plan["rng_meta"])


def _scaler_state(
    meta: Any, scaler: BatchGradScaler, ids: list[int | str], root: Path
) -> dict[str, Any]:
    """The scaler's ``state_dict`` for models ``ids`` rebuilt from the (checked) manifest."""
    if meta is None:
        raise CheckpointError(f"the checkpoint at {root} has no scaler state")
    if not meta["enabled"]:
        if scaler.is_enabled():
            raise CheckpointError(f"the checkpoint at {root} was saved with a disabled scaler")
        return {}
    per_model = [meta["per_model"][json.dumps(mid)] for mid in ids]
    return {
        "scale": [float(m["scale"]) for m in per_model],
        "_growth_tracker": [int(m["growth_tracker"]) for m in per_model],
        "growth_factor": float(meta["growth_factor"]),
        "backoff_factor": float(meta["backoff_factor"]),
        "growth_interval": int(meta["growth_interval"]),
        "model_ids": list(ids),
    }


def _read_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return dict(meta)


def _compare_architecture(
    mine: list[dict[str, Any]], theirs: list[dict[str, Any]], root: Path
) -> None:
    a = {e["name"]: e for e in mine}
    b = {e["name"]: e for e in theirs}
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint at {root} is for another architecture: the batch has tensors "
            f"{missing} that it lacks, it has {extra} that the batch lacks (seeded dropout "
            "adds 'seed'/'counter' buffers: build the batch with or without seeds= as saved)"
        )
    for name, e in a.items():
        s = b[name]
        if (e["shape"], e["dtype"], e["kind"]) != (s["shape"], s["dtype"], s["kind"]):
            raise CheckpointError(
                f"the checkpoint at {root} is for another architecture: {e['kind']} {name!r} "
                f"is saved with per-model shape {tuple(s['shape'])} dtype {s['dtype']}, the "
                f"batch has shape {tuple(e['shape'])} dtype {e['dtype']}"
            )


def _build_optimizer_state(
    optimizer: Any,
    ids: list[int | str],
    groups: list[dict[str, Any]],
    tensors: list[dict[str, Tensor]],
    scalars: list[dict[str, Any]],
) -> dict[str, Any]:
    """The optimizer's ``state_dict`` rebuilt from the per-model files (validated)."""
    from modelbatch.optim.base import BatchOptimizer

    params = dict(optimizer.batch.stacked_parameters())

    def split(full: str, mid: int | str) -> tuple[str, str]:
        name, sep, key = full.rpartition("/")
        if not sep or name not in params:
            raise CheckpointError(
                f"optimizer state of model {mid!r} names {full!r}: no such parameter"
            )
        return name, key

    if isinstance(optimizer, BatchOptimizer):
        layout = None
        state: dict[str, dict[str, Any]] = {}
        for mid, t, sc in zip(ids, tensors, scalars, strict=True):
            keys = sorted(t) + sorted(sc)
            if layout is None:
                layout = keys
            elif keys != layout:
                raise CheckpointError(
                    f"optimizer state of model {mid!r} has entries {keys}, model {ids[0]!r} "
                    f"has {layout}; vectorised optimizers need the same state for every model"
                )
            for full in t:
                split(full, mid)
        for full in sorted(tensors[0]) if tensors else []:
            name, key = split(full, ids[0])
            p = params[name]
            per = [t[full] for t in tensors]
            # Per-model scalars (step counters, bias corrections): the optimizer names them.
            scalar = key in optimizer._small_keys()
            expect = () if scalar else tuple(p.shape[1:])
            for mid, v in zip(ids, per, strict=True):
                if tuple(v.shape) != expect and not (scalar and v.dim() == 0):
                    raise CheckpointError(
                        f"optimizer state {name!r}/{key!r} of model {mid!r} has shape "
                        f"{tuple(v.shape)}, expected {expect}"
                    )
                if v.dtype != per[0].dtype:
                    raise CheckpointError(
                        f"optimizer state {name!r}/{key!r} of model {mid!r} has dtype "
                        f"{v.dtype}, model {ids[0]!r} {per[0].dtype}"
                    )
            state.setdefault(name, {})[key] = torch.stack(per)
        for full in sorted(scalars[0]) if scalars else []:
            name, key = split(full, ids[0])
            state.setdefault(name, {})[key] = scalars[0][full]
        return {"state": state, "param_groups": groups, "model_ids": ids}

    # PerModelOptimizer: the wrapped torch optimizer's own state_dict layout.
    names = optimizer._names
    p_count = len(names)
    inner_state: dict[int, dict[str, Any]] = {}
    inner_groups = []
    for i, (mid, t, sc, g) in enumerate(zip(ids, tensors, scalars, groups, strict=True)):
        for full, v in list(t.items()) + list(sc.items()):
            name, key = split(full, mid)
            if name not in names:
                raise CheckpointError(f"optimizer state of model {mid!r}: {name!r} is frozen")
            if (
                isinstance(v, Tensor)
                and v.dim() > 0
                and tuple(v.shape) != tuple(params[name].shape[1:])
            ):
                raise CheckpointError(
                    f"optimizer state {name!r}/{key!r} of model {mid!r} has shape "
                    f"{tuple(v.shape)}, expected {tuple(params[name].shape[1:])}"
                )
            inner_state.setdefault(i * p_count + names.index(name), {})[key] = v
        group = dict(g)
        group["params"] = list(range(i * p_count, (i + 1) * p_count))
        inner_groups.append(group)
    return {"state": inner_state, "param_groups": inner_groups, "model_ids": ids}


def _restore_rng(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    n_cuda = int(meta["cuda_devices"])
    if _restores_cuda(n_cuda):
        torch.cuda.set_rng_state_all([tensors[f"torch_cuda_{d}"] for d in range(n_cuda)])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = meta["numpy"]
    np.random.set_state(
        (
            nps["name"],
            np.asarray(nps["keys"], dtype=np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached_gaussian"],
        )
    )


def load_weights(
    directory: str | os.PathLike[str], model_id: int | str, *, version: int | None = None
) -> dict[str, Tensor]:
    """One saved model's state dict (``{name: tensor}``, on the CPU), read and verified as
    :func:`load_all` reads a checkpoint (the latest committed version unless ``version``)."""
    return _read_model(directory, model_id, version)[0]


def _read_model(
    directory: str | os.PathLike[str], model_id: int | str, version: int | None
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]] | None]:
    """Saved model ``model_id``'s state dict and its per-model settings (``None`` when the
    checkpoint did not record them), read and verified in one go."""
    with _open_version(directory, version, None) as ck:
        by_id = {json.dumps(m["id"]): m for m in ck.manifest["models"]}
        if json.dumps(model_id) not in by_id:
            raise CheckpointError(
                f"model id {model_id!r} is not in the checkpoint at {ck.path}; it holds "
                f"{[m['id'] for m in ck.manifest['models']]}"
            )
        entry = by_id[json.dumps(model_id)]
        rel = f"models/{entry['folder']}/{_MODEL_FILE}"
        return ck.tensors(rel, f"model {model_id!r}"), entry.get("settings")


def load_model(
    directory: str | os.PathLike[str],
    model_id: int | str,
    template: nn.Module,
    *,
    version: int | None = None,
) -> nn.Module:
    """One saved model as a plain module: a deep copy of ``template`` with its weights and
    its own per-model settings (dropout ``p``, BatchNorm ``momentum``/``eps``,
    LayerNorm/GroupNorm ``eps``, LeakyReLU ``negative_slope``).

    ``template`` is any instance of the architecture (its weights and per-model settings
    are not used). A template whose submodules cannot take the saved settings (another
    layer class at that path, a missing one) is refused. A checkpoint written before
    settings were recorded gives the template's settings. Without ModelBatch the weights
    are::

        folder = json.loads(Path("ckpt/latest.json").read_text())["versions"][-1]["folder"]
        model.load_state_dict(safetensors.torch.load_file(f"ckpt/{folder}/models/<id>/model.safetensors"))

    and the settings are the model's ``"settings"`` entry in ``ckpt/<folder>/manifest.json``.
    """
    from modelbatch._structure import model_settings

    weights, saved = _read_model(directory, model_id, version)
    module = copy.deepcopy(template)
    if saved is not None:
        have = model_settings(module)
        for path, attr, value, saved_value in _settings_differences(have, saved):
            if value is _ABSENT or saved_value is _ABSENT:
                raise CheckpointError(
                    f"model {model_id!r} of the checkpoint at {directory} does not fit the "
                    f"template {type(template).__name__}: its submodule {path or '<root>'!r} "
                    f"has the per-model setting {attr!r} = {saved_value!r} in the checkpoint "
                    f"and {value!r} in the template (another layer class, or a missing "
                    "layer). Give a template of the saved architecture"
                )
            setattr(module.get_submodule(path), attr, saved_value)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"model {model_id!r} of the checkpoint at {directory} does not fit the template "
            f"{type(template).__name__}: {e}"
        ) from None
    return module
