"""On-disk caches that are built once: one folder per key under `cache_dir()`, safe under concurrency.

Promises:
- `build_once(target, build)` returns `target`, running `build(tmp)` first if `target` does not exist. The build
  writes into a temporary sibling that is renamed into place with `os.replace`, so a folder only ever appears
  whole; a lock file next to it makes concurrent builders (threads or processes) wait for one build instead of
  repeating it, and a temporary folder left by a killed builder is removed by the next one.
- `digest(*parts)` is the one short content digest used to name cache folders (bytes, strings or files).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic rename alone still keeps folders whole.
    fcntl = None

# flock locks belong to open file descriptions, so two threads of one process opening the lock file separately
# do exclude each other; this in-process lock also covers platforms without fcntl.
_THREAD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """`$LLAVA_CACHE`, else `~/.cache/llava`; created if missing."""
    root = Path(os.environ.get("LLAVA_CACHE") or Path.home() / ".cache" / "llava")
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts: bytes | str | Path, length: int = 16) -> str:
    """Short sha256 of strings, bytes and file contents (a file contributes its name and bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.name.encode())
            h.update(part.read_bytes())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:length]


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[bool]:
    """Hold an exclusive lock next to `target`; yields whether locking across processes is real."""
    with _THREAD_LOCK if fcntl is None else contextlib.nullcontext():
        if fcntl is None:
            yield False
            return
        lock_path = target.parent / f".{target.name}.lock"
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first running `build(tmp)` and renaming tmp into place if it does not exist yet."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target) as locked:
        if target.is_dir():  # another builder finished while we waited for the lock
            return target
        if locked:  # every builder holds the lock, so any temp sibling left now is from a killed build
            for stale in target.parent.glob(_tmp_prefix(target) + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f"{_tmp_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # plain mkdir (not mkdtemp) so the folder gets the user's umask, not 0700
        try:
            build(tmp)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.is_dir():  # lost a rename race with a builder that could not lock
                return target
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
