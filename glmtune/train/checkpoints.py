"""Checkpoints and adapter folders that a kill cannot leave half-written.

Everything is written under a hidden staging name (`.saving-...`) in the same folder and renamed into place
when complete. A rename within one file system is atomic, so `checkpoint-N` either does not exist or is
whole, and `--resume` can trust the newest one. Staging folders left by a killed run are removed when the
run starts again. (Renames survive a killed process; surviving a power cut would also need every file
fsynced, which glmtune does not do.)
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from glmtune import files
from glmtune.errors import GlmtuneError, one_line
from glmtune.files import read_json, remove_stale, swap_in

STAGING = ".saving-"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint by the Trainer


def complete_checkpoints(directory: Path) -> list[Path]:
    """`checkpoint-N` folders holding a trainer state, oldest first."""
    found = [p for p in directory.glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete staging folders a killed run left behind; returns what was removed. (The caller holds the run
    folder's lock, so no other run is writing them.)"""
    return remove_stale(directory, STAGING + "*")


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse, before anything loads, a checkpoint the Trainer would stop on with a traceback: a
    trainer_state.json that is not a JSON object with a step, or a weight, optimizer, scheduler or random
    state file that is cut short or damaged."""
    earlier = [p for p in complete_checkpoints(checkpoint.parent) if p != checkpoint]
    advice = (f"delete {checkpoint} to resume from {earlier[-1].name}, or start again with --overwrite" if earlier
              else "start again with --overwrite")
    state = checkpoint / STATE_FILE
    try:
        data = read_json(state, "trainer state")
    except GlmtuneError as e:
        raise GlmtuneError(f"--resume: {e}; the checkpoint is damaged: {advice}") from None
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int) or isinstance(
            data.get("global_step"), bool):
        raise GlmtuneError(f"--resume: {state} does not hold a trainer state (a JSON object with global_step); the "
                           f"checkpoint is damaged: {advice}")
    for path in sorted(checkpoint.iterdir()):
        problem = _file_problem(path) if path.is_file() else None
        if problem:
            raise GlmtuneError(f"--resume: {path} {problem}; the checkpoint is damaged: {advice}")


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be read back, or None. PyTorch files (.pt, .pth, .bin) are zip archives:
    every member's checksum is tested, without unpickling anything; safetensors files must cover every
    tensor their header lists."""
    import zipfile

    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            if not zipfile.is_zipfile(path):
                return "is cut short or is not a PyTorch file"
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            return f"is damaged (its part {bad} fails its checksum)" if bad else None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as weights:
                for name in weights.keys():
                    weights.get_slice(name).get_shape()
    except Exception as e:  # noqa: BLE001 - zipfile, OSError, and safetensors' own error type all mean damaged
        return f"cannot be read ({type(e).__name__}: {one_line(e, 200)})"
    return None


def checkpoint_shapes(checkpoint: Path) -> list[tuple[int, ...]] | None:
    """The shapes of the trained tensors a checkpoint holds (its adapter or trained-weights file), sorted;
    None when it has no safetensors weights to read them from."""
    from safetensors import safe_open

    for name in ("adapter_model.safetensors", "model.safetensors"):
        path = checkpoint / name
        if path.is_file():
            with safe_open(str(path), "pt") as weights:
                return sorted(tuple(weights.get_slice(k).get_shape()) for k in weights.keys())
    return None


def publish(staged: Path, final: Path) -> None:
    """Move a complete folder to its final name, replacing an older one of that name."""
    swap_in(staged, final, final.parent / f"{STAGING}replaced-{final.name}")


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Write a folder's files into the yielded staging folder; on success it becomes `final`."""
    final = Path(final)
    with files.staged_folder(final, final.parent / f"{STAGING}{final.name}",
                             final.parent / f"{STAGING}replaced-{final.name}") as staged:
        yield staged


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
