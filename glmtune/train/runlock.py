"""One training run per output folder.

`glmtune train` holds an exclusive `flock` on OUT/.glmtune.lock from the moment it starts writing into OUT
until it ends, so a second run started into the same folder stops with one line instead of mixing its
files with the first's. The lock is the operating system's: it goes with the process, also when the
process is killed (a lock file left by a kill holds nothing and is taken over). Only the main process of a
distributed run takes it; the others write nothing of glmtune's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.files import path_error

LOCK_FILE = ".glmtune.lock"
# lock_holder() holds a folder's lock (shared) for a moment to look: a run taking the lock just then waits
# that out instead of refusing.
BUSY_TRIES, BUSY_WAIT_S = 10, 0.05


class RunLock:
    """`with RunLock(folder):` creates `folder` if needed and holds its lock; on leaving, the lock file is
    removed, and so is every folder this lock created that is still empty (a run that failed before
    writing anything leaves nothing behind)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> RunLock:
        try:
            self._create_folder()
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _create_folder(self) -> None:
        missing, folder = [], self.folder.absolute()
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        try:
            for path in reversed(missing):
                path.mkdir()
                self.created.append(path)
        except FileExistsError:
            pass  # made by someone else just now: the lock decides who writes
        except OSError as e:
            raise path_error(self.folder, e, "cannot create output_dir") from None

    def _lock(self) -> None:
        path = self.folder / LOCK_FILE
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise path_error(path, e, "cannot lock output_dir") from None
            if not _lock_soon(fd):
                holder = _holder(fd)
                os.close(fd)
                raise GlmtuneError(f"output_dir {self.folder} is in use by another glmtune train run"
                                   f"{f' (process {holder})' if holder else ''}; wait for it to finish, or choose "
                                   "another output_dir") from None
            # The run that held it may have removed the file between our open and our lock: then ours is a
            # lock on a file nobody else can find. Lock the file that is there now instead.
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return
        raise GlmtuneError(f"cannot lock output_dir {self.folder}: its lock file keeps changing")

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.folder / LOCK_FILE)  # still holding the lock: see _lock for who comes next
            os.close(self.fd)
            self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: a run that wrote something keeps its folder
        self.created = []


def _lock_soon(fd: int) -> bool:
    """Take the exclusive lock, waiting out a holder that only looks (lock_holder); False if it stays held."""
    for attempt in range(BUSY_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < BUSY_TRIES:
                time.sleep(BUSY_WAIT_S)
    return False


def lock_holder(folder: Path) -> int | None:
    """The id of the process whose run holds `folder`'s lock (0 when held by a process that has not written
    its id yet), or None when no run holds it. Creates nothing; takes a shared lock for a moment to look,
    which a run starting just then waits out (see `_lock_soon`)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # no lock file: no run holds it (a run removes it only while still holding it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd) or 0
        except OSError:
            return None  # not a file flock works on: no run's lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The process id the lock's holder wrote into the file, if readable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
