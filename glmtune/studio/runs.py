"""The studio's training runs: each one a `glmtune train` process of its own in RUNS/NAME, started, stopped
cleanly, killed and resumed from the page, and listed with its status.

Everything is read back from the run folders (and the run's lock), never kept only in memory, so a
restarted studio finds its runs as they are. Besides what `glmtune train` writes, a run the studio started
holds:
    RUNS/NAME/studio.json     the train arguments, when it started, resumed and was killed, the process id
    RUNS/NAME/studio.log      the process's output (stdout and stderr), each start or resume marked
    RUNS/NAME/stop_requested  (while stopping) the process group to stop: see train/callbacks.py StopOnRequest

A run's name is one plain folder name: nothing a user types reaches outside the runs folder, and no shell
ever runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.errors import ERROR_PREFIX, GlmtuneError, shown
from glmtune.files import path_error, process_alive, write_text
from glmtune.train.checkpoints import complete_checkpoints
from glmtune.train.run_folder import STOP_FILE
from glmtune.train.runlock import lock_holder

STUDIO_FILE = "studio.json"
LOG_FILE = "studio.log"
MARK = "=== glmtune studio: "  # starts the line written into studio.log before each start and resume
NAME_LIMIT = 100
# Options the manager sets itself (in the spellings train accepts: --x-y, --x_y, --no-x, x=..., tutorials').
OWNED_OPTIONS = ("output_dir", "resume", "overwrite", "overwrite_output_dir", "resume_from_checkpoint")
RUN_MARKERS = (STUDIO_FILE, "resolved_config.yaml", "train_log.jsonl")
STATUSES = ("starting", "running", "finished", "stopped", "failed", "interrupted")
STATUS_TAIL = 256 * 1024  # how much of the end of studio.log is read to tell a failure
LOG_LIMIT = 256 * 1024 * 1024  # of train_log.jsonl (a line a step: far more than any run writes)


def check_run_name(name: str) -> str:
    """`name` if it is one plain folder name (letters, digits, '-', '_', '.'; not starting with '.'; at most
    100 characters), else a GlmtuneError: no slash, no '..', no absolute path can reach outside the runs
    folder."""
    rule = f"letters, digits, '-', '_' and '.', not starting with '.', at most {NAME_LIMIT} characters"
    if not isinstance(name, str) or not name:
        raise GlmtuneError(f"give the run a name: {rule}")
    if (len(name) > NAME_LIMIT or len(name.encode("utf-8", "replace")) > 255 or name.startswith(".")
            or not all(c.isalnum() or c in "-_." for c in name)):
        raise GlmtuneError(f"run name {shown(name)} is not a plain folder name: use {rule}")
    return name


@dataclass
class RunInfo:
    name: str
    folder: Path
    status: str  # one of STATUSES
    step: int  # the last step in train_log.jsonl (0 before the first)
    max_steps: int | None  # the planned total, once training began
    error: str | None  # failed: the last `glmtune: error:` message; else the log's last line
    started: float | None  # epoch seconds
    adapter: Path | None  # OUT/best, else OUT/adapter, when written
    resumable: bool  # not running, not finished, and a complete checkpoint to continue from
    method: str | None
    model: str | None


class RunManager:
    """The runs in `runs_dir`: one subfolder each."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir).absolute()
        self._children: dict[int, subprocess.Popen] = {}  # only to reap them: status never depends on these
        self._guard = threading.Lock()  # one start or resume at a time (the page may call from several threads)
        self._file_cache: dict[tuple[Path, Any], tuple[tuple[int, int, int], Any]] = {}  # see _read_once

    # -- actions -------------------------------------------------------------------------------------------

    def start(self, name: str, words: list[str]) -> RunInfo:
        """Start `glmtune train WORDS --output-dir RUNS/NAME` as a process (and session) of its own."""
        folder = self.runs_dir / check_run_name(name)
        words = _checked_words(words)
        with self._guard:
            self._claim(folder)
            record = {"words": words, "started": time.time(), "pid": None, "resumes": []}
            self._spawn(folder, record, resume=False)
        return self.info(name)

    def stop(self, name: str) -> None:
        """Ask the run to stop at its next step's end, with a checkpoint: it ends "stopped" and can be resumed.
        A run still loading stops once training starts (at the first step)."""
        folder = self._run_folder(name)
        info = self._info(folder)
        if info.status not in ("starting", "running"):
            raise GlmtuneError(f"run {name} is {info.status}: there is nothing to stop")
        group = self._group(folder)
        if group is None:
            raise GlmtuneError(f"cannot tell which process runs {name}; stop it where it was started")
        write_text(folder / STOP_FILE, f"{group}\n")

    def kill(self, name: str) -> None:
        """SIGTERM to the run's process group, for a run that does not stop (it ends "interrupted"; the last
        checkpoint, if any, can be resumed)."""
        folder = self._run_folder(name)
        if self._info(folder).status not in ("starting", "running"):
            raise GlmtuneError(f"run {name} is not running: there is nothing to kill")
        record = _read_record(folder)
        pid = _record_pid(record)
        try:
            if pid is not None and _is_run_process(pid, folder):
                with self._guard:  # so the end it comes to reads as interrupted, not failed (a launcher's traceback)
                    record["killed"] = time.time()
                    write_text(folder / STUDIO_FILE, json.dumps(record, indent=2) + "\n")
                os.killpg(pid, signal.SIGTERM)  # the studio started it as the leader of its own session
            elif (holder := lock_holder(folder)):
                os.kill(holder, signal.SIGTERM)  # started elsewhere: only its training process, not its group
            else:
                raise GlmtuneError(f"cannot tell which process runs {name}; stop it where it was started")
        except ProcessLookupError:
            pass  # ended meanwhile
        except PermissionError:
            raise GlmtuneError(f"run {name} belongs to another user: it cannot be killed from here") from None

    def resume(self, name: str) -> RunInfo:
        """Continue a stopped, failed or interrupted run from its newest complete checkpoint, with the words it
        was started with plus --resume (a run started elsewhere: with its resolved_config.yaml)."""
        folder = self._run_folder(name)
        with self._guard:
            info = self._info(folder)
            if info.status in ("starting", "running"):
                raise GlmtuneError(f"run {name} is {info.status}: stop it before resuming it")
            if not info.resumable:
                raise GlmtuneError(f"run {name} cannot be resumed: "
                                   + ("it is finished" if info.status == "finished" else "it has no complete "
                                      "checkpoint-N to continue from (start a new run)"))
            record = _read_record(folder)
            if record is None:
                if not (folder / "resolved_config.yaml").is_file():
                    raise GlmtuneError(f"run {name} was not started by the studio and has no resolved_config.yaml; "
                                       "resume it with glmtune train --resume")
                record = {"words": [str(folder / "resolved_config.yaml")], "started": info.started, "resumes": []}
            if not isinstance(record.get("resumes"), list):
                record["resumes"] = []
            with contextlib.suppress(OSError):  # (one left anyway names another process: the run ignores it)
                (folder / STOP_FILE).unlink(missing_ok=True)  # a stale request must not stop the new process
            record["resumes"].append(time.time())
            self._spawn(folder, record, resume=True)
        return self.info(name)

    # -- reading -------------------------------------------------------------------------------------------

    def runs(self) -> list[RunInfo]:
        """Every run in the runs folder (a direct subfolder with studio.json, resolved_config.yaml or
        train_log.jsonl, started by the studio or not), newest first."""
        self._reap()
        try:
            entries = list(self.runs_dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise path_error(self.runs_dir, e, "cannot read the runs folder") from None
        found = []
        for folder in entries:
            if _named_plainly(folder.name) and _is_run(folder):
                try:
                    found.append(self._info(folder))
                except OSError:
                    continue  # removed while being read
        return sorted(found, key=lambda r: r.started or 0.0, reverse=True)

    def info(self, name: str) -> RunInfo:
        self._reap()
        return self._info(self._run_folder(name))

    def log_tail(self, name: str, max_chars: int = 20000) -> str:
        """The end of the run's output (studio.log), with each progress bar line as it was last drawn."""
        folder = self._run_folder(name)
        data, whole = _read_tail(folder / LOG_FILE, max(4 * max_chars, 64 * 1024))
        lines = _screen_lines(data.decode("utf-8", "replace"))
        if not whole and lines:
            lines = lines[1:]  # the first line was cut by where reading began
        return "\n".join(lines)[-max_chars:] if max_chars > 0 else ""

    def curves(self, name: str) -> list[dict[str, Any]]:
        """The train_log.jsonl entries with a loss or eval loss: {"step", "loss"?, "eval_loss"?}, as floats."""
        points = []
        for entry in self._read_once(self._run_folder(name) / "train_log.jsonl", _read_log):
            step = entry.get("step")
            if not _is_int(step):
                continue
            point: dict[str, Any] = {"step": step}
            for key in ("loss", "eval_loss"):
                value = entry.get(key)
                if _is_number(value) and math.isfinite(value):
                    point[key] = float(value)
            if len(point) > 1:
                points.append(point)
        return points

    # -- inside --------------------------------------------------------------------------------------------

    def _run_folder(self, name: str) -> Path:
        folder = self.runs_dir / check_run_name(name)
        if folder.is_symlink() or not folder.is_dir() or not _is_run(folder):
            raise GlmtuneError(f"there is no run named {name} in {self.runs_dir}")
        return folder

    def _claim(self, folder: Path) -> None:
        """Make `folder` this new run's, or refuse: it must not hold a run (or anything else) yet."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise path_error(self.runs_dir, e, "cannot create the runs folder") from None
        taken = (f"a run named {folder.name} already exists in {self.runs_dir}; choose another name, or resume it")
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise GlmtuneError(f"{folder} already exists and is not a run folder; choose another name")
        if folder.is_dir():
            if _is_run(folder):
                raise GlmtuneError(taken)
            if any(folder.iterdir()):
                raise GlmtuneError(f"{folder} already exists and holds other files; choose another name")
        else:
            try:
                folder.mkdir()
            except FileExistsError:
                raise GlmtuneError(taken) from None
            except OSError as e:
                raise path_error(folder, e, "cannot create the run folder") from None
        try:  # exclusive: of two studios starting one name, one gets it
            with open(folder / STUDIO_FILE, "x", encoding="utf-8") as f:
                f.write("{}\n")
        except FileExistsError:
            raise GlmtuneError(taken) from None
        except OSError as e:
            raise path_error(folder / STUDIO_FILE, e, "cannot write") from None

    def _spawn(self, folder: Path, record: dict[str, Any], *, resume: bool) -> None:
        """Start the run's process (no shell; its own session; output appended to studio.log) and record it."""
        words = [str(w) for w in record.get("words") or []]
        train = ["train", *words, "--output-dir", str(folder), *(["--resume"] if resume else [])]
        write_text(folder / STUDIO_FILE, json.dumps(record, indent=2) + "\n")  # before the process exists
        try:
            log_file = open(folder / LOG_FILE, "ab")
        except OSError as e:
            raise path_error(folder / LOG_FILE, e, "cannot write") from None
        with log_file:
            log_file.write(f"\n{MARK}{'resumed' if resume else 'started'} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                           f"glmtune {shlex.join(train)}\n".encode())
            log_file.flush()
            try:
                process = subprocess.Popen([sys.executable, "-m", "glmtune", *train], stdin=subprocess.DEVNULL,
                                           stdout=log_file, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                           env=_run_environment(folder), start_new_session=True)
            except OSError as e:
                message = f"cannot start glmtune train: {e.strerror or e}"
                log_file.write(f"{ERROR_PREFIX}{message}\n".encode())
                raise GlmtuneError(message) from None
        self._children[process.pid] = process
        record["pid"] = process.pid
        write_text(folder / STUDIO_FILE, json.dumps(record, indent=2) + "\n")

    def _reap(self) -> None:
        for pid, process in list(self._children.items()):
            if process.poll() is not None:
                self._children.pop(pid, None)

    def _group(self, folder: Path) -> int | None:
        """The process group a stop request for this run names: its training process's (running), else the
        group the studio started it in (still loading)."""
        holder = lock_holder(folder)
        if holder:
            try:
                return os.getpgid(holder)
            except OSError:
                pass
        pid = _record_pid(_read_record(folder))
        if pid is not None and _is_run_process(pid, folder):
            return pid  # the leader of its own session
        return None

    def _info(self, folder: Path) -> RunInfo:
        record = _read_record(folder)
        summary = self._log_summary(folder / "train_log.jsonl")
        metrics = _read_json(folder / "metrics.json")
        step, max_steps = summary["step"], summary["max_steps"]
        if isinstance(metrics, dict) and _is_int(metrics.get("global_step")):
            step = max(step, metrics["global_step"])
        attempt = _last_attempt(record)
        output = self._read_once(folder / LOG_FILE, _log_lines)
        errors = [line[len(ERROR_PREFIX):] for line in output if line.startswith(ERROR_PREFIX)]
        last_line = output[-1].strip() if output else None
        metrics_mtime = _mtime(folder / "metrics.json")
        # metrics.json is written as a run ends: one from before the last start or resume is an earlier end's
        ended = metrics_mtime is not None and (attempt is None or metrics_mtime > attempt)

        pid = _record_pid(record)
        if lock_holder(folder) is not None:
            status = "running"
        elif ended:
            reached = max_steps is None or step >= max_steps
            status = "stopped" if not reached or (max_steps is None and (folder / STOP_FILE).exists()) else "finished"
        elif pid is not None and _is_run_process(pid, folder):
            status = "starting"
        elif attempt is not None and _is_number(record.get("killed")) and record["killed"] >= attempt:
            status = "interrupted"
        elif errors or any(line.startswith("Traceback (most recent call last)") for line in output):
            status = "failed"
        else:
            status = "interrupted"
        error = (errors[-1] if errors else last_line) if status == "failed" else last_line

        checkpoints = complete_checkpoints(folder)
        adapter = next((folder / d for d in ("best", "adapter") if (folder / d).is_dir()), None)
        method, model = _method_and_model(folder, record)
        started = record.get("started") if record and _is_number(record.get("started")) else None
        if started is None:
            started = summary["first_time"] if summary["first_time"] is not None else _mtime(
                folder / "resolved_config.yaml")
        return RunInfo(name=folder.name, folder=folder, status=status, step=step, max_steps=max_steps,
                       error=error or None, started=started, adapter=adapter,
                       resumable=bool(checkpoints) and status in ("stopped", "failed", "interrupted"),
                       method=method, model=model)

    def _read_once(self, path: Path, read):
        """`read(path)`, read again only when the file changed (the page asks for every run every 2 seconds,
        and an ended run's files do not change)."""
        try:
            info = os.stat(path)
            key = (info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError:
            return read(path)
        cached = self._file_cache.get((path, read))
        if cached is not None and cached[0] == key:
            return cached[1]
        value = read(path)
        self._file_cache[(path, read)] = (key, value)
        return value

    def _log_summary(self, path: Path) -> dict[str, Any]:
        """The last step, the last planned max_steps and the first time in train_log.jsonl."""
        return self._read_once(path, _summarize_log)



# -- helpers ---------------------------------------------------------------------------------------------------

def _run_environment(folder: Path) -> dict[str, str]:
    """The run's environment: its output unbuffered (the page shows it as it comes), and the logging backends
    report_to may name writing into the run folder rather than the studio's working folder, unless the user
    pointed them elsewhere already."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_DIR", str(folder))
    env.setdefault("MLFLOW_TRACKING_URI", (folder / "mlruns").as_uri())
    return env



def _checked_words(words: list[str]) -> list[str]:
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise GlmtuneError("the train arguments must be a list of words")
    for word in words:
        if "\0" in word:
            raise GlmtuneError(f"a train argument holds a NUL character: {shown(word)}")
        owned = _owned_option(word)
        if owned:
            raise GlmtuneError(f"leave {word.split('=', 1)[0]} out: the studio sets {owned} itself (a run writes into "
                               "its own folder; continue a run with Resume)")
    return list(words)


def _owned_option(word: str) -> str | None:
    """The option the manager owns that `word` sets (--output-dir X, --output_dir=X, output_dir=X, --resume,
    --no-overwrite, --overwrite_output_dir ...), else None."""
    if word.startswith("-"):
        key = word.lstrip("-").split("=", 1)[0]
    elif "=" in word:
        key = word.split("=", 1)[0]
    else:
        return None
    key = key.strip().lower().replace("-", "_")
    key = key.removeprefix("no_")
    return key if key in OWNED_OPTIONS else None


def _named_plainly(name: str) -> bool:
    try:
        check_run_name(name)
    except GlmtuneError:
        return False
    return True


def _is_run(folder: Path) -> bool:
    if folder.is_symlink() or not folder.is_dir():
        return False
    return any((folder / name).exists() for name in RUN_MARKERS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _read_tail(path: Path, limit: int) -> tuple[bytes, bool]:
    """The last `limit` bytes of a regular file (no link followed, no pipe waited on), and whether that is
    the whole file; (b"", True) when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b"", True
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b"", True
        start = max(0, info.st_size - limit)
        chunks, offset = [], start
        while offset < info.st_size:
            chunk = os.pread(fd, min(1 << 20, info.st_size - offset), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks), start == 0
    except OSError:
        return b"", True
    finally:
        os.close(fd)


def _screen_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar redraws its line after '\\r', only the last drawing stays."""
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]


def _summarize_log(path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"step": 0, "max_steps": None, "first_time": None}
    for entry in _read_log(path):
        if _is_int(entry.get("step")):
            summary["step"] = entry["step"]
        if _is_int(entry.get("max_steps")) and entry["max_steps"] > 0:
            summary["max_steps"] = entry["max_steps"]
        if summary["first_time"] is None and _is_number(entry.get("time")):
            summary["first_time"] = float(entry["time"])
    return summary


def _log_lines(path: Path) -> list[str]:
    """The non-empty lines of studio.log since the last start or resume (of its last STATUS_TAIL bytes)."""
    data, whole = _read_tail(path, STATUS_TAIL)
    lines = _screen_lines(data.decode("utf-8", "replace"))
    if not whole and lines:
        lines = lines[1:]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(MARK):
            lines = lines[i + 1:]
            break
    return [line for line in lines if line.strip()]


def _read_json(path: Path) -> Any:
    data, _ = _read_tail(path, 1 << 20)
    if not data:
        return None
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


def _read_record(folder: Path) -> dict[str, Any] | None:
    record = _read_json(folder / STUDIO_FILE)
    return record if isinstance(record, dict) and "words" in record else None


def _record_pid(record: dict[str, Any] | None) -> int | None:
    pid = record.get("pid") if record else None
    return pid if _is_int(pid) and pid > 0 else None


def _last_attempt(record: dict[str, Any] | None) -> float | None:
    """When the studio last started or resumed the run (None: a run started elsewhere)."""
    if not record:
        return None
    times = [t for t in [record.get("started"), *(record.get("resumes") or [])] if _is_number(t)]
    return max(times) if times else None


def _read_log(path: Path) -> list[dict[str, Any]]:
    """train_log.jsonl's entries; lines that are not JSON objects (cut by a kill) are skipped."""
    data, _ = _read_tail(path, LOG_LIMIT)
    entries = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _is_run_process(pid: int, folder: Path) -> bool:
    """Whether `pid` is alive and a glmtune process writing `folder` (not a process that got its id later,
    nor a child that ended and was not yet reaped)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().decode("utf-8", "replace").split("\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists() and process_alive(pid)  # no /proc here: alive is all we know
    except OSError:
        return False
    return any("glmtune" in w for w in words) and str(folder) in words


def _words_value(words: list[str], option: str) -> str | None:
    """The last value `words` give `option` (--option V, --option=V, option=V, with - or _)."""
    value = None
    for i, word in enumerate(words):
        if word.startswith("-"):
            key, eq, rest = word.lstrip("-").partition("=")
            if key.replace("-", "_") == option:
                value = rest if eq else (words[i + 1] if i + 1 < len(words) else None)
        elif "=" in word:
            key, _, rest = word.partition("=")
            if key.strip().replace("-", "_") == option:
                value = rest
    return value


def _method_and_model(folder: Path, record: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """From resolved_config.yaml, else from the words the run was started with (else train's defaults)."""
    config = folder / "resolved_config.yaml"
    if config.is_file():
        from glmtune.config import read_config_file

        try:
            values = read_config_file(config)
        except GlmtuneError:
            values = {}
        method, model = values.get("method"), values.get("model")
        if isinstance(method, str) or isinstance(model, str):
            return (method if isinstance(method, str) else None, model if isinstance(model, str) else None)
    if not record:
        return None, None
    words = [str(w) for w in record.get("words") or []]
    from glmtune.config import TrainConfig

    defaults = {name: TrainConfig.__dataclass_fields__[name].default for name in ("method", "model")}
    return (_words_value(words, "method") or defaults["method"], _words_value(words, "model") or defaults["model"])
