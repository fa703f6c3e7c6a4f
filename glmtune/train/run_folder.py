"""A training run's output folder: what counts as an earlier run, when it may be replaced or continued,
and creating it under its lock.

Checked twice: before the model loads (a run that would overwrite or cannot resume stops before anything
is loaded or written), and again under the lock once it loaded (another run may have written there
meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from glmtune.config import TrainConfig, to_yaml
from glmtune.errors import GlmtuneError, shown
from glmtune.files import check_output_folder, path_error, write_text
from glmtune.train.checkpoints import check_checkpoint, checkpoint_shapes, complete_checkpoints, remove_leftovers
from glmtune.train.distributed import barrier, is_main_process
from glmtune.train.runlock import RunLock

log = logging.getLogger(__name__)

# Written into a running run's folder (by glmtune studio) to end it cleanly at the next step: see
# train/callbacks.py StopOnRequest for what it holds.
STOP_FILE = "stop_requested"

RUN_FILES = ("resolved_config.yaml", "train_log.jsonl", "loss.png", "metrics.json", "adapter", "best", "report.md",
             "base", "tuned", "data_mix.json")


def default_output_dir(prefix: str = "train") -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(directory: Path, *, overwrite: bool, resume: bool,
                     cfg: TrainConfig | None = None) -> tuple[Path | None, list[Path]]:
    """Refuse to overwrite an earlier run silently, before anything is loaded or written; with `resume`,
    refuse a damaged checkpoint and (given `cfg`) one trained with another method or shape.

    Returns the checkpoint to resume from (or None) and the earlier run's files that `create_output_dir`
    will remove (only with `overwrite`)."""
    if overwrite and resume:
        raise GlmtuneError("give either --overwrite (start again) or --resume (continue), not both")
    existing = check_output_folder(directory, option="output_dir")
    if resume:
        checkpoints = complete_checkpoints(directory) if existing else []
        if not checkpoints:
            raise GlmtuneError(f"--resume: {directory} has no checkpoint-N folder to continue from")
        check_checkpoint(checkpoints[-1])
        if cfg is not None:
            check_resumed_setup(directory, cfg)
        return checkpoints[-1], []
    earlier = ([p for p in (directory / name for name in RUN_FILES) if p.exists()] + complete_checkpoints(directory)
               if existing else [])
    if earlier and not overwrite:
        raise GlmtuneError(f"{directory} already holds a training run ({earlier[0].name}); pass --resume to "
                           "continue it, --overwrite to replace it, or choose another output_dir")
    return None, earlier


# What a checkpoint's weights depend on besides the base model, by method: --resume needs the same values.
# (use_rslora changes the scale, lora_init pissa/olora the base itself, without changing any shape.)
LORA_RESUME_KEYS = ("lora_rank", "lora_target", "use_dora", "use_rslora", "lora_init")
RESUME_KEYS = {"lora": LORA_RESUME_KEYS, "qlora": LORA_RESUME_KEYS,
               "ptuning": ("pre_seq_len", "prefix_projection", "prefix_hidden_size")}


def _same_setting(key: str, then: Any, now: Any) -> bool:
    if now is None or now in ("auto", "all-linear") or then is None or then in ("auto", "all-linear"):
        return True  # not worked out yet: compared again once the model is built (resolved values)
    if key == "lora_target":
        # by layer name: runs before glmtune shortened them recorded every module's full path
        return {t.strip().split(".")[-1] for t in str(then).split(",")} == \
            {t.strip().split(".")[-1] for t in str(now).split(",")}
    return then == now


def check_resumed_setup(directory: Path, cfg: TrainConfig) -> None:
    """A checkpoint continues only with the method and shape options it was trained with, as the run's
    resolved_config.yaml records them (values not worked out yet, like lora_target auto, pass here and are
    compared again with the resolved config before anything is written)."""
    from glmtune.config import read_config_file

    recorded_file = directory / "resolved_config.yaml"
    if not recorded_file.is_file():
        return  # an older or foreign run: the weights' shapes are still compared once the model is built
    try:
        recorded = read_config_file(recorded_file)
    except GlmtuneError as e:
        raise GlmtuneError(f"--resume: {e}; cannot tell what {directory} was trained with (start a new run in "
                           "another output_dir)") from None
    method = recorded.get("method")
    for key in ("method", *RESUME_KEYS.get(method if isinstance(method, str) else "", ())):
        then, now = recorded.get(key), getattr(cfg, key)
        if not _same_setting(key, then, now):
            raise GlmtuneError(f"--resume: {directory} was trained with {key} {shown(then)}, and this run asks for "
                               f"{shown(now)}; a checkpoint continues only with the setup it was trained with: set "
                               f"{key} back to {shown(then)}, or start a new run in another output_dir")


def check_resumed_weights(checkpoint: Path, model, cfg: TrainConfig) -> None:
    """The checkpoint's trained tensors must have the shapes of the ones the model was just built with
    (another rank, method, target list or prefix would fail inside the Trainer with a traceback)."""
    if cfg.deepspeed:
        return  # ZeRO keeps its own layout (and partitioned parameters have no whole shape here)
    stored = checkpoint_shapes(checkpoint)
    if stored is None:
        return
    built = sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)
    if stored != built:
        raise GlmtuneError(f"--resume: the weights in {checkpoint} ({len(stored)} tensors) do not fit the model these "
                           f"options build ({len(built)} trained tensors); resume with the options the run was "
                           f"trained with (its resolved_config.yaml), or start a new run in another output_dir")


def create_output_dir(directory: Path, earlier: list[Path]) -> None:
    """Remove an earlier run's files (only glmtune's; anything else the user keeps there stays) and create
    the folder."""
    try:
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if directory.is_dir():
            for path in remove_leftovers(directory):
                log.info("removed %s, left half-written by an interrupted run", path.name)
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(directory, e, "cannot create output_dir") from None


class RunFolder:
    """The output folder of one `glmtune train` run: checked when made (before the model loads), opened
    once the model is built."""

    def __init__(self, out: Path, cfg: TrainConfig):
        self.out = out
        self.resume_from, self.earlier = check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, cfg=cfg)

    def open(self, cfg: TrainConfig, model, held: contextlib.ExitStack) -> None:
        """With `cfg` resolved and `model` built: check a resumed run's setup and weights again, then (main
        process only) take the folder's lock into `held`, look at the folder again, clear an overwritten
        run's files and record the config."""
        out = self.out
        if self.resume_from:  # with the values worked out now (lora_target auto, ...), and the weights' shapes
            check_resumed_setup(out, cfg)
            check_resumed_weights(self.resume_from, model, cfg)
        barrier()  # every process has checked output_dir before the main process changes it
        if not is_main_process():  # the other processes (torchrun, --nproc) write nothing of glmtune's own
            return
        # Only now: a run that fails to load writes nothing. Under the lock the folder is looked at again:
        # another run may have written there while this one loaded.
        held.enter_context(RunLock(out))
        if check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume) != (self.resume_from, self.earlier):
            raise GlmtuneError(f"output_dir {out} changed while this run was loading (another glmtune train run "
                               "there?); run the command again")
        create_output_dir(out, self.earlier)
        if not self.resume_from:  # a resumed run records its config once the checkpoint has loaded (ResumedConfig)
            write_text(out / "resolved_config.yaml", to_yaml(cfg))
