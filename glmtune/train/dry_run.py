"""`glmtune train CONFIG --dry-run`: check a config the way training would, without loading any weights or
writing anything.

It reads the model folder's config.json and tokenizer, builds the model on PyTorch's `meta` device (shapes
only, no memory) with the method applied to count the trainable parameters, reads and tokenizes the data
with the same functions as training, checks output_dir, and says what a run would write there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from glmtune.config import TrainConfig, resolve, to_yaml
from glmtune.data.mixing import MixReport, encode_mixture
from glmtune.data.preprocess import IGNORE_INDEX, Encoder, TruncationReport, encode_samples
from glmtune.data.templates import get_template
from glmtune.errors import GlmtuneError, one_line
from glmtune.families import family_facts, is_native
from glmtune.methods import get_method
from glmtune.models.kbit import Quantization, check_bitsandbytes
from glmtune.models.loader import (WEIGHT_PATTERNS, LoadedModel, default_device, known_token_ids, load_tokenizer,
                                   native_classes, read_model_config, resolve_dtype, stop_token_ids)
from glmtune.train.memory import MemoryEstimate, estimate_training_memory
from glmtune.train.recompute import default_budget_gib, worst_batch
from glmtune.train.size_defaults import with_size_defaults
from glmtune.train.recipe import (check_report_to, length_limits, load_data, requested_quantization, resolved_config,
                                  training_arguments)
from glmtune.train.run_folder import check_output_dir, default_output_dir

log = logging.getLogger(__name__)


@dataclass
class DataSummary:
    name: str
    report: TruncationReport
    tokens: int  # in the encoded samples, after cutting
    answer_tokens: int  # of those, the ones the loss is computed on


@dataclass
class DryRun:
    config: TrainConfig  # resolved, as resolved_config.yaml would hold it
    family: str
    model_path: Path
    weight_files: int
    trainable: int
    total: int
    data: list[DataSummary]
    sequences: int  # training sequences per epoch (samples, or packed sequences)
    steps: int
    epochs: float
    processes: int
    writes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory: MemoryEstimate | None = None  # peak GPU memory of the worst training step
    mix: MixReport | None = None  # each file's share, when train_file mixes files

    def render(self) -> str:
        cfg = self.config
        out = cfg.output_dir
        lines = ["# resolved options (what OUT/resolved_config.yaml would hold)", to_yaml(cfg).rstrip(), "",
                 "# dry run: checked without loading weights; nothing was written"]
        weights = (f"{self.weight_files} weight file{'s' if self.weight_files > 1 else ''}" if self.weight_files
                   else "no weight files yet (training needs *.safetensors or *.bin there)")
        lines.append(f"model: {self.model_path} (family {self.family}; config.json and tokenizer read; {weights})")
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        lines.append(f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.4f}%), method {cfg.method}")
        limits = length_limits(cfg).describe()
        for item in self.data:
            r = item.report
            mixed = item.name == "train" and self.mix is not None  # repeated rows are tokenized and cut once
            count = f"{self.mix.samples} samples ({r.samples} distinct rows)" if mixed else f"{r.samples} samples"
            lines.append(f"{item.name} data: {count}, {item.tokens:,} tokens ({item.answer_tokens:,} in answers); cut: "
                         f"{r.samples_cut} {'rows' if mixed else 'samples'} (prompts {r.prompts_cut}, answers "
                         f"{r.answers_cut}, later turns dropped {r.turns_dropped}, tokens dropped {r.tokens_dropped}) "
                         f"with {limits}")
            if mixed:
                lines += self.mix.lines()
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * self.processes
        what = "packed sequences" if cfg.packing else "samples"
        lines.append(f"steps: {self.steps} optimizer steps of {per_step} {what} (batch_size {cfg.batch_size} x "
                     f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} x {self.processes} "
                     f"process{'es' if self.processes > 1 else ''}); {self.sequences} {what} per epoch, "
                     f"{self.epochs:g} epochs")
        if self.memory is not None:
            lines.append(self.memory.describe())
            lines += [f"  ({n})" for n in self.memory.notes]
        lines.append(f"would write to {out}:")
        lines += [f"  {w}" for w in self.writes]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def training_stop_ids(tokenizer, family: str, path: Path) -> set[int]:
    """The answer-ending tokens training encodes with (as load_model sets them up), without the weights."""
    generation_config = None
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(path)
    ids = stop_token_ids(tokenizer, generation_config)
    ids |= known_token_ids(tokenizer, family_facts(family).stop_tokens)
    return ids


def empty_model(path: Path, family: str, dtype):
    """The model with every tensor on the meta device: its shapes and parameter count, no memory."""
    from accelerate import init_empty_weights

    if is_native(family):
        config_class, model_class, _ = native_classes(family)
        config = config_class.from_pretrained(path)

        def build():
            return model_class(config)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise GlmtuneError(f"cannot read {path / 'config.json'}: {one_line(e)}") from None

        def build():
            return AutoModelForCausalLM.from_config(config)
    with init_empty_weights():
        model = build()
    model.tie_weights()  # skipped on the meta device, and tied embeddings are one parameter, not two
    return model.to(dtype)


def _steps(cfg: TrainConfig, sequences: int, processes: int) -> tuple[int, float]:
    """(optimizer steps, epochs) as the Trainer counts them: batches per process, rounded up, then
    accumulated, rounded up; max_steps wins over num_train_epochs."""
    batches = math.ceil(sequences / (cfg.batch_size * processes))
    per_epoch = max(math.ceil(batches / cfg.gradient_accumulation_steps), 1)
    if cfg.max_steps:
        return cfg.max_steps, cfg.max_steps / per_epoch
    return math.ceil(cfg.num_train_epochs * per_epoch), cfg.num_train_epochs


def _checkpoint_steps(steps: int, every: int) -> list[int]:
    saved = list(range(every, steps + 1, every))
    return saved if saved and saved[-1] == steps else saved + [steps]


def _writes(cfg: TrainConfig, steps: int, has_dev: bool, resume_from: Path | None, earlier: list[Path]) -> list[str]:
    out = cfg.output_dir
    saved = _checkpoint_steps(steps, cfg.save_steps)
    if cfg.save_strategy == "no":
        checkpoints = "no checkpoints (save_strategy no)"
    elif cfg.save_strategy == "epoch":
        checkpoints = (f"{out}/checkpoint-N/: a resumable checkpoint at the end of each epoch (save_strategy epoch; "
                       f"the newest {cfg.save_total_limit} kept)")
    else:
        shown = ", ".join(map(str, saved)) if len(saved) <= 6 else f"{saved[0]}, {saved[1]}, ..., {saved[-1]}"
        checkpoints = (f"{out}/checkpoint-N/: a resumable checkpoint at step {shown} ({len(saved)} in all, every "
                       f"save_steps {cfg.save_steps} and at the end; the newest {cfg.save_total_limit} kept)")
    writes = [f"{out}/resolved_config.yaml: the options above" + (" (rewritten once the checkpoint loads)"
                                                                  if resume_from else ""),
              f"{out}/train_log.jsonl: loss, learning rate and speed every logging_steps {cfg.logging_steps}",
              checkpoints,
              f"{out}/adapter/: the final {cfg.method} adapter"]
    if has_dev:
        writes.append(f"{out}/best/: the adapter with the best {cfg.metric_for_best} on dev_file")
    writes += [f"{out}/metrics.json: final metrics, trainable parameters and the cut counts",
               f"{out}/loss.png: the loss curve"]
    if cfg.eval_generate and has_dev:
        writes.append(f"{out}/report.md: answers of the base and the trained model to dev_file")
    if cfg.report_to == "tensorboard":
        writes.append(f"{out}/runs/: TensorBoard logs")
    if resume_from:
        writes.append(f"(continues from {resume_from})")
    if earlier:
        writes.append(f"(first removes the earlier run's {', '.join(p.name for p in earlier)}: overwrite is on)")
    if cfg.dataset_cache:
        writes.append("(and the tokenized data into glmtune's cache, outside output_dir)")
    return writes


def gpu_dtypes(cfg: TrainConfig):
    """(compute dtype, weights dtype) of a run of `cfg` on a GPU: auto is bf16; fp16 precision computes
    in fp16; fp32 precision computes in the weights' dtype."""
    import torch

    weights = torch.bfloat16 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if cfg.precision == "fp16":
        return torch.float16, weights if cfg.dtype != "auto" else torch.float16
    if cfg.precision == "bf16" or (cfg.precision == "auto" and weights == torch.float32):
        return torch.bfloat16, weights
    return weights, weights


def _memory(cfg: TrainConfig, model, features: list[dict], quantization: Quantization) -> MemoryEstimate | None:
    """The estimate for the worst batch of the data: the batch_size longest samples, padded to the longest
    or side by side in one row (padding-free), or batch_size rows of cutoff_len (packing), each with the
    longest answer (an upper bound). Gradient checkpointing auto is counted as off."""
    if not features:
        return None
    rows, length, labelled = worst_batch(features, cfg.batch_size, one_row=cfg.padding_free)
    if cfg.packing:
        rows, length = cfg.batch_size, cfg.cutoff_len
    compute, weights = gpu_dtypes(cfg)
    try:
        return estimate_training_memory(
            model, batch_size=rows, seq_len=length, labelled=labelled, dtype=compute,
            weights_dtype=weights, quantization=quantization, gradient_checkpointing=bool(cfg.gradient_checkpointing),
            optim=cfg.optim, masked=rows > 1 or cfg.packing or cfg.padding_free)
    except (AttributeError, TypeError, ValueError) as e:  # an architecture whose config the estimate cannot read
        log.warning("no memory estimate for this model: %s", one_line(e))
        return None


def dry_run(cfg: TrainConfig, processes: int = 1) -> DryRun:
    """Everything `glmtune train` checks before training, with the model built on the meta device."""
    cfg = resolve(cfg)
    mixture, dev_samples = load_data(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    args = training_arguments(cfg, out, bool(dev_samples))  # refuses what the Trainer would (precision, ...)
    resume_from, earlier = check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, cfg=cfg)
    check_report_to(cfg.report_to)

    tokenizer, family, path = load_tokenizer(cfg.model)
    quantization = requested_quantization(cfg).for_family(family)
    stored = read_model_config(path).get("quantization_bit") if is_native(family) else None
    if stored:  # an -int4 / -int8 checkpoint is read as it is stored
        quantization = Quantization(bits=int(stored), backend="chatglm")
    if quantization.backend == "bitsandbytes":  # a 64x64 test layer: can this machine quantize at all?
        check_bitsandbytes(default_device(), family)
    template = get_template(cfg.template, tokenizer, family)
    encoder = Encoder(tokenizer, template, training_stop_ids(tokenizer, family, path),
                      split_special_tokens=cfg.split_special_tokens, train_on=cfg.train_on)
    limits = length_limits(cfg)
    summaries = []
    # the training set as training encodes it (each distinct row of a mix once), without the cache
    train_features, train_report, mix = encode_mixture(mixture, encoder, limits, key_extra={}, enabled=False,
                                                       progress=False)
    for name, samples in (("train", train_features), ("dev", dev_samples)):
        if not samples:
            continue
        features, report = ((train_features, train_report) if name == "train" else
                            encode_samples(samples, encoder, limits, name=name, progress=False))
        tokens = sum(len(f["input_ids"]) for f in features)
        answer_tokens = sum(sum(1 for label in f["labels"] if label != IGNORE_INDEX) for f in features)
        summaries.append(DataSummary(name, report, tokens, answer_tokens))
    sequences = len(train_features)
    if cfg.packing:
        from glmtune.data.packing import pack_features

        sequences = len(pack_features(train_features, cfg.cutoff_len))

    model = empty_model(path, family, resolve_dtype(cfg.dtype, default_device()))
    loaded = LoadedModel(model, tokenizer, family, path, cfg.model, quantization)
    cfg = with_size_defaults(cfg, args, model)
    # QLoRA's adapter is LoRA's; only the (here unbuilt) base differs, so the meta model takes plain LoRA
    adapted = get_method("lora" if cfg.method == "qlora" else cfg.method).apply(model, cfg, family)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    resolved = resolved_config(cfg, args, out, loaded, template.name, adapted)
    if resolved.gradient_checkpointing is None and resolved.memory_budget is None:  # as training records it
        resolved = replace(resolved, memory_budget=round(default_budget_gib(str(args.device))[0], 2))

    steps, epochs = _steps(cfg, sequences, processes)
    memory = _memory(cfg, adapted, train_features, quantization)
    weight_files = sum(len(list(path.glob(p))) for p in WEIGHT_PATTERNS)
    notes = []
    if quantization.bits and not stored:
        notes.append(f"the base's linear layers are quantized to {quantization.describe()} while loading; the "
                     "total above counts them unquantized")
    elif stored:
        notes.append(f"the checkpoint is stored quantized to {stored} bits; the total above counts its packed weights "
                     "(two 4-bit values to an element)" if int(stored) == 4 else
                     f"the checkpoint is stored quantized to {stored} bits")
    writes = _writes(resolved, steps, bool(dev_samples), resume_from, earlier)
    if mix is not None:
        writes.insert(1, f"{out}/data_mix.json: each file's share of the training set (the table above)")
    return DryRun(resolved, family, path, weight_files, trainable, total, summaries, sequences, steps, epochs,
                  processes, writes, notes, memory, mix)
