"""The one place for output paths: up-front checks, atomic staging next to the target, strict JSON.

Every writer stages its output NEXT TO the target (same directory, so the same filesystem and the
final `os.replace` is atomic) under a hidden name that records who staged it:

    .<target name>.cboprune-staging-<host>-<pid>-<random>   the output being written
    .<target name>.cboprune-old-<host>-<pid>-<random>       the previous output, while it is replaced

On success the staging entry is renamed onto the target; on any exception (KeyboardInterrupt too)
it is removed. A SIGKILL cannot be caught, so the next run for the same target removes entries
whose process (same host) no longer exists, and puts a moved-away previous output back when a kill
fell between the two renames of a replacement. Afterwards the target holds the complete new
output, or the complete old one, or nothing: never a partial file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cboprune.core.errors import CBOPruneError

log = logging.getLogger(__name__)

_STAGING = "cboprune-staging"
_OLD = "cboprune-old"


# ----------------------------------------------------------------------------- who writes

def is_main_process() -> bool:
    """Under torchrun / accelerate launch only the main process (RANK 0) checks, stages and writes
    outputs; the other ranks wait at a barrier and never touch the staging area (two ranks staging
    one target race on it). Read from the launcher's environment, so it holds before any process
    group exists and without importing torch."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def cache_dir() -> Path:
    """Where cboprune keeps what it computes once: de-quantized GGUF checkpoints, generated calibration,
    the solvers' compiled kernels (`CBOPRUNE_CACHE`, default ~/.cache/cboprune)."""
    return Path(os.environ.get("CBOPRUNE_CACHE", Path.home() / ".cache" / "cboprune"))


# ----------------------------------------------------------------------------- checks

def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _writable(directory: Path) -> bool:
    """Whether an entry can really be created in `directory`: os.access alone says yes to root on a
    read-only mount or /proc, and the run would then fail only when it writes its results."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cboprune-probe-", dir=directory))
    except OSError:
        return False
    return True


def _check_parent(path: Path, what: str) -> None:
    """The directory that will hold `path` (or its nearest existing ancestor) is a writable directory."""
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise CBOPruneError(f"cannot write {what} {path}: {anchor} is a file, not a directory; choose another path")
    if not _writable(anchor):
        raise CBOPruneError(f"cannot write {what} {path}: {anchor} is not writable; choose a writable location")


def _refuse_cwd(path: Path, what: str) -> None:
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CBOPruneError(f"{what} {path} is the current directory or one of its parents: it would be replaced "
                            "as a whole, so choose a new subdirectory (even with --overwrite)")


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output directory that cannot be written atomically.

    Refused: a file; `.` / the current directory / a parent of it (even with overwrite, since the
    directory is replaced as a whole); a non-empty directory without overwrite; a read-only parent
    or directory. Stale staging of this target left by a killed run is cleaned up. Returns the path.
    """
    path = Path(path).expanduser()
    if str(path) in ("", "."):
        path = Path(".")
    _refuse_cwd(path, "output directory")
    clean_stale_staging(path)
    if path.exists() and not path.is_dir():
        raise CBOPruneError(f"output path {path} is a file, not a directory: choose a directory path")
    if path.is_dir():
        if any(path.iterdir()) and not overwrite:
            raise CBOPruneError(f"output directory {path} is not empty: choose another or pass --overwrite")
        if not _writable(path):
            raise CBOPruneError(f"output directory {path} is not writable: choose a writable location")
    _check_parent(path, "output directory")
    return path


def check_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file path that is a directory, exists without overwrite,
    or lies in a read-only or non-directory parent. Stale staging of this target is cleaned up."""
    raw = str(path)
    path = Path(path).expanduser()
    if path.is_dir() or raw.endswith(("/", os.sep)):
        raise CBOPruneError(f"output file {raw} is a directory: pass a file path such as {path / 'out'}")
    clean_stale_staging(path)
    if path.exists() and not overwrite:
        raise CBOPruneError(f"output file {path} exists: choose another or pass --overwrite")
    _check_parent(path, "output file")
    if path.exists() and not _writable(path.parent):
        raise CBOPruneError(f"cannot replace {path}: its directory is not writable")
    return path


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """A JSON object file this tool wrote (removal.json, ...), read back: a user may have damaged
    or replaced it, so anything but a JSON object is refused in one line that ends with `fix`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise CBOPruneError(f"{path} cannot be read as JSON ({exc}): {fix}") from None
    if not isinstance(data, dict):
        raise CBOPruneError(f"{path} is not a JSON object: {fix}")
    return data


# ----------------------------------------------------------------------------- staging

def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_tag()}"


def _owner_gone(name: str) -> bool:
    """Whether the process that made a staging entry `...-<host>-<pid>-<random>` no longer exists."""
    try:
        host, pid, _ = name.rsplit("-", 2)
        host = host.split(f"{_STAGING}-", 1)[-1].split(f"{_OLD}-", 1)[-1]
        pid_ = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # another machine's run (shared filesystem): not ours to judge
    if pid_ == os.getpid():
        return False
    try:
        os.kill(pid_, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_staging(target: str | Path) -> list[Path]:
    """Remove staging entries of `target` whose process died (SIGKILL); restore a moved-away previous
    output when the target is missing. Returns what was removed or restored."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return []
    done = []
    for kind in (_STAGING, _OLD):
        for entry in sorted(parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            if not _owner_gone(entry.name):
                continue
            if kind == _OLD and not target.exists() and not target.is_symlink():
                os.replace(entry, target)  # killed between the two renames of a replacement
                log.warning("restored the previous output %s from an interrupted replacement", target)
            else:
                _remove(entry)
                log.warning("removed %s left by an interrupted run", entry)
            done.append(entry)
    return done


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(stage: Path, target: Path, overwrite: bool) -> None:
    """Rename `stage` onto `target`; an existing target is moved aside first and deleted afterwards."""
    old = None
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()
        elif overwrite:
            old = _sibling(target, _OLD)
            os.replace(target, old)
        else:
            raise CBOPruneError(f"{target} appeared while the output was written: choose another path or pass "
                                "--overwrite")
    try:
        os.replace(stage, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def staged_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory next to `target`; on success it becomes `target` (replacing
    it when overwrite), on any exception it is removed. Stale staging of `target` is cleaned first."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    stage = _sibling(target, _STAGING)
    stage.mkdir()
    try:
        yield stage
        _commit(stage, target, overwrite)
    except BaseException:
        _remove(stage)
        raise


@contextlib.contextmanager
def staged_file(target: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging file path next to `target`; write it, and on success it is fsynced and renamed
    onto `target`; on any exception it is removed. Stale staging of `target` is cleaned first."""
    target = Path(target).expanduser()
    if target.is_dir():
        raise CBOPruneError(f"output file {target} is a directory: pass a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    stage = _sibling(target, _STAGING)
    try:
        yield stage
        if not stage.is_file():
            raise RuntimeError(f"nothing was written to the staging file {stage}")
        with open(stage, "rb") as f:
            os.fsync(f.fileno())
        if target.exists() and not overwrite:
            raise CBOPruneError(f"{target} appeared while the output was written: choose another path or pass "
                                "--overwrite")
        os.replace(stage, target)
        _fsync_dir(target.parent)
    except BaseException:
        _remove(stage)
        raise


def write_texts(pairs: list[tuple[str | Path, str]], *, overwrite: bool = True) -> list[Path]:
    """Write several text files that belong together (a report's .json and .md): each is staged
    next to its target first, then all are renamed; an exception before the renames leaves none."""
    staged: list[tuple[Path, Path]] = []
    try:
        for target, text in pairs:
            target = Path(target).expanduser()
            if target.is_dir():
                raise CBOPruneError(f"output file {target} is a directory: pass a file path")
            if target.exists() and not overwrite:
                raise CBOPruneError(f"output file {target} exists: choose another or pass --overwrite")
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_staging(target)
            stage = _sibling(target, _STAGING)
            staged.append((stage, target))
            with open(stage, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for stage, target in staged:
            os.replace(stage, target)
        for parent in {t.parent for _, t in staged}:
            _fsync_dir(parent)
    except BaseException:
        for stage, _ in staged:
            _remove(stage)
        raise
    return [t for _, t in staged]


# ----------------------------------------------------------------------------- strict JSON

def json_safe(obj: Any) -> Any:
    """A copy of `obj` with every non-finite float (NaN, ±inf) replaced by None, so that strict JSON
    parsers read it (never a NaN literal); tuples become lists and numpy scalars become Python numbers.
    A diverged result says so in words next to its nulls (`cboprune.core.finite`, "diverged")."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy / torch scalars
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """json.dumps with NaN/inf written as null and `allow_nan=False` (never emits invalid JSON)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, *, overwrite: bool = True) -> Path:
    """Write strict JSON (indent 2) atomically."""
    path = Path(path)
    with staged_file(path, overwrite=overwrite) as stage:
        stage.write_text(dumps_strict(obj, indent=2) + "\n", encoding="utf-8")
    return path


__all__ = ["cache_dir", "check_output_dir", "check_output_file", "clean_stale_staging", "dumps_strict", "is_main_process",
           "json_safe", "staged_dir", "staged_file", "write_json", "write_texts"]
