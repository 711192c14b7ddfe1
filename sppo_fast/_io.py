"""Atomic file writes: a temporary name in the same folder, fsync, rename. A file either exists
complete or not at all, which is what lets every stage resume by checking for its output."""

from __future__ import annotations

import contextlib
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


def _damaged(path: Path, what: str, exc: Exception) -> ValueError:
    first = next((x for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
    return ValueError(f"{path}: damaged or not {what} ({first}); delete it to redo the work that wrote it "
                      f"(or restore it)")


def read_json(path: Path):
    """The JSON in ``path``, or a ValueError naming the file when it does not parse (a file this
    project wrote is complete or absent, so a damaged one was changed by something else)."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _damaged(path, "JSON", exc) from None


def read_parquet(path: Path, columns=None):
    """``pyarrow.parquet.read_table(path)``, or a ValueError naming a damaged file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        if not Path(path).exists():
            raise
        raise _damaged(path, "a Parquet file", exc) from None


def parquet_metadata(path: Path) -> dict:
    """The key-value metadata of a Parquet file's schema, or a ValueError naming a damaged file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as exc:
        if not Path(path).exists():
            raise
        raise _damaged(path, "a Parquet file", exc) from None


_HELD: dict[str, list] = {}  # run folders this process holds: [open lock file, depth]


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "run folder"):
    """Hold ``<folder>/.lock`` (an exclusive ``flock``) for the block, so that a second process on the
    same folder stops with an error naming it instead of racing the first one's renames. Re-entrant
    within a process; only rank 0 of a ``torchrun`` job takes it; a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = Path(folder)
    created = not folder.exists()  # (removed again if the block leaves nothing in it)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        _drop_if_empty(folder, created)
        raise ValueError(f"{folder}: another process is using this {what}"
                         + (f" (pid {holder})" if holder else "")
                         + "; wait for it to finish, or give this run another name") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = [f, 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if not _HELD[key][1]:
            del _HELD[key]
            f.close()  # (releases the lock; the file stays, empty of meaning)
            _drop_if_empty(folder, created)


def _drop_if_empty(folder: Path, created: bool) -> None:
    """Remove a folder :func:`folder_lock` made when only its lock file is in it (a command refused
    before any work leaves no run folder behind)."""
    if created and [p.name for p in folder.iterdir()] == [".lock"]:
        try:
            (folder / ".lock").unlink()
            folder.rmdir()
        except OSError:
            pass
