"""Checkpoints and adapter folders that a kill cannot leave half-written.

Everything is written under a hidden staging name (`.saving-...`) in the same folder and renamed into place
when complete. A rename within one file system is atomic, so `checkpoint-N` either does not exist or is
whole, and `--resume` can trust the newest one. Staging folders left by a killed run are removed when the
run starts again. (Renames survive a killed process; surviving a power cut would also need every file
fsynced, which glmtune does not do.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from glmtune.errors import GlmtuneError

STAGING = ".saving-"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint by the Trainer


def complete_checkpoints(directory: Path) -> list[Path]:
    """`checkpoint-N` folders holding a trainer state, oldest first."""
    found = [p for p in directory.glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete staging folders a killed run left behind; returns what was removed."""
    removed = [p for p in directory.glob(STAGING + "*") if p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def publish(staged: Path, final: Path) -> None:
    """Move a complete folder to its final name, replacing an older one of that name."""
    if final.exists():
        old = final.parent / f"{STAGING}replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Write a folder's files into the yielded staging folder; on success it becomes `final`."""
    final = Path(final)
    staged = final.parent / f"{STAGING}{final.name}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish(staged, final)


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is saved into `OUT/.saving-N/checkpoint-N` (every process writes its
    part there, e.g. its RNG state) and renamed to `OUT/checkpoint-N` by the main process once all are done;
    old checkpoints are rotated after that, so the newest complete one is never deleted first."""

    _staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        out = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        staging = out / f"{STAGING}{step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except OSError as e:  # a full disk, a vanished folder: no checkpoint, and a message instead of a trace
            shutil.rmtree(staging, ignore_errors=True)
            done = complete_checkpoints(out)
            raise GlmtuneError(f"cannot write checkpoint {step} to {out}: {e.strerror or e}; the last complete "
                               f"checkpoint is {done[-1] if done else 'none'} (free space, then --resume)") from None
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its files
        if self.args.should_save:
            publish(staging / f"{CHECKPOINT_PREFIX}{step}", out / f"{CHECKPOINT_PREFIX}{step}")
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(str(out), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
