"""Training as a staged recipe, the stages `glmtune train`, `glmtune bench` and the demo all call:

    prepare(cfg)            options resolved, samples read and checked, training arguments, (run folder
                            checked), model loaded, template and encoder, features, collator or packing,
                            method applied, the config with every value the run worked out  -> Prepared
    build_trainer(prepared, callbacks)    the transformers Trainer over them

`glmtune train` (train/trainer.py) then opens the run folder, trains and writes the adapter and metrics;
`glmtune bench` swaps only what it measures (a batch ledger around the collator, the tutorial recipe's
fixed-length collator and all-position loss), so a benchmark measures what training does.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import set_seed

from glmtune.config import TrainConfig, resolve
from glmtune.data.cache import dataset_cache_usable, encode_cached
from glmtune.data.collate import PackCollator, PadCollator
from glmtune.data.formats import load_samples
from glmtune.data.mixing import Mixture, MixReport, encode_mixture, load_mixture
from glmtune.data.packing import pack_features
from glmtune.data.preprocess import Encoder, LengthLimits, TruncationReport
from glmtune.data.templates import Template, get_template
from glmtune.errors import GlmtuneError
from glmtune.families import PACK_POSITIONS, PACK_TRANSFORMERS, family_facts
from glmtune.methods import get_method
from glmtune.models.kbit import Quantization
from glmtune.models.loader import LoadedModel, load_model
from glmtune.models.packing import packing_layout
from glmtune.models.segment_attention import NAME as SEGMENT_ATTENTION, use_segment_attention
from glmtune.train.distributed import check_deepspeed, same_on_all_ranks, world_size
from glmtune.train.loss import LabelledLossTrainer
from glmtune.train.memory import GIB
from glmtune.train.recompute import RecomputePlan, checkpointing_arguments, plan_recompute
from glmtune.train.run_folder import RunFolder, default_output_dir
from glmtune.train.size_defaults import with_size_defaults

log = logging.getLogger(__name__)


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict[str, list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


@dataclass
class Prepared:
    """Everything a run trains with, before the Trainer exists."""
    cfg: TrainConfig  # resolved: every value the run worked out (what resolved_config.yaml holds)
    out: Path  # output_dir, dated when not given
    args: Any  # transformers.TrainingArguments
    folder: RunFolder | None  # checked before the model loaded; None unless prepare was asked to
    train_samples: list
    dev_samples: list
    loaded: LoadedModel
    template: Template
    limits: LengthLimits
    train_features: list[dict[str, list[int]]]  # packed sequences when cfg.packing
    train_report: TruncationReport
    dev_features: list[dict[str, list[int]]]  # shortest first: evaluation batches with little padding
    dev_report: TruncationReport | None
    collator: Any  # for training batches
    eval_collator: Any  # for evaluation batches: padded (dev features come shortest first)
    recompute: RecomputePlan  # how many layers recompute their activations
    method: Any  # glmtune.methods' method object
    parameters: dict[str, Any]  # the method's parameters, as the adapter records them
    model: Any  # the base with the method applied
    mix: MixReport | None = None  # each file's share of the training set, when train_file mixes files


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

    cfg = resolve(cfg)  # unchanged when already resolved (prepare, dry_run)
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
        # unset, the learning rate depends on the model's size: set once it is built (train/size_defaults.py)
        **({"learning_rate": cfg.learning_rate} if cfg.learning_rate is not None else {}),
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
        # gradient_checkpointing auto is decided once the model and data are known (see prepare)
        activation_checkpointing=bool(cfg.gradient_checkpointing),
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


def columns(cfg: TrainConfig) -> dict[str, Any]:
    """How rows become samples: read with these, and part of the dataset cache's key."""
    return {"prompt_column": cfg.prompt_column, "response_column": cfg.response_column,
            "prompt_template": cfg.prompt_template}


def load_data(cfg: TrainConfig) -> tuple[Mixture, list]:
    """The training samples (one file, or several mixed: glmtune/data/mixing.py) and dev samples a run uses
    (train, bench, and `--dry-run`, which checks the same way)."""
    if not cfg.train_file:
        raise GlmtuneError("train_file is required (a JSON or JSONL file; see `glmtune data validate`)")
    if cfg.deepspeed:
        check_deepspeed(cfg.deepspeed)
    read_with = columns(cfg)
    mixture = load_mixture(cfg.train_file, read_with=read_with, seed=cfg.seed, max_samples=cfg.max_train_samples)
    dev_samples = load_samples(cfg.dev_file, **read_with)[0] if cfg.dev_file else []
    dev_samples = dev_samples[: cfg.max_eval_samples] if cfg.max_eval_samples else dev_samples
    formats = sorted({part.format for part in mixture.parts})
    log.info("data: %d training samples (%s format)%s", len(mixture.order), ", ".join(formats),
             f", {len(dev_samples)} dev samples" if dev_samples else "")

    if not dev_samples and (cfg.eval_steps or cfg.eval_on_start):
        log.warning("eval_steps / eval_on_start have no effect without dev_file")
    _check_task_rows(cfg, dev_samples)
    return mixture, dev_samples


def _check_task_rows(cfg: TrainConfig, dev_samples) -> None:
    """A task metric needs rows of that task: said before anything is loaded (that the answer options have
    a dev_file at all, config.resolve checks)."""
    from glmtune.evaluate.metrics import detect_task

    task = cfg.metric_for_best.split("_")[0]
    if task in ("extraction", "classification") and not any(detect_task(s.reference) == task for s in dev_samples):
        raise GlmtuneError(f"metric_for_best {cfg.metric_for_best} needs {task} rows in dev_file, which has none")


def requested_quantization(cfg: TrainConfig) -> Quantization:
    """The base quantization the options ask for (bits and backend as config.resolve works them out)."""
    cfg = resolve(cfg)
    return Quantization(bits=cfg.quantization_bit, backend=cfg.quantization_backend, quant_type=cfg.quantization_type,
                        double_quant=cfg.double_quantization)


def batching(cfg: TrainConfig) -> str:
    """How a resolved config batches its training samples, in words."""
    return "packed" if cfg.packing else "padding-free" if cfg.padding_free else "padded"


def pack_collator(loaded: LoadedModel, *, one_row: bool = False) -> PackCollator:
    """The collator for packed rows (`one_row`: padding-free batches), with the layout the family reads
    packed samples from; GlmtuneError where the model cannot keep packed samples apart."""
    return PackCollator(loaded.tokenizer.pad_token_id, layout=packing_layout(loaded.family, loaded.model),
                        count_tokens=True, one_row=one_row)


@contextlib.contextmanager
def adapter_marked(model):
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
    """`cfg` with every value the run worked out once the model was built (auto dtype, precision, template
    and the family's quantization backend, the default output folder, LoRA's target modules, the prefix
    MLP's width) replaced by what it used, for resolved_config.yaml; the values that depend on options
    only were worked out before, by config.resolve."""
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
        # peft spells all-linear out as every module's full path: the layer names say the same, shorter
        used["lora_target"] = targets if isinstance(targets, str) else ",".join(sorted({t.split(".")[-1]
                                                                                       for t in targets}))
    if cfg.method == "ptuning" and cfg.prefix_projection and cfg.prefix_hidden_size is None:
        encoder = next((m for m in model.modules() if isinstance(m, PrefixEncoder)), None)
        if encoder is not None:
            used["prefix_hidden_size"] = encoder.trans[0].out_features
    return replace(cfg, **used)


def prepare(cfg: TrainConfig, loaded: LoadedModel | None = None, *, load: Callable[..., LoadedModel] | None = None,
            run_folder: bool = False, progress: bool = True) -> Prepared:
    """Everything the Trainer needs, in the order that lets a run fail early: options and data are checked
    before the model loads. `loaded` reuses a model a caller already loaded (the demo); else `load(model,
    dtype=, quantization=)` loads it (default load_model; bench passes load_random_model). `run_folder`: check output_dir as
    a training run writing there (RunFolder), before the model loads."""
    cfg = resolve(cfg)
    mixture, dev_samples = load_data(cfg)
    train_samples = mixture.samples()
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    # Built before the model loads: under torchrun this joins the process group, and DeepSpeed ZeRO-3 must
    # be configured before from_pretrained to load the weights already partitioned.
    args = training_arguments(cfg, out, bool(dev_samples))
    if not cfg.output_dir:  # every process dated a folder by its own clock: the main process's wins
        out = same_on_all_ranks(out)
        args.output_dir = str(out)
    folder = RunFolder(out, cfg) if run_folder else None
    check_report_to(cfg.report_to)
    use_cache = cfg.dataset_cache and dataset_cache_usable()  # said before the model loads, not after

    set_seed(cfg.seed)  # before the method initialises its weights, so a seed fixes the whole run
    loaded = loaded or (load or load_model)(cfg.model, dtype=cfg.dtype, quantization=requested_quantization(cfg))
    template = get_template(cfg.template, loaded.tokenizer, loaded.family)
    encoder = Encoder(loaded.tokenizer, template, loaded.stop_ids, split_special_tokens=cfg.split_special_tokens,
                      train_on=cfg.train_on)
    limits = length_limits(cfg)
    key = {**columns(cfg), "template": template.name}
    if cfg.train_on != "all_assistant":  # (only then: earlier cache entries keep their keys)
        key["train_on"] = cfg.train_on
    train_features, train_report, mix = encode_mixture(mixture, encoder, limits, key_extra=key, enabled=use_cache,
                                                       progress=progress)
    log.info(train_report.summary("train" if mix is None else "train (distinct rows of the mix)", limits))
    for line in mix.lines() if mix else []:
        log.info(line)
    dev_features, dev_report = [], None
    if dev_samples:
        dev_features, dev_report, _ = encode_cached(cfg.dev_file, dev_samples, encoder, limits, name="dev",
                                                    key_extra=key, enabled=use_cache, progress=progress)
        dev_features = list(dev_features)
    dev_features.sort(key=lambda f: len(f["input_ids"]))  # evaluation batches in order: little padding
    if dev_report:
        log.info(dev_report.summary("dev", limits))

    eval_collator = collator = PadCollator(loaded.tokenizer.pad_token_id, side="right", count_tokens=True)
    if cfg.packing:
        try:
            collator = pack_collator(loaded)
        except GlmtuneError as e:
            raise GlmtuneError(f"{e}: train without packing") from None
        samples = len(train_features)
        train_features = pack_features(train_features, cfg.cutoff_len)
        log.info("packing: %d training samples in %d sequences of up to %d tokens", samples, len(train_features),
                 cfg.cutoff_len)
    elif cfg.padding_free:
        try:
            collator = pack_collator(loaded, one_row=True)
        except GlmtuneError as e:
            log.info("padded batches: %s", e)
            cfg = replace(cfg, padding_free=False)
    # causal families (not ChatGLM-6B, whose context attends both ways); a P-Tuning prefix needs the mask
    if collator is not eval_collator and cfg.method != "ptuning" and family_facts(loaded.family).packing in (
            PACK_TRANSFORMERS, PACK_POSITIONS) and use_segment_attention(loaded.model):
        log.info("attention one sample at a time in packed rows (%s)", SEGMENT_ATTENTION)

    cfg = with_size_defaults(cfg, args, loaded.model)  # before the method adds its own parameters
    method = get_method(cfg.method)
    parameters = method.parameters(cfg, loaded.family)
    model = method.apply(loaded.model, cfg, loaded.family)
    model.config.use_cache = False
    recompute = _plan_recompute(cfg, args, loaded, model, train_features,
                                one_row=getattr(collator, "one_row", False))
    cfg = resolved_config(cfg, args, out, loaded, template.name, model)
    if cfg.gradient_checkpointing is None and cfg.memory_budget is None and recompute.budget_bytes is not None:
        cfg = replace(cfg, memory_budget=round(recompute.budget_bytes / GIB, 2))  # the budget auto used
    return Prepared(cfg, out, args, folder, train_samples, dev_samples, loaded, template, limits, train_features,
                    train_report, dev_features, dev_report, collator, eval_collator, recompute, method, parameters,
                    model, mix)


def _plan_recompute(cfg: TrainConfig, args, loaded: LoadedModel, model, features, *, one_row: bool) -> RecomputePlan:
    """Decide how many layers recompute (glmtune.train.recompute) and set the training arguments to match."""
    weights = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)
    compute = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else weights
    plan = plan_recompute(model, requested=cfg.gradient_checkpointing, budget_gib=cfg.memory_budget,
                          device=str(args.device), features=features, batch_size=cfg.batch_size, one_row=one_row,
                          dtype=compute, weights_dtype=weights, quantization=loaded.quantization,
                          pre_seq_len=cfg.pre_seq_len if cfg.method == "ptuning" else 0, optim=cfg.optim,
                          # attention one sample at a time sees no mask
                          masked=False if getattr(model.config, "_attn_implementation", None) == SEGMENT_ATTENTION
                          else None)
    for name, value in checkpointing_arguments(plan).items():
        setattr(args, name, value)
    log.info(plan.describe())
    return plan


def build_trainer(prepared: Prepared, callbacks: list, *, collator=None, labelled_logits: bool = True):
    """The Trainer over `prepared`, with `callbacks`; `collator` replaces the prepared one (bench wraps it
    or pads to a fixed length), `labelled_logits=False` computes the logits at every position."""
    from transformers.trainer_callback import PrinterCallback

    cfg = prepared.cfg
    with adapter_marked(prepared.model):
        trainer = LabelledLossTrainer(
            model=prepared.model,
            args=prepared.args,
            data_collator=collator or prepared.collator,
            eval_collator=prepared.eval_collator,
            train_dataset=FeatureDataset(prepared.train_features),
            eval_dataset=FeatureDataset(prepared.dev_features) if prepared.dev_features else None,
            callbacks=callbacks,
            answer_metrics=_answer_metrics(cfg, prepared.loaded, prepared.template.name, prepared.dev_samples)
            if cfg.metric_for_best != "eval_loss" else None,
            labelled_logits=labelled_logits,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            neftune_noise_alpha=cfg.neftune_noise_alpha,
        )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressBar and JsonlLog cover them
    return trainer


def _answer_metrics(cfg: TrainConfig, loaded: LoadedModel, template: str, dev_samples):
    """A callable that answers the dev prompts with the model being trained and returns the metrics, flat:
    overall ones by name (bleu-4) and task ones as task_name (extraction_f1)."""
    from glmtune.config import GenerationOptions
    from glmtune.inference.generate import Generator
    from glmtune.evaluate.metrics import compute_metrics

    prompts = [s.prompt_messages for s in dev_samples]
    tools = [s.tools for s in dev_samples] if any(s.tools for s in dev_samples) else None
    references = [s.reference for s in dev_samples]
    sampling = GenerationOptions(max_new_tokens=cfg.eval_max_new_tokens)

    def measure(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        generator = Generator(replace(loaded, model=model), template, LengthLimits(cfg.max_source_length))
        answers: list[str] = []
        for start in range(0, len(prompts), cfg.eval_batch_size):
            batch = slice(start, start + cfg.eval_batch_size)
            answers += generator.generate(prompts[batch], sampling, tools[batch] if tools else None)
        model.train(was_training)
        scores = compute_metrics(zip(answers, references))
        flat = dict(scores["overall"])
        for task, values in scores["tasks"].items():
            flat.update({f"{task}_{k}": v for k, v in values.items()
                         if k in ("precision", "recall", "f1", "parse_rate", "accuracy", "micro_f1")})
        return flat

    return measure
