"""`glmtune train`: the recipe's stages (train/recipe.py) with the run folder, progress, checkpoints, the
adapter and the metrics around them.

Layout of a run (OUT = output_dir):
    OUT/resolved_config.yaml  OUT/train_log.jsonl  OUT/loss.png  OUT/metrics.json
    OUT/data_mix.json  (when train_file mixes several files: each file's share, glmtune/data/mixing.py)
    OUT/checkpoint-N/  (Trainer state, for --resume)
    OUT/adapter/       (final)   OUT/best/  (lowest eval loss)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from glmtune.config import TrainConfig, to_yaml
from glmtune.data.preprocess import TruncationReport
from glmtune.errors import GlmtuneError
from glmtune.files import write_text
from glmtune.methods.adapter import write_adapter_info
from glmtune.models.loader import LoadedModel, fingerprint
from glmtune.oom import reported
from glmtune.train.callbacks import (EvaluateEachEpoch, JsonlLog, KeepBestAdapter, NonFiniteGuard, ProgressBar,
                                     ResumedConfig, StopOnRequest)
from glmtune.train.checkpoints import complete_checkpoints, staged_folder
from glmtune.train.distributed import gathered, is_main_process, parameter_count
from glmtune.train.oom import training_oom_message
from glmtune.train.peak_memory import PeakMemory
from glmtune.train.plot import plot_loss
from glmtune.train.recipe import Prepared, batching, build_trainer, prepare
from glmtune.train.run_folder import STOP_FILE

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    best_dir: Path | None
    metrics: dict[str, Any]
    model: Any  # the trained model, still in memory (base plus method)
    template: str  # the template name the adapter was trained with


def _report_dict(report: TruncationReport) -> dict[str, Any]:
    data = asdict(report)
    data.pop("examples")
    return data


def run_training(cfg: TrainConfig, loaded: LoadedModel | None = None) -> TrainResult:
    """Train as `cfg` says: prepare -> run folder -> trainer -> train -> finish. `loaded` lets a caller (the
    demo) reuse a model it already loaded."""
    with contextlib.ExitStack() as held:  # the run folder's lock, from taking it to the end of the run
        prepared = prepare(cfg, loaded, run_folder=True)
        prepared.folder.open(prepared.cfg, prepared.model, held)
        _record_mix(prepared)
        trainable = _log_parameters(prepared)
        guard, progress = NonFiniteGuard(cfg.nonfinite, cfg.max_nonfinite_steps), ProgressBar()
        trainer = build_trainer(prepared, _callbacks(prepared, guard, progress))
        memory = PeakMemory(str(trainer.args.device))
        memory.start()
        train_output = _train(prepared, trainer, guard, progress)
        usage = _batches_and_memory(prepared, trainer, memory)
        return _finish(prepared, trainer, train_output, guard, trainable, usage)


def _record_mix(prepared: Prepared) -> None:
    """OUT/data_mix.json: what each file of a mix gave, written as training starts (a resumed run's data may
    have changed: one that no longer mixes files drops the old record)."""
    if not is_main_process():
        return
    path = prepared.out / "data_mix.json"
    if prepared.mix is None:
        path.unlink(missing_ok=True)
    else:
        write_text(path, json.dumps(_finite(prepared.mix.to_dict()), indent=2, ensure_ascii=False) + "\n")


def _batches_and_memory(prepared: Prepared, trainer, memory: PeakMemory) -> dict[str, Any]:
    """What the training batches wasted on padding and the peak memory of training, logged and returned
    for metrics.json (this process's figures)."""
    share, peak = trainer.padding_share(), memory.peak_bytes()
    usage = {"batching": batching(prepared.cfg), "padding_share": share, **trainer.batch_tokens,
             "peak_memory_bytes": peak, "peak_memory_kind": memory.describe(),
             "gradient_checkpointing": prepared.recompute.to_dict()}
    log.info("training: %s batches, %s padding; peak memory %.2f GiB (%s)", usage["batching"],
             "no" if share is None else f"{share:.1%}", peak / 2**30, usage["peak_memory_kind"])
    return usage


def _log_parameters(prepared: Prepared) -> int:
    model = prepared.model
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    log.info("%s: %s trainable parameters of %s (%.2f%%)", prepared.cfg.method, f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    return trainable


def save_adapter(prepared: Prepared, trained_model, directory: Path, extra: dict[str, Any]) -> None:
    """Called in every process: ZeRO-3 and FSDP gather the weights together; the main process writes."""
    with gathered(trained_model):
        if is_main_process():
            _write_adapter(prepared, trained_model, directory, extra)


def _write_adapter(prepared: Prepared, trained_model, directory: Path, extra: dict[str, Any]) -> None:
    cfg, loaded = prepared.cfg, prepared.loaded
    with staged_folder(directory) as staged:  # a kill mid-save leaves the previous adapter whole
        prepared.method.save(trained_model, staged)
        write_adapter_info(staged, method=cfg.method, family=loaded.family, base_model=loaded.name,
                           fingerprint=fingerprint(loaded.model.config), template=prepared.template.name,
                           parameters=prepared.parameters,
                           extra={"quantization_bit": loaded.quantization_bit,
                                  "quantization": loaded.quantization.record(),
                                  "prompt_template": cfg.prompt_template, **extra})


def _callbacks(prepared: Prepared, guard: NonFiniteGuard, progress: ProgressBar) -> list:
    cfg, out = prepared.cfg, prepared.out
    # guard first: it edits the logs
    callbacks = [guard, progress, JsonlLog(out / "train_log.jsonl"), StopOnRequest(out / STOP_FILE)]
    if prepared.folder.resume_from:
        callbacks.append(ResumedConfig(out / "resolved_config.yaml", to_yaml(cfg)))
    if prepared.dev_features:
        def save_best(trained_model, directory: Path, extra: dict[str, Any]) -> None:
            save_adapter(prepared, trained_model, directory, extra)

        callbacks.append(KeepBestAdapter(out / "best", save_best, cfg.metric_for_best, cfg.early_stopping_patience))
        if cfg.eval_each_epoch:
            callbacks.append(EvaluateEachEpoch())
    return callbacks


def _out_of_memory(prepared: Prepared, trainer):
    def message(error: BaseException) -> str:  # in a step, an evaluation or a save: this run's values
        return training_oom_message(error, prepared.cfg, trainer.state, prepared.out)

    return message


def _train(prepared: Prepared, trainer, guard: NonFiniteGuard, progress: ProgressBar):
    resume_from = prepared.folder.resume_from
    if resume_from:
        log.info("resuming from %s", resume_from)
    try:
        with reported(_out_of_memory(prepared, trainer)):
            train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        progress.close()
    if guard.stopped_at is not None:
        _stop_for_nonfinite(guard, prepared.cfg, prepared.out)
    if guard.skipped:
        log.warning("%d steps were skipped because their loss or gradients were not finite", guard.skipped)
    return train_output


def _finish(prepared: Prepared, trainer, train_output, guard: NonFiniteGuard, trainable: int,
            usage: dict[str, Any]) -> TrainResult:
    """The final evaluation and adapter, metrics.json, the loss plot and (eval_generate) report.md."""
    cfg, out, model = prepared.cfg, prepared.out, prepared.model
    eval_metrics: dict[str, Any] = {}
    adapter_dir = out / "adapter"
    with reported(_out_of_memory(prepared, trainer)):
        if prepared.dev_features:
            evaluated = [e for e in trainer.state.log_history if "eval_loss" in e]
            if evaluated and evaluated[-1].get("step") == trainer.state.global_step:
                eval_metrics = {k: v for k, v in evaluated[-1].items() if k.startswith("eval_")}
            else:
                eval_metrics = trainer.evaluate()
        save_adapter(prepared, model, adapter_dir, {"step": trainer.state.global_step,
                                                    "eval_loss": eval_metrics.get("eval_loss")})
    best_dir = out / "best" if (out / "best").is_dir() else None

    best_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    initial = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
    train_report, dev_report = prepared.train_report, prepared.dev_report
    metrics = {
        "train": {k: v for k, v in train_output.metrics.items() if isinstance(v, (int, float))},
        "eval": eval_metrics,
        "best_eval_loss": min(best_losses) if best_losses else None,
        "initial_eval_loss": initial[0] if initial else None,
        "global_step": trainer.state.global_step,
        "world_size": prepared.args.world_size,  # processes that trained together (torchrun, --nproc)
        "trainable_parameters": trainable,
        "nonfinite_steps_skipped": guard.skipped,
        "batches_and_memory": usage,
        "truncation": {"train": _report_dict(train_report), **({"dev": _report_dict(dev_report)} if dev_report else {})},
    }
    if is_main_process():
        if cfg.eval_generate and prepared.dev_samples:
            metrics["report"] = str(_compare_after_training(cfg, prepared.loaded, prepared.template.name, out,
                                                            best_dir or adapter_dir))
        write_text(out / "metrics.json", json.dumps(_finite(metrics), indent=2) + "\n")
        plot_loss(out / "train_log.jsonl", out / "loss.png")
    log.info("adapter saved to %s%s", adapter_dir, f"; best (eval_loss {metrics['best_eval_loss']:.4f}) in {best_dir}"
             if best_dir else "")
    model.config.use_cache = True
    return TrainResult(out, adapter_dir, best_dir, metrics, model, prepared.template.name)


def _stop_for_nonfinite(guard: NonFiniteGuard, cfg: TrainConfig, out: Path) -> None:
    """Training ended on non-finite steps: say where, and what is left to resume from."""
    checkpoints = complete_checkpoints(out)
    why = ("nonfinite is stop" if cfg.nonfinite == "stop" else
           f"{guard.in_a_row} steps in a row were not finite (max_nonfinite_steps {cfg.max_nonfinite_steps})")
    last = (f"the last good checkpoint is {checkpoints[-1]} (continue with --resume, e.g. with a lower learning_rate)"
            if checkpoints else "no checkpoint was saved before it")
    raise GlmtuneError(f"training stopped at step {guard.stopped_at}: its loss or gradients were NaN or infinite and "
                       f"{why}; {guard.skipped} steps skipped in all; {last}")


def _compare_after_training(cfg: TrainConfig, loaded: LoadedModel, template: str, out: Path, adapter: Path) -> Path:
    from glmtune.config import GenerationOptions
    from glmtune.evaluate.runs import EvalSettings, run_compare

    settings = EvalSettings(data=cfg.dev_file, output_dir=str(out), model=loaded.name, adapter=str(adapter),
                            template=template, batch_size=cfg.eval_batch_size,
                            generation=GenerationOptions(max_new_tokens=cfg.eval_max_new_tokens),
                            max_samples=cfg.max_eval_samples,
                            max_source_length=cfg.max_source_length, dtype=cfg.dtype,
                            quantization=loaded.quantization, prompt_column=cfg.prompt_column,
                            response_column=cfg.response_column, prompt_template=cfg.prompt_template or "")
    report, _, _ = run_compare(settings, overwrite=True, inside_run=True)
    log.info("before/after report written to %s", report)
    return report


def _finite(value):
    """JSON has no NaN or infinity: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
