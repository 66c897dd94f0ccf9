"""Atomic file writes: a reader never sees a half-written file, and concurrent writers of the
same content never corrupt it (each writes its own temporary file, then renames it in place)."""

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the block succeeds it replaces ``path``.
    The temporary file's name holds its writer's pid; those of writers that are gone (killed
    mid-write: a SIGKILL during a cache build left 2 x 88 MB) are removed first, while a live
    writer's stay."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    prefix = f".{path.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give it the mode open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_orphans(path: Path) -> None:
    """Remove the temporary files of ``path`` whose writer's process no longer exists."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
