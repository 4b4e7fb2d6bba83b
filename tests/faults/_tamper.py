"""Edit a committed checkpoint the way an attacker (or a careless script) would, with or
without re-hashing: the manifest's records and the pointer's digest can be kept
consistent, so that what is tested is the validation behind the checksums."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pointer(root: Path) -> dict[str, Any]:
    return json.loads((root / "latest.json").read_text())


def latest(root: Path) -> Path:
    """The folder of the latest committed version."""
    return root / pointer(root)["versions"][-1]["folder"]


def _repoint(root: Path, manifest_bytes: bytes) -> None:
    p = pointer(root)
    p["versions"][-1]["manifest_sha256"] = hashlib.sha256(manifest_bytes).hexdigest()
    p["versions"][-1]["manifest_size"] = len(manifest_bytes)
    (root / "latest.json").write_text(json.dumps(p))


def write_manifest(root: Path, manifest: Any, *, rehash: bool = True) -> None:
    data = json.dumps(manifest, indent=1).encode()  # as written: small edits keep the size
    (latest(root) / "manifest.json").write_bytes(data)
    if rehash:
        _repoint(root, data)


def edit_manifest(
    root: Path, edit: Callable[[dict[str, Any]], Any], *, rehash: bool = True
) -> None:
    """Apply ``edit`` to the latest manifest (in place) and write it back."""
    manifest = json.loads((latest(root) / "manifest.json").read_text())
    edit(manifest)
    write_manifest(root, manifest, rehash=rehash)


def replace_file(root: Path, rel: str, data: bytes, *, rehash: bool = True) -> None:
    """Overwrite ``rel`` in the latest version; with ``rehash`` update its record in the
    manifest and the manifest's digest in the pointer."""
    (latest(root) / rel).write_bytes(data)
    if rehash:

        def edit(m: dict[str, Any]) -> None:
            m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

        edit_manifest(root, edit)
