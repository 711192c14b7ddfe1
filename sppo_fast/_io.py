"""Atomic file writes: a temporary name in the same folder, fsync, rename. A file either exists
complete or not at all, which is what lets every stage resume by checking for its output."""

from __future__ import annotations

import json
import os
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
