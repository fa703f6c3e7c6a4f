"""Run `glmtune` commands as separate processes without paying for Python's imports each time.

A server process imports torch, transformers, peft and glmtune once; for each command it forks a child
that changes into the command's folder, takes its environment, sends stdout and stderr to files and runs
`python -m glmtune ARGS` as a fresh process would (an uncaught exception prints its traceback, exit status
1). The child is a real process with its own exit status and its own copy of every module, so a command
run this way is isolated as one started with subprocess; only the imports are shared (about 2-3 s of a
2-core machine saved per command). The server never runs torch itself, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER = r"""
import json, logging, os, sys, traceback
from glmtune.models.kbit import hold_back_bitsandbytes
hold_back_bitsandbytes()  # as glmtune's main() holds it first: imported only by a command that needs it
import torch, transformers, peft  # noqa: F401,E402 - imported once, shared by every child
import glmtune.cli, glmtune.models.loader, glmtune.inference.generate  # noqa: F401


def child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["glmtune", *request["argv"]]
    try:
        code = glmtune.cli.main(request["argv"])
    except SystemExit as e:
        code = e.code
    except BaseException:  # as Python reports an uncaught exception
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):  # SystemExit("text"), as argparse never does
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code or 0


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(request)
        finally:
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedCli:
    """`run(argv, cwd, env, timeout)` -> subprocess.CompletedProcess, as `python -m glmtune ARGV` gives."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        self.folder = Path(tempfile.mkdtemp(prefix="glmtune-forked-cli-"))

    def run(self, argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        out, err = self.folder / "stdout", self.folder / "stderr"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        timer = _Timer(timeout, pid)
        try:
            reply = self.process.stdout.readline()
        finally:
            timer.cancel()
        if not reply:
            raise RuntimeError("the forked glmtune server died")
        if timer.fired:
            raise subprocess.TimeoutExpired(argv, timeout)
        code = json.loads(reply)["returncode"]
        return subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


class _Timer:
    """Kills the child `pid` after `seconds` (the server then answers with its exit status)."""

    def __init__(self, seconds: float, pid: int):
        import threading

        self.fired = False
        self._timer = threading.Timer(seconds, self._kill, args=(pid,))
        self._timer.daemon = True
        self._timer.start()

    def _kill(self, pid: int) -> None:
        self.fired = True
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()
