"""What glmtune adds to the Trainer: a progress bar with speed and ETA, a JSONL log, evaluation at the end
of each epoch, the best adapter by eval loss, skipping steps that are not finite, and a clean stop on
request."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class ProgressBar(TrainerCallback):
    """step/total, loss, learning rate, real (non-padding) tokens per second and ETA."""

    def __init__(self):
        self.bar = None
        self.started = None
        self.tokens_at_start = 0

    def on_step_begin(self, args, state, control, **kwargs):
        # Created at the first step, not at train begin, so an evaluation before training
        # (eval_on_start) does not count into the speed and the ETA.
        if state.is_world_process_zero and self.bar is None:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training",
                            dynamic_ncols=True, unit="step")
            self.started = time.perf_counter()
            self.tokens_at_start = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        tokens_per_s = (state.num_input_tokens_seen - self.tokens_at_start) / elapsed
        self.bar.set_postfix({"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}",
                              "tok/s": f"{tokens_per_s:.0f}"}, refresh=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            message = f"step {state.global_step}: eval_loss {metrics['eval_loss']:.4f}"
            (self.bar.write if self.bar is not None else log.info)(message)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Also called when training fails, so the error is the last thing printed, not the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlLog(TrainerCallback):
    """Appends every log (train loss, eval loss, speed) to train_log.jsonl with its step and time. At train
    begin it writes `{"step", "max_steps", "time"}` (no loss), so a reader knows the planned total; a
    resumed run writes it again at the checkpoint's step: the last one counts."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.path.exists() and state.global_step > 0:
            # Resuming: forget entries from after the checkpoint, they will be logged again.
            kept = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue  # a line the kill cut short (or one nobody but a vandal wrote)
                if isinstance(entry, dict) and entry.get("step", 0) <= state.global_step:
                    kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        entry = {"step": state.global_step, "max_steps": state.max_steps, "time": round(time.time(), 3)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
        entry.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        entry["tokens_seen"] = state.num_input_tokens_seen
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class ResumedConfig(TrainerCallback):
    """Writes a resumed run's resolved_config.yaml once the Trainer has loaded the checkpoint (weights,
    optimizer, state) and is about to train: a resume that fails leaves the run's record as it was."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = Path(path), text

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from glmtune.files import write_text

            write_text(self.path, self.text)


class EvaluateEachEpoch(TrainerCallback):
    """Evaluation at each epoch's end in addition to every `eval_steps` (the Trainer allows only one)."""

    def __init__(self):
        self.last_evaluated_step = -1

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_evaluated_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step != self.last_evaluated_step:  # not again when eval_steps just ran
            control.should_evaluate = True
        return control


class KeepBestAdapter(TrainerCallback):
    """Saves the adapter to OUT/best whenever `metric` improves (lower eval loss; higher answer metrics),
    and stops training after `patience` evaluations without an improvement (0: never). The best value
    survives --resume through the adapter info written next to the weights."""

    def __init__(self, directory: Path, save_adapter, metric: str = "eval_loss", patience: int = 0):
        self.directory = Path(directory)
        self.save_adapter = save_adapter  # callable(model, directory, extra_info)
        self.metric = metric
        self.key = metric if metric == "eval_loss" else f"eval_{metric}"
        self.lower_is_better = metric == "eval_loss"
        self.patience = patience
        self.stale = 0  # evaluations since the last improvement
        self.best = self._previous_best()

    def _previous_best(self) -> float:
        from glmtune.methods.adapter import ADAPTER_FILE, read_adapter_info

        if (self.directory / ADAPTER_FILE).is_file():
            info = read_adapter_info(self.directory)
            if info.get("best_metric", "eval_loss") == self.metric:
                value = info.get("best_value", info.get("eval_loss"))
                if isinstance(value, (int, float)):
                    return float(value)
        return math.inf if self.lower_is_better else -math.inf

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(self.key)
        if value is None or not math.isfinite(value):
            return control
        if value < self.best if self.lower_is_better else value > self.best:
            self.best, self.stale = value, 0
            # Every process calls it (ZeRO-3 and FSDP gather the weights together); only the main one writes.
            self.save_adapter(model, self.directory, {"eval_loss": (metrics or {}).get("eval_loss"),
                                                      "step": state.global_step, "best_metric": self.metric,
                                                      "best_value": value})
            if state.is_world_process_zero:
                log.info("new best %s %.4f at step %d: adapter saved to %s", self.metric, value, state.global_step,
                         self.directory)
            return control
        self.stale += 1
        if self.patience and self.stale >= self.patience:
            log.info("no better %s in %d evaluations (best %.4f): stopping early at step %d", self.metric,
                     self.stale, self.best, state.global_step)
            control.should_training_stop = True
        return control


class NonFiniteGuard(TrainerCallback):
    """Drops the update of a step whose gradients are NaN or infinite (a NaN loss makes them so), counts it,
    and stops training at the first one (`stop`) or after `limit` in a row. Runs just before the optimizer
    step: a parameter whose gradient is None is left alone by the optimizer (no update, no momentum, no
    weight decay), so a skipped step changes no weight. Under data parallelism every process holds the same
    averaged gradients and so decides the same."""

    def __init__(self, policy: str = "skip", limit: int = 10):
        self.policy, self.limit = policy, limit
        self.skipped = 0
        self.in_a_row = 0
        self.stopped_at: int | None = None
        self.window = [0, 0]  # steps and skipped steps since the last logged training loss

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        self.window[0] += 1
        if finite:
            self.in_a_row = 0
            return control
        self.window[1] += 1
        step = state.global_step + 1
        for p in params:
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: the loss or gradients are not finite (NaN or inf); its update is skipped (%d so far)",
                    step, self.skipped)
        if self.policy == "stop" or self.in_a_row >= self.limit:
            self.stopped_at = step
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Runs before the other loggers: the Trainer fills a skipped step's loss in with an average of the
        others (0 when nothing else is in the window), so a window of skipped steps logs no loss at all."""
        if logs is None or "loss" not in logs:
            return control
        steps, skipped = self.window
        if skipped:
            logs["nonfinite_skipped"] = skipped
            if skipped == steps:
                del logs["loss"]
        self.window = [0, 0]
        return control


class StopOnRequest(TrainerCallback):
    """Ends training cleanly at the next step's end when OUT/stop_requested (run_folder.STOP_FILE) names this
    run: with a checkpoint to --resume from (unless save_strategy is no), then the final adapter, metrics
    and loss plot as at any end. glmtune studio writes the file for its Stop button.

    The file holds a process group id (decimal): the run's own group (a run the studio starts leads a
    session of its own), or its parent's (torchrun's launcher, --nproc, starts each rank in a session of
    its own under the launcher). A file naming another group was left by an earlier process: it is ignored,
    and the main process removes it at train begin. The ranks of a distributed run agree on the stop, so
    they all end at the same step."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.groups: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.groups = own_process_groups()
        if state.is_world_process_zero and self.path.exists() and not self._requested():
            with contextlib.suppress(OSError):
                self.path.unlink()  # stale: meant for a process that is gone

    def on_step_end(self, args, state, control, **kwargs):
        if not _agreed(self._requested(), args):
            return control
        saving = getattr(args.save_strategy, "value", args.save_strategy) != "no"
        control.should_save = control.should_save or saving
        control.should_log = True  # the step it stops at is in train_log.jsonl
        control.should_training_stop = True
        if state.is_world_process_zero:
            log.info("stopping at step %d as requested; %s", state.global_step, "continue with --resume" if saving
                     else "save_strategy is no: there is no checkpoint to resume from")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._requested():
            with contextlib.suppress(OSError):
                self.path.unlink()  # done with: a later --resume must not stop at once

    def _requested(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                text = f.read(32).decode("ascii", "replace").strip()
        except OSError:  # none (the usual case), or unreadable
            return False
        return text.isdigit() and int(text) in self.groups


def own_process_groups() -> set[int]:
    """The process groups a stop request for this process may name: its own and its parent's."""
    groups = {os.getpgid(0)}
    with contextlib.suppress(OSError):
        groups.add(os.getpgid(os.getppid()))
    return groups


def _agreed(flag: bool, args) -> bool:
    """True in every process when it is True in any (a no-op outside a process group): a rank that reads
    the stop file a moment before it is written must not train on alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
