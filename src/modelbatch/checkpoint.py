"""Checkpoints of a whole ModelBatch: one folder per model, safetensors + JSON only.

Layout of ``save_all(batch, "ckpt")``::

    ckpt/manifest.json                  format version, N, model ids and folders, quarantine
                                        mask, architecture fingerprint, optimizer class,
                                        scheduler states, per-model loss scales (with
                                        scaler=), RNG (Python/NumPy), step, extra,
                                        SHA-256 of every file
    ckpt/rng.safetensors                torch CPU (and CUDA) generator states
    ckpt/models/<id>/model.safetensors  the model's state_dict exactly as the plain module
                                        has it (loads with safetensors + load_state_dict)
    ckpt/models/<id>/batch_state.safetensors  batch-only buffers (e.g. dropout counters)
    ckpt/models/<id>/hparams.json       its optimizer param group (lr, betas, ...)
    ckpt/models/<id>/optimizer.safetensors    its slice of every optimizer state tensor

Saving is atomic: everything is written and fsynced in a temporary sibling folder, which
then replaces the old checkpoint by two renames; until the second rename the previous
checkpoint stays readable (``load_all`` also finds it if a crash fell between the two).
One writer per checkpoint folder at a time. Loading never unpickles, validates everything
(files, checksums, names, shapes, dtypes, N, ids, optimizer class) before changing the
batch, and raises :class:`CheckpointError` naming the file, the model and the tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
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
    "load_all",
    "load_model",
    "model_folder_name",
    "read_manifest",
    "save_all",
]

FORMAT = "modelbatch-checkpoint"
VERSION = 1
_MANIFEST = "manifest.json"
_RNG_FILE = "rng.safetensors"
_MODEL_FILE = "model.safetensors"
_BATCH_FILE = "batch_state.safetensors"
_OPT_FILE = "optimizer.safetensors"
_HP_FILE = "hparams.json"
_SAFE_CHARS = re.compile(r"[A-Za-z0-9_.\-]")
_INT_NAME = re.compile(r"-?[0-9]+")
_MAX_NAME = 200


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


def _model_dir(root: Path, folder: str) -> Path:
    """``root/models/folder``, refusing any folder name that is not a plain child."""
    models = root / "models"
    path = models / folder
    if (
        not folder
        or folder in (".", "..")
        or "/" in folder
        or "\\" in folder
        or "\x00" in folder
        or path.parent != models
    ):
        raise CheckpointError(f"unsafe model folder name {folder!r} in the manifest")
    return path


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


def _write(path: Path, data: bytes, checksums: dict[str, str], root: Path) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    checksums[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()


def _write_json(path: Path, obj: Any, checksums: dict[str, str], root: Path) -> None:
    _write(path, json.dumps(obj, indent=1, allow_nan=True).encode("utf-8"), checksums, root)


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


def _scaler_state(
    meta: Any, scaler: BatchGradScaler, ids: list[int | str], root: Path
) -> dict[str, Any]:
    """The scaler's ``state_dict`` for models ``ids`` rebuilt from the manifest (checked)."""
    if meta is None:
        raise CheckpointError(f"the checkpoint at {root} has no scaler state")
    try:
        if not meta["enabled"]:
            if scaler.is_enabled():
                raise CheckpointError(
                    f"the checkpoint at {root} was saved with a disabled scaler"
                )
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
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the scaler state in {root} is malformed: {e!r}") from None


def _as_list(scheduler: Any) -> list[Any]:
    if scheduler is None:
        return []
    if isinstance(scheduler, (list, tuple)):
        return list(scheduler)
    return [scheduler]


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
) -> Path:
    """Save every model of ``batch`` (and optionally its optimizer and schedulers), atomically.

    Args:
        batch: the ModelBatch.
        directory: checkpoint folder. It is replaced as a whole; an existing folder that is
            not a checkpoint (no ``manifest.json``) and is not empty is refused.
        optimizer: a ``modelbatch.optim`` optimizer built for ``batch`` (vectorised or
            :class:`~modelbatch.optim.PerModelOptimizer`): each model's param group goes to
            its ``hparams.json``, its state slice to its ``optimizer.safetensors``.
        scheduler: an LR scheduler or a list of them; ``state_dict()`` is stored as JSON
            (``LambdaLR`` stores no lambdas: rebuild them the same way before loading).
        step: your step or epoch counter, returned by :func:`load_all`.
        scaler: a :class:`~modelbatch.BatchGradScaler` built for ``batch``: each model's loss
            scale and growth tracker go to the manifest, so fp16 training resumes with them.
        extra: further JSON-encodable metadata, returned by :func:`load_all`.

    Returns:
        The checkpoint folder as a ``Path``.

    The torch CPU generator (and CUDA generators when CUDA is initialised), Python's
    ``random`` and NumPy's global generator are saved too, so a resumed run continues the
    same random streams.
    """
    root = Path(os.path.abspath(directory))
    if (
        root.exists()
        and not (root / _MANIFEST).is_file()
        and (not root.is_dir() or any(root.iterdir()))
    ):
        raise CheckpointError(
            f"{root} exists and is not a ModelBatch checkpoint (no {_MANIFEST}); "
            "refusing to replace it"
        )
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{root.name}.tmp-*"):  # left by a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    kind = _optimizer_kind(optimizer) if optimizer is not None else None
    if optimizer is not None and getattr(optimizer, "batch", None) is not batch:
        raise CheckpointError("the optimizer was not built for this batch")
    scaler_meta = _scaler_meta(batch, scaler) if scaler is not None else None
    tmp = parent / f".{root.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        _write_checkpoint(
            batch, tmp, optimizer, kind, _as_list(scheduler), scaler_meta, step, extra
        )
        _commit(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_checkpoint(
    batch: ModelBatch,
    root: Path,
    optimizer: Any,
    kind: str | None,
    schedulers: list[Any],
    scaler_meta: dict[str, Any] | None,
    step: int | None,
    extra: Mapping[str, Any] | None,
) -> None:
    checksums: dict[str, str] = {}
    fingerprint = _fingerprint(batch)
    in_model = {e["name"] for e in fingerprint["tensors"] if e["in_model"]}
    stacked = batch.stacked.state_dict()
    active = batch.active.cpu().tolist()
    seeds = getattr(batch, "seeds", None)
    (root / "models").mkdir()
    models_meta = []
    for i, mid in enumerate(batch.model_ids):
        folder = model_folder_name(mid)
        mdir = _model_dir(root, folder)
        mdir.mkdir()
        weights = {k: v[i].detach().to("cpu", copy=True).contiguous() for k, v in stacked.items()}
        model_sd = {k: v for k, v in weights.items() if k in in_model}
        batch_sd = {k: v for k, v in weights.items() if k not in in_model}
        _write(
            mdir / _MODEL_FILE,
            st_save(model_sd, metadata={"model_id": json.dumps(mid)}),
            checksums,
            root,
        )
        if batch_sd:
            _write(mdir / _BATCH_FILE, st_save(batch_sd), checksums, root)
        if optimizer is not None:
            tensors, scalars = _per_model_optimizer_state(optimizer, i)
            _write(
                mdir / _OPT_FILE,
                st_save(tensors, metadata={"scalars": json.dumps(scalars)}),
                checksums,
                root,
            )
            group = {k: v for k, v in optimizer.param_groups[i].items() if k != "params"}
            group["model_id"] = mid
            _write_json(
                mdir / _HP_FILE,
                _json_ready(group, f"param group of model {mid!r}"),
                checksums,
                root,
            )
        _fsync_dir(mdir)
        models_meta.append(
            {
                "id": mid,
                "folder": folder,
                "active": bool(active[i]),
                "seed": None if seeds is None else int(seeds[i]),
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
    _write(root / _RNG_FILE, st_save(rng_tensors), checksums, root)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
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
        "files": checksums,
    }
    # The manifest is written last: a folder with a manifest is complete.
    _write_json(root / _MANIFEST, manifest, {}, root)
    _fsync_dir(root)


def _prev_path(root: Path) -> Path:
    return root.parent / f".{root.name}.prev"


def _commit(tmp: Path, root: Path) -> None:
    """Swap ``tmp`` in as ``root``; the old ``root`` survives as ``.<name>.prev`` meanwhile."""
    prev = _prev_path(root)
    if root.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(root, prev)
        _fsync_dir(root.parent)
    os.replace(tmp, root)
    _fsync_dir(root.parent)
    shutil.rmtree(prev, ignore_errors=True)


# ---------------------------------------------------------------------------- read
def _resolve(directory: str | os.PathLike[str]) -> Path:
    root = Path(os.path.abspath(directory))
    if (root / _MANIFEST).is_file():
        return root
    prev = _prev_path(root)
    if not root.exists() and (prev / _MANIFEST).is_file():
        return prev  # a save crashed between its two renames: the previous one is complete
    if root.exists():
        raise CheckpointError(f"{root} is not a ModelBatch checkpoint: {_MANIFEST} is missing")
    raise CheckpointError(f"no checkpoint at {root}")


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed and checked ``manifest.json`` of a checkpoint."""
    root = _resolve(directory)
    return _read_manifest(root)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / _MANIFEST
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ModelBatch checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest.get('version')!r}; this ModelBatch reads "
            f"version {VERSION}"
        )
    try:
        models = manifest["models"]
        for m in models:
            if model_folder_name(m["id"]) != m["folder"]:
                raise CheckpointError(f"model {m['id']!r} has folder {m['folder']!r}")
            _model_dir(root, m["folder"])
        if not isinstance(manifest["files"], dict):
            raise TypeError("files")
        if not isinstance(manifest["architecture"]["tensors"], list):
            raise TypeError("architecture")
    except CheckpointError as e:
        raise CheckpointError(f"{path} is inconsistent: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is malformed: missing or bad entry {e}") from None
    return manifest


def _read_file(root: Path, rel: str, manifest: Mapping[str, Any], what: str) -> bytes:
    path = root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path} ({what})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({what}): {e}") from None
    expected = manifest["files"].get(rel)
    if expected is None:
        raise CheckpointError(f"{path} ({what}) is not listed in the manifest")
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"{path} ({what}) is corrupt: its SHA-256 does not match the manifest"
        )
    return data


def _read_tensors(
    root: Path, rel: str, manifest: Mapping[str, Any], what: str
) -> dict[str, Tensor]:
    data = _read_file(root, rel, manifest, what)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{root / rel} ({what}) is not a valid safetensors file: {e}"
        ) from None


def _read_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    return dict(header.get("__metadata__") or {})


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
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_all` into ``batch`` (in place).

    Everything is read and checked before anything in ``batch``, the optimizer, the
    schedulers or the RNG changes; on any problem a :class:`CheckpointError` is raised and
    nothing is modified.

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

    Returns:
        ``{"step": ..., "extra": {...}, "model_ids": [...], "manifest": {...}}``.
    """
    root = _resolve(directory)
    manifest = _read_manifest(root)
    n = len(batch)
    saved_ids = [m["id"] for m in manifest["models"]]
    by_id = {m["id"]: m for m in manifest["models"]}
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
    unknown = [mid for mid in ids if mid not in by_id]
    if unknown:
        raise CheckpointError(
            f"model id(s) {unknown} are not in the checkpoint at {root}; it holds {saved_ids}"
        )

    # Architecture.
    mine = _fingerprint(batch)["tensors"]
    theirs = manifest["architecture"]["tensors"]
    _compare_architecture(mine, theirs, root)
    expected = {e["name"]: e for e in mine}

    # Optimizer and schedulers: compatible?
    kind = _optimizer_kind(optimizer) if optimizer is not None else None
    if optimizer is not None:
        if getattr(optimizer, "batch", None) is not batch:
            raise CheckpointError("the optimizer was not built for this batch")
        if manifest["optimizer"] is None:
            raise CheckpointError(f"the checkpoint at {root} has no optimizer state")
        if manifest["optimizer"] != kind:
            raise CheckpointError(
                f"the checkpoint's optimizer is {manifest['optimizer']}, the given one is {kind}"
            )
    schedulers = _as_list(scheduler)
    saved_sched = manifest["schedulers"]
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

    # Read every file.
    per_model: list[dict[str, Tensor]] = []
    groups: list[dict[str, Any]] = []
    opt_tensors: list[dict[str, Tensor]] = []
    opt_scalars: list[dict[str, Any]] = []
    for mid in ids:
        folder = by_id[mid]["folder"]
        base = f"models/{folder}"
        what = f"model {mid!r}"
        weights = _read_tensors(root, f"{base}/{_MODEL_FILE}", manifest, what)
        if any(not e["in_model"] for e in mine):
            weights.update(_read_tensors(root, f"{base}/{_BATCH_FILE}", manifest, what))
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
            data = _read_file(root, f"{base}/{_OPT_FILE}", manifest, f"{what} optimizer state")
            try:
                opt_tensors.append(st_load(data))
                opt_scalars.append(json.loads(_read_metadata(data).get("scalars", "{}")))
            except (SafetensorError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{base}/{_OPT_FILE} ({what}) is not valid: {e}") from None
            hp = _read_file(root, f"{base}/{_HP_FILE}", manifest, f"{what} hyper-parameters")
            try:
                group = json.loads(hp.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(
                    f"{base}/{_HP_FILE} ({what}) is not valid JSON: {e}"
                ) from None
            if not isinstance(group, dict) or group.get("model_id") != mid:
                raise CheckpointError(f"{base}/{_HP_FILE} does not belong to {what}")
            groups.append(group)
    rng_tensors = _read_tensors(root, _RNG_FILE, manifest, "RNG state") if restore_rng else {}
    opt_state = (
        _build_optimizer_state(optimizer, ids, groups, opt_tensors, opt_scalars)
        if optimizer is not None
        else None
    )

    scaler_state = None
    if scaler is not None:
        if getattr(scaler, "batch", None) is not batch:
            raise CheckpointError("the scaler was not built for this batch")
        scaler_state = _scaler_state(manifest.get("scaler"), scaler, ids, root)

    # Commit.
    with torch.no_grad():
        for name, stacked in batch.stacked.state_dict(keep_vars=True).items():
            for i, weights in enumerate(per_model):
                stacked[i].copy_(weights[name])
        batch.active.copy_(torch.tensor([bool(by_id[mid]["active"]) for mid in ids]))
    batch._model_ids = list(ids)
    if getattr(batch, "seeds", None) is not None:
        saved_seeds = [by_id[mid].get("seed") for mid in ids]
        if all(s is not None for s in saved_seeds):
            batch.seeds = [int(s) for s in saved_seeds]
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    for s, saved in zip(schedulers, saved_sched, strict=False):
        s.load_state_dict(saved["state"])
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    if restore_rng:
        _restore_rng(rng_tensors, manifest["rng"])
    return {
        "step": manifest["step"],
        "extra": manifest["extra"],
        "model_ids": ids,
        "manifest": manifest,
    }


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
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
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


def load_model(
    directory: str | os.PathLike[str], model_id: int | str, template: nn.Module
) -> nn.Module:
    """One saved model as a plain module: a deep copy of ``template`` with its weights.

    ``template`` is any instance of the architecture (its weights are not used). Without
    ModelBatch the same is::

        model.load_state_dict(safetensors.torch.load_file("ckpt/models/<id>/model.safetensors"))
    """
    root = _resolve(directory)
    manifest = _read_manifest(root)
    by_id = {m["id"]: m for m in manifest["models"]}
    if model_id not in by_id:
        raise CheckpointError(
            f"model id {model_id!r} is not in the checkpoint at {root}; it holds {list(by_id)}"
        )
    rel = f"models/{by_id[model_id]['folder']}/{_MODEL_FILE}"
    weights = _read_tensors(root, rel, manifest, f"model {model_id!r}")
    module = copy.deepcopy(template)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"model {model_id!r} of {root} does not fit the template {type(template).__name__}: {e}"
        ) from None
    return module
