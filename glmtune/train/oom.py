"""The one-line message for a training run that ran out of memory: where (step, and whether it was training,
evaluating or saving), the values of this run that would lower the memory it needs, and the checkpoint it can
continue from. A checkpoint cut short by the error is removed, so only complete ones are left (and named)."""

from __future__ import annotations

import traceback
from pathlib import Path

from glmtune.config import TrainConfig
from glmtune.oom import on_cpu, where
from glmtune.train.checkpoints import complete_checkpoints, remove_leftovers
from glmtune.train.distributed import is_main_process

# The Trainer has no hook that runs before an evaluation or a save begins, so the phase is read from the
# functions the error passed through (the Trainer's and glmtune's own names for those steps).
EVALUATING = frozenset({"evaluate", "evaluation_loop", "prediction_step", "measure"})
SAVING = frozenset({"_save_checkpoint", "save_adapter", "write_adapter"})


def phase(error: BaseException) -> str:
    """'training', 'evaluating' or 'saving': what the run was doing when `error` was raised."""
    names = {frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)}
    if names & SAVING:
        return "saving"
    if names & EVALUATING:
        return "evaluating"
    return "training"


def _changes(error: BaseException, cfg: TrainConfig, doing: str) -> list[str]:
    """What to lower or turn on, with this run's values, most effective first."""
    changes = []
    if doing == "evaluating":
        if cfg.eval_batch_size > 1:
            changes.append(f"lower eval_batch_size ({cfg.eval_batch_size})")
        if cfg.metric_for_best != "eval_loss" or cfg.eval_generate:
            changes.append(f"eval_max_new_tokens ({cfg.eval_max_new_tokens})")
    elif cfg.batch_size > 1:
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        changes.append(f"lower batch_size ({cfg.batch_size}; raise gradient_accumulation_steps, now "
                       f"{cfg.gradient_accumulation_steps}, to keep the effective batch of {effective})")
    lengths = [f"cutoff_len ({cfg.cutoff_len})"]
    lengths += [f"{name} ({getattr(cfg, name)})" for name in ("max_source_length", "max_target_length")
                if getattr(cfg, name)]
    changes.append(("lower " if not changes else "") + ", ".join(lengths))
    if cfg.gradient_checkpointing is None and doing != "evaluating":  # auto: the budget decided
        budget = f", now {cfg.memory_budget:g} GiB" if cfg.memory_budget else ""
        changes.append(f"turn on gradient_checkpointing or lower memory_budget{budget}")
    elif not cfg.gradient_checkpointing and doing != "evaluating":
        changes.append("turn on gradient_checkpointing")
    bits = cfg.quantization_bit or 0
    if bits != 4 and not on_cpu(error):  # bitsandbytes and ChatGLM's int4 kernels are for the GPU
        changes.append(f"set quantization_bit 4 (now {bits or 'full weights'})")
    if cfg.method == "ptuning":
        changes.append(f"lower pre_seq_len ({cfg.pre_seq_len}; this needs a new run)")
    return changes


def training_oom_message(error: BaseException, cfg: TrainConfig, state, out: Path) -> str:
    """The message for `error` (out of memory) raised at `state` (the Trainer's) of the run in `out`; removes
    the staging folder of a checkpoint the error cut short."""
    doing = phase(error)
    total = f" of {state.max_steps}" if state.max_steps else ""
    if doing == "training":
        at = f"at step {state.global_step + 1}{total} while training"
    else:
        at = f"while {doing} at step {state.global_step}{total}"
    if is_main_process() and out.is_dir():
        remove_leftovers(out)  # a checkpoint cut short was never renamed into place: only its staging goes
    checkpoints = complete_checkpoints(out) if out.is_dir() else []
    last = (f"the last complete checkpoint is {checkpoints[-1]} (continue from it with --resume and the lowered "
            "values)" if checkpoints else
            f"no checkpoint was saved before it (save_steps {cfg.save_steps}); start again with --overwrite")
    return f"out of memory on {where(error)} {at}: {', '.join(_changes(error, cfg, doing))}; {last}"
