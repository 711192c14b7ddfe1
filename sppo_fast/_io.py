"""Atomic file writes: a temporary name in the same folder, fsync, rename. A file either exists
complete or not at all, which is what lets every stage resume by checking for its output."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def digest(obj) -> str:
    """SHA-256 of ``obj`` as sorted JSON: a fingerprint of settings or records. Arrays and tensors
    count in full (``tolist``; ``str`` would abbreviate a long numpy array), other objects by ``str``."""
    import hashlib

    def default(o):
        return o.tolist() if hasattr(o, "tolist") else str(o)

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_parquet(table, path: Path) -> None:
    """Write a ``pyarrow.Table`` to ``path`` atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path: Path, **kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(json.dumps(obj, **kwargs), path)


def write_text(text: str, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def looks_like_hub_name(value: str) -> bool:
    """``name`` or ``org/name``: Hugging Face's repo id form (``{iteration}`` may be filled in later)."""
    value = str(value).replace("{iteration}", "1")
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value)) and not value.startswith(".") and ".." not in value


def local_or_hub(name: str | os.PathLike, what: str, load):
    """``load(name)`` for a local path or a hub name; a path that is neither (``runs/x/model`` that is
    not there) is a FileNotFoundError saying so, not the hub's "Repo id must be in the form ..."; a
    hub name the hub cannot provide (offline, or no such repo) is an OSError naming it."""
    if Path(name).exists():
        return load(name)
    if not looks_like_hub_name(str(name)):
        raise FileNotFoundError(f"{what} {str(name)!r}: no such file or folder")
    try:
        return load(name)
    except OSError as exc:
        first = next((x for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        raise OSError(f"{what} {str(name)!r}: no such local folder, and the Hugging Face hub could not provide "
                      f"it ({first})") from exc
