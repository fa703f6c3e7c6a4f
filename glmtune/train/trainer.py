"""`glmtune train`: validate data, tokenize, apply the method, run the transformers Trainer, save adapters.

Layout of a run (OUT = output_dir):
    OUT/resolved_config.yaml  OUT/train_log.jsonl  OUT/loss.png  OUT/metrics.json
    OUT/checkpoint-N/  (Trainer state, for --resume)
    OUT/adapter/       (final)   OUT/best/  (lowest eval loss)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from glmtune.config import DEFAULT_LEARNING_RATES, TrainConfig, to_yaml
from glmtune.data.cache import dataset_cache_usable, encode_cached
from glmtune.data.collate import PackCollator, PadCollator
from glmtune.data.formats import load_samples
from glmtune.data.packing import pack_features
from glmtune.data.preprocess import Encoder, LengthLimits, TruncationReport
from glmtune.data.templates import get_template
from glmtune.errors import GlmtuneError, shown
from glmtune.files import check_output_folder, path_error, write_text
from glmtune.methods import get_method
from glmtune.methods.adapter import write_adapter_info
from glmtune.models.kbit import Quantization
from glmtune.models.loader import LoadedModel, fingerprint, load_model
from glmtune.models.packing import packing_layout
from glmtune.oom import reported
from glmtune.train.callbacks import (EvaluateEachEpoch, JsonlLog, KeepBestAdapter, NonFiniteGuard, ProgressBar,
                                     ResumedConfig)
from glmtune.train.checkpoints import (check_checkpoint, checkpoint_shapes, complete_checkpoints, remove_leftovers,
                                       staged_folder)
from glmtune.train.distributed import (barrier, check_deepspeed, gathered, is_main_process, parameter_count,
                                      same_on_all_ranks, world_size)
from glmtune.train.loss import LabelledLossTrainer
from glmtune.train.oom import training_oom_message
from glmtune.train.plot import plot_loss
from glmtune.train.runlock import RunLock

log = logging.getLogger(__name__)

RUN_FILES = ("resolved_config.yaml", "train_log.jsonl", "loss.png", "metrics.json", "adapter", "best", "report.md",
             "base", "tuned")


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict[str, list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    best_dir: Path | None
    metrics: dict[str, Any]
    model: Any  # the trained model, still in memory (base plus method)
    template: str  # the template name the adapter was trained with


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
RESUME_KEYS = {"lora": ("lora_rank", "lora_target"), "qlora": ("lora_rank", "lora_target"),
               "ptuning": ("pre_seq_len", "prefix_projection", "prefix_hidden_size")}


def _same_setting(key: str, then: Any, now: Any) -> bool:
    if now is None or now in ("auto", "all-linear") or then is None or then in ("auto", "all-linear"):
        return True  # not worked out yet: compared again once the model is built (resolved values)
    if key == "lora_target":
        return {t.strip() for t in str(then).split(",")} == {t.strip() for t in str(now).split(",")}
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


REPORTING_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_report_to(backend: str) -> None:
    """A logging backend must be installed before training starts, not fail after the model loaded."""
    import importlib.util

    packages = REPORTING_PACKAGES.get(backend, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise GlmtuneError(f"report_to {backend} needs the {packages[0]} package: pip install {packages[0]}")


def precision_flags(precision: str, on_gpu: bool) -> dict[str, bool]:
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if precision in ("fp16", "bf16") and not on_gpu:
        raise GlmtuneError(f"precision {precision} needs a GPU; on the CPU train in fp32 (precision: fp32 or auto)")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def check_optimizer(optim: str) -> None:
    """The 8-bit optimizers come from bitsandbytes: one that cannot be imported is said before the model loads."""
    if optim not in ("adamw_8bit", "paged_adamw_8bit"):
        return
    from glmtune.models.kbit import import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError as e:
        raise GlmtuneError(f"optim {optim} needs bitsandbytes, which cannot be imported ({e}): pip install "
                           "bitsandbytes, or use adamw_torch or adafactor") from None


def training_arguments(cfg: TrainConfig, out: Path, has_dev: bool):
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    if cfg.warmup_steps and cfg.warmup_ratio:
        raise GlmtuneError(f"warmup_steps ({cfg.warmup_steps}) and warmup_ratio ({cfg.warmup_ratio}) are both set; "
                           "give one of them")
    check_optimizer(cfg.optim)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate or DEFAULT_LEARNING_RATES[cfg.method],
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler,
        # an int is a count of steps, a float below 1 a ratio of all steps
        warmup_steps=cfg.warmup_steps or min(cfg.warmup_ratio, 0.999),
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if (has_dev and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps or None,
        eval_on_start=has_dev and cfg.eval_on_start,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        use_cpu=not on_gpu,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        remove_unused_columns=False,
        label_names=["labels"],  # a peft wrapper hides the signature the Trainer would read them from
        dataloader_num_workers=cfg.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # glmtune's own progress bar replaces the Trainer's
        # Several processes (torchrun, --nproc): gloo on the CPU (the GPU default is nccl); every trainable
        # tensor of LoRA and P-Tuning takes part in each step, so DDP need not search for unused ones.
        ddp_backend="gloo" if not on_gpu and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        deepspeed=cfg.deepspeed,
        **precision_flags(cfg.precision, on_gpu),
    )


def length_limits(cfg: TrainConfig) -> LengthLimits:
    return LengthLimits(cfg.max_source_length, cfg.max_target_length, cfg.cutoff_len)


def _report_dict(report: TruncationReport) -> dict[str, Any]:
    data = asdict(report)
    data.pop("examples")
    return data


def run_training(cfg: TrainConfig, loaded: LoadedModel | None = None) -> TrainResult:
    """Train as `cfg` says. `loaded` lets a caller (the demo) reuse a model it already loaded."""
    with contextlib.ExitStack() as held:  # the run folder's lock, from taking it to the end of the run
        return _run_training(cfg, loaded, held)


def _columns(cfg: TrainConfig) -> dict[str, Any]:
    """How rows become samples: read with these, and part of the dataset cache's key."""
    return {"prompt_column": cfg.prompt_column, "response_column": cfg.response_column,
            "prompt_template": cfg.prompt_template}


def load_data(cfg: TrainConfig) -> tuple[list, list]:
    """The training and dev samples a run uses (train, and `--dry-run`, which checks the same way)."""
    if not cfg.train_file:
        raise GlmtuneError("train_file is required (a JSON or JSONL file; see `glmtune data validate`)")
    if cfg.deepspeed:
        check_deepspeed(cfg.deepspeed)
    columns = _columns(cfg)
    train_samples, fmt = load_samples(cfg.train_file, **columns)
    dev_samples = load_samples(cfg.dev_file, **columns)[0] if cfg.dev_file else []
    train_samples = train_samples[: cfg.max_train_samples] if cfg.max_train_samples else train_samples
    dev_samples = dev_samples[: cfg.max_eval_samples] if cfg.max_eval_samples else dev_samples
    log.info("data: %d training samples (%s format)%s", len(train_samples), fmt.name,
             f", {len(dev_samples)} dev samples" if dev_samples else "")

    if not dev_samples and (cfg.eval_steps or cfg.eval_on_start):
        log.warning("eval_steps / eval_on_start have no effect without dev_file")
    _check_answer_options(cfg, dev_samples)
    return train_samples, dev_samples


def _run_training(cfg: TrainConfig, loaded: LoadedModel | None, held: contextlib.ExitStack) -> TrainResult:
    columns = _columns(cfg)
    train_samples, dev_samples = load_data(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    # Built before the model loads: under torchrun this joins the process group, and DeepSpeed ZeRO-3 must
    # be configured before from_pretrained to load the weights already partitioned.
    args = training_arguments(cfg, out, bool(dev_samples))
    if not cfg.output_dir:  # every process dated a folder by its own clock: the main process's wins
        out = same_on_all_ranks(out)
        args.output_dir = str(out)
    resume_from, earlier = check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, cfg=cfg)
    check_report_to(cfg.report_to)
    use_cache = cfg.dataset_cache and dataset_cache_usable()  # said before the model loads, not after

    quantization = requested_quantization(cfg)
    set_seed(cfg.seed)  # before the method initialises its weights, so a seed fixes the whole run
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, quantization=quantization)
    template = get_template(cfg.template, loaded.tokenizer, loaded.family)
    encoder = Encoder(loaded.tokenizer, template, loaded.stop_ids, split_special_tokens=cfg.split_special_tokens)
    limits = length_limits(cfg)
    key = {**columns, "template": template.name}
    train_features, train_report, _ = encode_cached(cfg.train_file, train_samples, encoder, limits, name="train",
                                                    key_extra=key, enabled=use_cache)
    log.info(train_report.summary("train", limits))
    dev_features, dev_report = [], None
    if dev_samples:
        dev_features, dev_report, _ = encode_cached(cfg.dev_file, dev_samples, encoder, limits, name="dev",
                                                    key_extra=key, enabled=use_cache)
        dev_features = list(dev_features)
    dev_features.sort(key=lambda f: len(f["input_ids"]))  # evaluation batches in order: little padding
    if dev_report:
        log.info(dev_report.summary("dev", limits))

    collator = PadCollator(loaded.tokenizer.pad_token_id, side="right", count_tokens=True)
    if cfg.packing:
        collator = pack_collator(loaded)
        samples = len(train_features)
        train_features = pack_features(train_features, cfg.cutoff_len)
        log.info("packing: %d training samples in %d sequences of up to %d tokens", samples, len(train_features),
                 cfg.cutoff_len)

    method = get_method(cfg.method)
    parameters = method.parameters(cfg, loaded.family)
    model = method.apply(loaded.model, cfg, loaded.family)
    model.config.use_cache = False
    cfg = resolved_config(cfg, args, out, loaded, template.name, model)
    if resume_from:  # with the values worked out now (lora_target auto, ...), and the weights' shapes
        check_resumed_setup(out, cfg)
        check_resumed_weights(resume_from, model, cfg)
    barrier()  # every process has checked output_dir before the main process changes it
    if is_main_process():  # the other processes (torchrun, --nproc) write nothing of glmtune's own
        # Only now: a run that fails to load writes nothing. Under the lock the folder is looked at again:
        # another run may have written there while this one loaded.
        held.enter_context(RunLock(out))
        if check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume) != (resume_from, earlier):
            raise GlmtuneError(f"output_dir {out} changed while this run was loading (another glmtune train run "
                               "there?); run the command again")
        create_output_dir(out, earlier)
        if not resume_from:  # a resumed run records its config once the checkpoint has loaded (ResumedConfig)
            write_text(out / "resolved_config.yaml", to_yaml(cfg))
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    log.info("%s: %s trainable parameters of %s (%.2f%%)", cfg.method, f"{trainable:,}", f"{total:,}",
             100 * trainable / total)

    def save_adapter(trained_model, directory: Path, extra: dict[str, Any]) -> None:
        """Called in every process: ZeRO-3 and FSDP gather the weights together; the main process writes."""
        with gathered(trained_model):
            if is_main_process():
                write_adapter(trained_model, directory, extra)

    def write_adapter(trained_model, directory: Path, extra: dict[str, Any]) -> None:
        with staged_folder(directory) as staged:  # a kill mid-save leaves the previous adapter whole
            method.save(trained_model, staged)
            write_adapter_info(staged, method=cfg.method, family=loaded.family, base_model=loaded.name,
                               fingerprint=fingerprint(loaded.model.config), template=template.name,
                               parameters=parameters,
                               extra={"quantization_bit": loaded.quantization_bit,
                                      "quantization": loaded.quantization.record(),
                                      "prompt_template": cfg.prompt_template, **extra})

    from transformers.trainer_callback import PrinterCallback

    guard = NonFiniteGuard(cfg.nonfinite, cfg.max_nonfinite_steps)
    progress = ProgressBar()
    callbacks = [guard, progress, JsonlLog(out / "train_log.jsonl")]  # guard first: it edits the logs
    if resume_from:
        callbacks.append(ResumedConfig(out / "resolved_config.yaml", to_yaml(cfg)))
    if dev_features:
        callbacks.append(KeepBestAdapter(out / "best", save_adapter, cfg.metric_for_best, cfg.early_stopping_patience))
        if cfg.eval_each_epoch:
            callbacks.append(EvaluateEachEpoch())
    with _adapter_marked(model):
        trainer = LabelledLossTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=FeatureDataset(train_features),
            eval_dataset=FeatureDataset(dev_features) if dev_features else None,
            callbacks=callbacks,
            answer_metrics=_answer_metrics(cfg, loaded, template.name, dev_samples)
            if cfg.metric_for_best != "eval_loss" else None,
        )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressBar and JsonlLog cover them
    if resume_from:
        log.info("resuming from %s", resume_from)

    def out_of_memory(error: BaseException) -> str:  # in a step, an evaluation or a save: this run's values
        return training_oom_message(error, cfg, trainer.state, out)

    try:
        with reported(out_of_memory):
            train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        progress.close()
    if guard.stopped_at is not None:
        _stop_for_nonfinite(guard, cfg, out)
    if guard.skipped:
        log.warning("%d steps were skipped because their loss or gradients were not finite", guard.skipped)

    eval_metrics: dict[str, Any] = {}
    adapter_dir = out / "adapter"
    with reported(out_of_memory):
        if dev_features:
            evaluated = [e for e in trainer.state.log_history if "eval_loss" in e]
            if evaluated and evaluated[-1].get("step") == trainer.state.global_step:
                eval_metrics = {k: v for k, v in evaluated[-1].items() if k.startswith("eval_")}
            else:
                eval_metrics = trainer.evaluate()
        save_adapter(model, adapter_dir, {"step": trainer.state.global_step,
                                          "eval_loss": eval_metrics.get("eval_loss")})
    best_dir = out / "best" if (out / "best").is_dir() else None

    best_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    initial = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
    metrics = {
        "train": {k: v for k, v in train_output.metrics.items() if isinstance(v, (int, float))},
        "eval": eval_metrics,
        "best_eval_loss": min(best_losses) if best_losses else None,
        "initial_eval_loss": initial[0] if initial else None,
        "global_step": trainer.state.global_step,
        "world_size": args.world_size,  # processes that trained together (torchrun, --nproc)
        "trainable_parameters": trainable,
        "nonfinite_steps_skipped": guard.skipped,
        "truncation": {"train": _report_dict(train_report), **({"dev": _report_dict(dev_report)} if dev_report else {})},
    }
    if is_main_process():
        if cfg.eval_generate and dev_samples:
            metrics["report"] = str(_compare_after_training(cfg, loaded, template.name, out, best_dir or adapter_dir))
        write_text(out / "metrics.json", json.dumps(_finite(metrics), indent=2) + "\n")
        plot_loss(out / "train_log.jsonl", out / "loss.png")
    log.info("adapter saved to %s%s", adapter_dir, f"; best (eval_loss {metrics['best_eval_loss']:.4f}) in {best_dir}"
             if best_dir else "")
    model.config.use_cache = True
    return TrainResult(out, adapter_dir, best_dir, metrics, model, template.name)


def _stop_for_nonfinite(guard: NonFiniteGuard, cfg: TrainConfig, out: Path) -> None:
    """Training ended on non-finite steps: say where, and what is left to resume from."""
    checkpoints = complete_checkpoints(out)
    why = ("nonfinite is stop" if cfg.nonfinite == "stop" else
           f"{guard.in_a_row} steps in a row were not finite (max_nonfinite_steps {cfg.max_nonfinite_steps})")
    last = (f"the last good checkpoint is {checkpoints[-1]} (continue with --resume, e.g. with a lower learning_rate)"
            if checkpoints else "no checkpoint was saved before it")
    raise GlmtuneError(f"training stopped at step {guard.stopped_at}: its loss or gradients were NaN or infinite and "
                       f"{why}; {guard.skipped} steps skipped in all; {last}")


def pack_collator(loaded: LoadedModel) -> PackCollator:
    """The collator for packed rows, with the layout the family reads packed samples from."""
    return PackCollator(loaded.tokenizer.pad_token_id, layout=packing_layout(loaded.family, loaded.model),
                        count_tokens=True)


@contextlib.contextmanager
def _adapter_marked(model):
    """The Trainer refuses a bitsandbytes model unless transformers' adapter flag says trainable adapters are
    attached; a P-Tuning prefix is one (peft LoRA models pass by their type). The flag is set only while
    the Trainer is built."""
    from glmtune.models.kbit import is_bitsandbytes_model

    marked = is_bitsandbytes_model(model) and not getattr(model, "_hf_peft_config_loaded", False)
    if marked:
        model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if marked:
            model._hf_peft_config_loaded = False


def resolved_config(cfg: TrainConfig, args, out: Path, loaded: LoadedModel, template: str, model) -> TrainConfig:
    """`cfg` with every value the run worked out for itself (a method's default learning rate, auto dtype,
    precision, template and quantization backend, the default output folder, LoRA's target modules, the
    prefix MLP's width) replaced by what it used, for resolved_config.yaml."""
    from glmtune.models.prefix import PrefixEncoder

    used: dict[str, Any] = {
        "learning_rate": args.learning_rate, "output_dir": str(out), "template": template,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "quantization_bit": loaded.quantization.bits,
    }
    if loaded.quantization.bits:
        used["quantization_backend"] = loaded.quantization.backend
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None and cfg.lora_target in ("auto", "all-linear"):
        targets = peft_config.target_modules
        used["lora_target"] = targets if isinstance(targets, str) else ",".join(sorted(targets))
    if cfg.method == "ptuning" and cfg.prefix_projection and cfg.prefix_hidden_size is None:
        encoder = next((m for m in model.modules() if isinstance(m, PrefixEncoder)), None)
        if encoder is not None:
            used["prefix_hidden_size"] = encoder.trans[0].out_features
    return replace(cfg, **used)


def requested_quantization(cfg: TrainConfig) -> Quantization:
    """The base quantization the options ask for. QLoRA is LoRA over a bitsandbytes base, 4-bit unless
    quantization_bit says 8; the other methods quantize only when quantization_bit is set."""
    bits, backend = cfg.quantization_bit or 0, cfg.quantization_backend
    if cfg.method == "qlora":
        if cfg.quantization_bit == 0:
            raise GlmtuneError("method qlora trains LoRA over a 4-bit or 8-bit base; quantization_bit 0 is method lora")
        if backend == "chatglm":
            raise GlmtuneError("method qlora quantizes the base with bitsandbytes; for LoRA over ChatGLM's own "
                               "int8/int4 layout use method: lora with quantization_bit")
        bits, backend = cfg.quantization_bit or 4, "bitsandbytes"
    return Quantization(bits=bits, backend=backend, quant_type=cfg.quantization_type,
                        double_quant=cfg.double_quantization)


def _check_answer_options(cfg: TrainConfig, dev_samples) -> None:
    """metric_for_best, early stopping and eval_generate need dev answers, and a task metric needs rows of
    that task: say so before anything is loaded."""
    from glmtune.evaluate.metrics import detect_task

    needs_dev = [name for name, used in (("metric_for_best", cfg.metric_for_best != "eval_loss"),
                                         ("early_stopping_patience", cfg.early_stopping_patience > 0),
                                         ("eval_generate", cfg.eval_generate)) if used]
    if needs_dev and not dev_samples:
        raise GlmtuneError(f"{', '.join(needs_dev)} need(s) dev_file")
    task = cfg.metric_for_best.split("_")[0]
    if task in ("extraction", "classification") and not any(detect_task(s.reference) == task for s in dev_samples):
        raise GlmtuneError(f"metric_for_best {cfg.metric_for_best} needs {task} rows in dev_file, which has none")


def _answer_metrics(cfg: TrainConfig, loaded: LoadedModel, template: str, dev_samples):
    """A callable that answers the dev prompts with the model being trained and returns the metrics, flat:
    overall ones by name (bleu-4) and task ones as task_name (extraction_f1)."""
    from glmtune.evaluate.generate import Generator, Sampling
    from glmtune.evaluate.metrics import compute_metrics

    prompts = [s.prompt_messages for s in dev_samples]
    references = [s.reference for s in dev_samples]
    sampling = Sampling(max_new_tokens=cfg.eval_max_new_tokens)

    def measure(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        generator = Generator(replace(loaded, model=model), template, LengthLimits(cfg.max_source_length))
        answers: list[str] = []
        for start in range(0, len(prompts), cfg.eval_batch_size):
            answers += generator.generate(prompts[start:start + cfg.eval_batch_size], sampling)
        model.train(was_training)
        scores = compute_metrics(zip(answers, references))
        flat = dict(scores["overall"])
        for task, values in scores["tasks"].items():
            flat.update({f"{task}_{k}": v for k, v in values.items()
                         if k in ("precision", "recall", "f1", "parse_rate", "accuracy", "micro_f1")})
        return flat

    return measure


def _compare_after_training(cfg: TrainConfig, loaded: LoadedModel, template: str, out: Path, adapter: Path) -> Path:
    from glmtune.evaluate.generate import Sampling
    from glmtune.evaluate.runs import EvalSettings, run_compare

    settings = EvalSettings(data=cfg.dev_file, output_dir=str(out), model=loaded.name, adapter=str(adapter),
                            template=template, batch_size=cfg.eval_batch_size,
                            sampling=Sampling(max_new_tokens=cfg.eval_max_new_tokens), max_samples=cfg.max_eval_samples,
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
