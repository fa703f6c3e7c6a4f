"""Files a user names: read without surprises, checked before any work, written whole or not at all.

Every command goes through here for the files it reads and writes, so that a careless or hostile path (a
name too long for the file system, a folder where a file belongs, a file where a folder belongs, a device
such as /dev/full, an output that is also an input, JSON nested thousands deep) becomes one GlmtuneError
up front, not a traceback after a model has loaded, and nothing already on disk is replaced unless asked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from glmtune.errors import GlmtuneError

# Deeper JSON/YAML is refused: no data row or config needs it, and Python's JSON parser and encoder recurse
# (a RecursionError near 1,000 levels, earlier when called from deep inside a program).
MAX_NESTING = 100


# ---------------------------------------------------------------------------------------------------------
# JSON with bounded nesting


class NestingError(ValueError):
    """A JSON value nested deeper than MAX_NESTING; callers add where it is."""

    def __init__(self):
        super().__init__(f"nested more than {MAX_NESTING} levels deep")


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether lists and dicts in `value` nest deeper than `limit`; iterative, and it stops at the first
    branch that does (cost: the containers it visits)."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def loads(text: str) -> Any:
    """`json.loads`, with nesting beyond MAX_NESTING raised as NestingError (json.JSONDecodeError as usual)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise NestingError() from None
    if isinstance(value, (dict, list)) and too_deep(value):
        raise NestingError()
    return value


def raw_decode(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[Any, int]:
    """`decoder.raw_decode(text, pos)` with `loads`'s bound on nesting."""
    try:
        value, end = decoder.raw_decode(text, pos)
    except RecursionError:
        raise NestingError() from None
    if isinstance(value, (dict, list)) and too_deep(value):
        raise NestingError()
    return value, end


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of a file the user names (a BOM dropped), or a GlmtuneError: not found, a folder, not
    readable, or `path:line` of the first byte that is not UTF-8."""
    path = Path(path)
    check_input_file(path, what)
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise GlmtuneError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON value in `path`, or a GlmtuneError that says `path:line` and what is wrong."""
    text = read_text(path, what)
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise GlmtuneError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except NestingError as e:
        raise GlmtuneError(f"{path}: {e}") from None


def read_json_object(path: str | Path, what: str = "file", damaged: str = "") -> dict[str, Any]:
    """The JSON object in `path` (read_json's errors), or a GlmtuneError that says what it holds instead;
    `damaged` is added to that message (e.g. "; the adapter folder is damaged")."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise GlmtuneError(f"{path} must hold a JSON object, not {type(value).__name__}{damaged}")
    return value


# ---------------------------------------------------------------------------------------------------------
# What a path names


def short(path: str | Path, limit: int = 160) -> str:
    """A path for a message: whole when short, else its start and end (a 5,000-character name must not
    become a 5,000-character error line)."""
    text = str(path)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-(limit // 3):]} ({len(text):,} characters)"


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists and is not a folder (a file used as a folder)."""
    for parent in reversed(path.absolute().parents):
        try:
            mode = os.stat(parent).st_mode
        except OSError:
            return None
        if not stat.S_ISDIR(mode):
            return parent
    return None


def path_error(path: str | Path, e: OSError, doing: str = "") -> GlmtuneError:
    """One line for an OSError about a path the user gave (or a file written for them)."""
    path = Path(path)
    where = short(path)
    if e.errno == errno.ENAMETOOLONG:
        return GlmtuneError(f"{where}: the name is too long for the file system; choose a shorter one")
    if e.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return GlmtuneError(f"{where}: {_not_a_folder(blocker)}")
    if e.errno == errno.ELOOP:
        return GlmtuneError(f"{where}: too many levels of symbolic links (a link that points to itself?)")
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and not is_special(_quiet_status(path)):
        reason += " (free some space and run the command again)"
    return GlmtuneError(f"{doing + ' ' if doing else ''}{where}: {reason}".strip())


def _not_a_folder(path: Path) -> str:
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = False
    return f"{short(path)} is a file, not a folder" if regular else f"{short(path)} is not a folder"


def _quiet_status(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def lstat(path: str | Path) -> os.stat_result | None:
    """os.lstat of `path`, None when nothing is there; a path that cannot name a file (too long, under a
    file, a loop of links, not allowed to look) is a GlmtuneError."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise path_error(path, e) from None


def status(path: str | Path) -> os.stat_result | None:
    """Like `lstat`, but of what a symbolic link points to (None for a dangling link)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise path_error(path, e) from None


def _check_new_names(path: Path) -> Path:
    """For a path that does not exist yet: the nearest existing ancestor, which must be a writable folder,
    and every name still to be created must fit the file system."""
    existing = path.absolute()
    missing = []
    while lstat(existing) is None and existing != existing.parent:
        missing.append(existing.name)
        existing = existing.parent
    info = status(existing)
    if info is None:
        raise GlmtuneError(f"{short(path)}: {short(existing)} is a broken symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise GlmtuneError(f"{short(path)}: {_not_a_folder(existing)}")
    limit = _name_max(existing)
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise GlmtuneError(f"{short(path)}: the name {short(name, 60)} is too long for the file system "
                               f"(at most {limit} bytes); choose a shorter one")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GlmtuneError(f"cannot write {short(path)}: the folder {short(existing)} is not writable")
    return existing


def is_special(info: os.stat_result | None) -> bool:
    """A device, pipe or socket (/dev/null, /dev/stdout, a FIFO): written in place, never replaced."""
    return info is not None and not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: through symbolic links (resolved paths) and hard links (samefile)."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_input_file(path: str | Path, what: str = "file") -> Path:
    """A file a command reads: it must exist and be a file (a device or pipe is accepted)."""
    path = Path(path)
    info = status(path)
    if info is None:
        raise GlmtuneError(f"{what} not found: {short(path)}")
    if stat.S_ISDIR(info.st_mode):
        raise GlmtuneError(f"not a file: {short(path)} is a folder")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise path_error(path, e, "cannot read") from None


def check_output_file(path: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = (),
                      option: str = "--output") -> Path:
    """Refuse, before any work, an output file that cannot or must not be written: a folder, a path under
    a file, a name too long, an unwritable folder, one of the command's `inputs` (also through links, never
    allowed), an existing file without `overwrite`. A device or pipe (/dev/null, /dev/stdout) is fine: it
    is written in place and holds nothing to lose."""
    path = Path(path)
    if not str(path):
        raise GlmtuneError(f"{option} needs a file name")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise GlmtuneError(f"{option} {short(path)} is the input file {short(source)}; writing it would "
                               "destroy what is read: choose another output file")
    link = lstat(path)
    if link is None:
        _check_new_names(path)
        return path
    target = status(path)
    if target is not None and stat.S_ISDIR(target.st_mode):
        raise GlmtuneError(f"{option} {short(path)} is a folder; give a file name")
    if is_special(target):
        return path
    if not overwrite:
        what = "is a symbolic link" if stat.S_ISLNK(link.st_mode) else "already exists"
        raise GlmtuneError(f"{option} {short(path)} {what}; pass --overwrite to replace it")
    if not os.access(path.absolute().parent, os.W_OK | os.X_OK):
        raise GlmtuneError(f"cannot replace {short(path)}: its folder is not writable")
    return path


def check_output_folder(path: str | Path, *, option: str = "--output") -> bool:
    """An output folder: it may exist (True) or not (False, then it can be created); a file there, a path
    under a file, a name too long or an unwritable place is refused. What an existing folder may hold is
    the caller's question."""
    path = Path(path)
    if not str(path):
        raise GlmtuneError(f"{option} needs a folder name")
    info = status(path)
    if info is None:
        if lstat(path) is not None:
            raise GlmtuneError(f"{option} {short(path)} is a broken symbolic link")
        _check_new_names(path)
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise GlmtuneError(f"{option} {short(path)} exists and is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise GlmtuneError(f"cannot write to {option} {short(path)}: the folder is not writable")
    return True


def writable_folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None: tried for real, with a
    temporary file, because permissions alone do not tell (root, read-only mounts, immutable folders)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(path_error(folder, e))
    return None


# ---------------------------------------------------------------------------------------------------------
# Writing


def _new_temporary(path: Path) -> str:
    """A new empty hidden file beside `path`, created with the permissions a plain new file gets (the
    umask applies, unlike tempfile's private 0600)."""
    for attempt in range(100):
        name = str(path.parent / f".{path.name[:100]}.{os.getpid()}-{attempt}.tmp")
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextlib.contextmanager
def replacing_all(paths: list[Path], *, binary: bool = False) -> Iterator[list[IO]]:
    """Write the whole new content of several files: each goes into a hidden temporary file beside it, and
    only when every one is written do they replace their paths (a symbolic link is replaced itself, never
    the file it points to). A device or pipe is written in place. On failure (a full disk, /dev/full, an
    exception in the block) every path is left as it was and temporary files are removed; an OSError is
    raised as one GlmtuneError line."""
    paths = [Path(p) for p in paths]
    opened: list[tuple[Path, IO, str | None]] = []  # (path, file, temporary name or None when in place)
    mode = "wb" if binary else "w"
    encoding = None if binary else "utf-8"
    current = paths[0] if paths else None
    renamed: set[str] = set()
    try:
        try:
            for path in paths:
                current = path
                if is_special(status(path)):
                    opened.append((path, open(path, mode, encoding=encoding), None))
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = _new_temporary(path)
                try:
                    opened.append((path, open(tmp, mode, encoding=encoding), tmp))
                except OSError:
                    os.unlink(tmp)
                    raise
            yield [handle for _, handle, _ in opened]
            for path, handle, _ in opened:
                current = path
                handle.close()  # flushes: a full disk shows here
            for path, _, tmp in opened:
                current = path
                if tmp is not None:
                    os.replace(tmp, path)
                    renamed.add(tmp)
        except OSError as e:
            raise path_error(current, e, "cannot write") from None
    finally:
        for _, handle, tmp in opened:
            with contextlib.suppress(OSError):
                handle.close()
            if tmp is not None and tmp not in renamed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


@contextlib.contextmanager
def replacing(path: str | Path, *, binary: bool = False) -> Iterator[IO]:
    """`replacing_all` for one file."""
    with replacing_all([Path(path)], binary=binary) as (handle,):
        yield handle


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8), whole or not at all (see `replacing_all`)."""
    with replacing(path) as f:
        f.write(text)


def swap_in(staged: Path, final: Path, replaced: Path) -> None:
    """Move the complete folder `staged` to `final` (renames, atomic within one file system). An older
    `final` (a folder, a file or a link) is renamed to `replaced` first and removed after; the rename is made
    durable where the platform allows."""
    if final.is_symlink() or final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staged, final)
        if replaced.is_dir() and not replaced.is_symlink():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            replaced.unlink(missing_ok=True)
    else:
        os.replace(staged, final)
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged_folder(final: Path, staged: Path, replaced: Path) -> Iterator[Path]:
    """Write a folder's files into `staged` (made afresh, beside `final`); when the block ends without an
    error it is swapped in as `final` (swap_in), otherwise it is removed and `final` stays as it was."""
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    swap_in(staged, final, replaced)


# ---------------------------------------------------------------------------------------------------------
# Leftovers of killed runs


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a reused id counts as alive: nothing is
    removed that might still be in use)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def remove_stale(folder: Path, pattern: str, owner: Callable[[Path], int | None] | None = None) -> list[Path]:
    """Delete what a killed run left in `folder` under names matching `pattern` (hidden staging folders or
    files); with `owner`, only entries whose owning process id it reads from the name is no longer alive.
    Returns what was removed."""
    removed = []
    try:
        found = sorted(folder.glob(pattern))
    except OSError:
        return removed
    for path in found:
        pid = owner(path) if owner else None
        if pid is not None and process_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed
