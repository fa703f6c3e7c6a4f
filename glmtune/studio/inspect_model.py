"""What the studio page shows about a model before anything trains: its family, size, context and prompt
format, and which method and quantization would fit in this machine's memory.

No weights are read: the model is built on PyTorch's meta device from config.json (as `train --dry-run`
does), so a full-size ChatGLM3-6B takes seconds on a CPU. Memory comes from the trainer's own estimator
(glmtune.train.memory) through the trainer's own gradient checkpointing rule (glmtune.train.recompute):
gradient_checkpointing auto recomputes as few layers as keep the step under the budget, so an estimate is
the step's peak with the layers auto would recompute, and `fits` says whether that is within the budget.

Everything returned is a fact (numbers, names, codes), not a sentence: the page words it in the user's
language. `reason` alone is a message from glmtune or a library, shown as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from glmtune.errors import one_line

log = logging.getLogger(__name__)

# The typical step the estimates assume: the trainer's defaults (TrainConfig), batch and cutoff_len included.
TYPICAL_BATCH_SIZE = 4

# MethodFit.problem codes
OVER_BUDGET = "over_budget"  # estimated, and above memory_available_gib even with auto's gradient checkpointing
UNAVAILABLE = "unavailable"  # this machine cannot run it (bitsandbytes missing or unusable here)
ESTIMATE_FAILED = "estimate_failed"  # the method or the estimate failed on this architecture (see reason)

# ModelFacts.memory_source codes
GPU_FREE = "gpu_free"  # the GPU's free memory minus the trainer's 10% margin (glmtune.train.recompute)
CPU_DEFAULT = "cpu_default"  # the trainer's CPU budget: 6 GiB or half the machine's memory


@dataclass
class MethodFit:
    method: str  # "lora", "qlora" or "ptuning"
    quantization_bit: int  # 0, 4 or 8: how the frozen base is quantized
    backend: str | None  # "chatglm" (ChatGLM's own int8/int4), "bitsandbytes", or None for full weights
    estimated_gib: float | None  # peak memory of the typical step (ModelFacts.assumed); None: not estimated
    fits: bool | None  # within memory_available_gib and runnable here; None: not estimated
    reason: str | None = None  # one line, when the combination cannot run here or could not be estimated
    problem: str | None = None  # OVER_BUDGET, UNAVAILABLE, ESTIMATE_FAILED, or None when it fits
    trainable: int | None = None  # trained parameters (LoRA's matrices, or the prefix encoder)
    recomputed_layers: int | None = None  # layers gradient checkpointing auto would recompute (0: off)
    layers: int | None = None  # decoder layers in all


@dataclass
class ModelFacts:
    name: str  # as given (a folder or the default model's alias)
    path: Path  # the checkpoint folder
    family: str  # glmtune's family name (glmtune.families)
    parameters: int  # the base model's parameters (a quantized layer counts its unpacked weights)
    context_length: int | None  # from config.json; None when it names none
    template: str  # the prompt format template `auto` picks
    stored_quantization: str | None  # "int4"/"int8" (ChatGLM's own -int4/-int8 checkpoints),
    # "bitsandbytes-4bit"/"bitsandbytes-8bit" (saved quantized by bitsandbytes), or None
    device: str  # "cuda" or "cpu": where training would run
    memory_available_gib: float  # the budget the trainer's gradient checkpointing auto uses on `device`
    memory_source: str  # GPU_FREE or CPU_DEFAULT
    fits: list[MethodFit] = field(default_factory=list)
    assumed: dict[str, Any] = field(default_factory=dict)  # the typical step every estimate is for


def stored_quantization(config: dict[str, Any], family: str) -> tuple[str | None, int]:
    """(name, bits) of the quantization a checkpoint is stored in, as the loader reads it."""
    from glmtune.families import is_native

    bits = config.get("quantization_bit") if is_native(family) else None
    if isinstance(bits, int) and bits in (4, 8):
        return f"int{bits}", bits
    stored = config.get("quantization_config")
    if isinstance(stored, dict) and stored.get("quant_method") == "bitsandbytes":
        bits = 4 if stored.get("load_in_4bit") else 8 if stored.get("load_in_8bit") else 0
        if bits:
            return f"bitsandbytes-{bits}bit", bits
    return None, 0


def _combinations(family: str, stored: str | None, stored_bits: int) -> list[tuple[str, int, str | None]]:
    """(method, bits, backend) worth offering. A stored-quantized checkpoint loads only as it is stored
    (the loader refuses re-quantizing it), so it gets just the methods over that."""
    from glmtune.families import is_native

    if stored and stored.startswith("int"):
        return [("lora", stored_bits, "chatglm"), ("ptuning", stored_bits, "chatglm")]
    if stored:
        return [("qlora", stored_bits, "bitsandbytes")]
    own = [(8, "chatglm"), (4, "chatglm")] if is_native(family) else []  # as the official tutorials quantize
    return ([("lora", 0, None)] + [("lora", b, k) for b, k in own] + [("qlora", 8, "bitsandbytes"),
            ("qlora", 4, "bitsandbytes"), ("ptuning", 0, None)] + [("ptuning", b, k) for b, k in own])


def _options(name: str, method: str, bits: int, backend: str | None):
    """The trainer's default options for this combination (the method's rank, prefix, optimizer...)."""
    from glmtune.config import TrainConfig, resolve

    return resolve(TrainConfig(model=name, method=method, quantization_bit=bits,
                               quantization_backend=backend or "auto"))


@dataclass(frozen=True)
class _Step:
    """The typical training step every estimate is for."""
    device: str
    dtype: Any  # torch dtype: compute and weights, as training here uses them
    budget_gib: float
    seq_len: int
    batch_size: int = TYPICAL_BATCH_SIZE


def describe_model(name: str) -> ModelFacts:
    """The facts about `name` (a checkpoint folder or the default model's alias), without loading weights.
    GlmtuneError (one line, the loader's) when it is no model glmtune can read."""
    import torch

    from glmtune.data.templates import get_template
    from glmtune.models.loader import context_length, default_device, load_tokenizer, read_model_config
    from glmtune.train.dry_run import empty_model
    from glmtune.train.recompute import default_budget_gib

    tokenizer, family, path = load_tokenizer(name)
    config = read_model_config(path)
    stored, stored_bits = stored_quantization(config, family)
    device = default_device()
    # what training uses here (dtype and precision auto): bf16 (else fp16) on a GPU, fp32 on the CPU
    dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported()
                                                   else torch.float16)
    budget, _ = default_budget_gib(device)
    context = context_length(config)
    defaults = _options(name, "lora", 0, None)
    step = _Step(device, dtype, budget, min(defaults.cutoff_len, context) if context else defaults.cutoff_len)
    assumed = {"batch_size": step.batch_size, "seq_len": step.seq_len, "padding_free": defaults.padding_free,
               "labelled_tokens": step.batch_size * step.seq_len,  # every token an answer token: an upper bound
               "dtype": str(dtype).removeprefix("torch."), "optim": defaults.optim,
               "gradient_checkpointing": "auto",
               "lora_rank": defaults.lora_rank, "lora_target": defaults.lora_target,
               "pre_seq_len": defaults.pre_seq_len, "prefix_projection": defaults.prefix_projection}
    return ModelFacts(name=name, path=path, family=family,
                      parameters=full_precision_parameters(empty_model(path, family, dtype)),
                      context_length=context, template=get_template("auto", tokenizer, family).name,
                      stored_quantization=stored, device=device, memory_available_gib=budget,
                      memory_source=GPU_FREE if device.startswith("cuda") else CPU_DEFAULT,
                      fits=_fits(name, path, family, _combinations(family, stored, stored_bits), bool(stored), step),
                      assumed=assumed)


def full_precision_parameters(model) -> int:
    """The model's parameters as its full-precision checkpoint holds them: a quantized layer counts its
    in x out weights and its bias, not its packed storage or its scales; tied weights count once."""
    total, seen = 0, set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        weight = getattr(module, "weight", None)
        if weight is not None and not weight.is_floating_point() and hasattr(module, "in_features"):
            bias = getattr(module, "bias", None)
            total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
        else:
            total += sum(p.numel() for p in own)
    return total


def _fits(name: str, path: Path, family: str, combinations: list[tuple[str, int, str | None]], stored: bool,
          step: _Step) -> list[MethodFit]:
    """Every combination's fit, in order. Combinations that train the same thing over the same built base
    share one meta model: LoRA over full weights and QLoRA (whose bitsandbytes base the estimator counts from
    the requested quantization), and each of LoRA / P-Tuning over ChatGLM's own int8 and int4."""
    groups: dict[tuple[str, int], list[int]] = {}
    for index, (method, bits, backend) in enumerate(combinations):
        built = ("ptuning" if method == "ptuning" else "lora", bits if backend == "chatglm" else 0)
        groups.setdefault(built, []).append(index)
    fits: list[MethodFit | None] = [None] * len(combinations)
    for (method, chatglm_bits), indices in groups.items():
        try:
            adapted = _build(name, path, family, method, chatglm_bits, stored, step)
        except Exception as e:  # a method this architecture refuses, a config the model code cannot build
            log.debug("cannot build %s over %s bits", method, chatglm_bits, exc_info=True)
            for i in indices:
                fits[i] = MethodFit(*combinations[i], None, None, reason=one_line(e) or type(e).__name__,
                                    problem=ESTIMATE_FAILED)
            continue
        for i in indices:
            fits[i] = _fit(adapted, name, family, *combinations[i], stored=stored, step=step)
        del adapted
    return fits


def _build(name: str, path: Path, family: str, method: str, chatglm_bits: int, stored: bool, step: _Step):
    """The meta model with the method applied, over ChatGLM's own int layout when `chatglm_bits`."""
    from glmtune.methods import get_method
    from glmtune.train.dry_run import empty_model

    model = empty_model(path, family, step.dtype)
    if chatglm_bits and not stored:
        # as the loader does it: the base quantized first, then the method over its int layers (the estimator
        # counts the int layers it finds; a requested int layout under LoRA's wrappers it would not see)
        from glmtune.models.loader import native_classes
        from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES, quantize_modules

        quantize_modules(native_classes(family)[2](model), chatglm_bits, CHATGLM_QUANTIZED_NAMES, empty=True)
        model.config.quantization_bit = chatglm_bits
    options = _options(name, method, chatglm_bits, "chatglm" if chatglm_bits else None)
    return get_method(method).apply(model, options, family)


def _fit(adapted, name: str, family: str, method: str, bits: int, backend: str | None, *, stored: bool,
         step: _Step) -> MethodFit:
    """One combination's estimate; whatever fails in it becomes its reason, never the whole answer's."""
    fit = MethodFit(method, bits, backend, None, None,
                    trainable=sum(p.numel() for p in adapted.parameters() if p.requires_grad))
    try:
        return _estimate(fit, adapted, name, family, stored=stored, step=step)
    except Exception as e:  # an architecture the estimate cannot read, ...
        log.debug("no estimate for %s over %s bits (%s)", method, bits, backend, exc_info=True)
        return replace(fit, reason=one_line(e) or type(e).__name__, problem=ESTIMATE_FAILED)


def _estimate(fit: MethodFit, adapted, name: str, family: str, *, stored: bool, step: _Step) -> MethodFit:
    from glmtune.models.kbit import Quantization, bitsandbytes_problem
    from glmtune.train.memory import GIB
    from glmtune.train.recipe import requested_quantization

    options = _options(name, fit.method, fit.quantization_bit, fit.backend)
    quantization = (Quantization(bits=fit.quantization_bit, backend="chatglm") if stored and fit.backend == "chatglm"
                    else requested_quantization(options).for_family(family))
    estimate, recomputed, layers, why = _auto_checkpointing(adapted, options, quantization, step)
    fit = replace(fit, layers=layers)
    if estimate is None:
        return replace(fit, reason=one_line(why), problem=ESTIMATE_FAILED)
    fit = replace(fit, estimated_gib=estimate / GIB, recomputed_layers=recomputed)
    if quantization.backend == "bitsandbytes":
        problem = bitsandbytes_problem(step.device.split(":")[0])
        if problem:
            return replace(fit, fits=False, reason=one_line(problem), problem=UNAVAILABLE)
    within = estimate <= step.budget_gib * GIB
    return replace(fit, fits=within, problem=None if within else OVER_BUDGET)


def _auto_checkpointing(adapted, options, quantization, step: _Step) -> tuple[int | None, int, int, str]:
    """(peak bytes, recomputed layers, layers, why) of the typical step under gradient_checkpointing auto,
    as glmtune.train.recompute.plan_recompute decides it for `step.batch_size` rows of `step.seq_len` tokens."""
    from glmtune.train.memory import GIB, estimate_training_memory
    from glmtune.train.recompute import decoder_layers, plan_recompute

    B, S = step.batch_size, step.seq_len
    common = dict(dtype=step.dtype, weights_dtype=step.dtype, quantization=quantization, optim=options.optim,
                  pre_seq_len=options.pre_seq_len if options.method == "ptuning" else 0)
    layers = decoder_layers(adapted)
    if layers:
        # auto can do no better than recomputing every layer: when even that is over the budget, that is its
        # choice (plan_recompute would estimate every setting on the way, one by one). The batch as
        # plan_recompute makes it of these rows: one row of B*S (padding-free) or B rows of S, masked.
        one_row = options.padding_free
        most = estimate_training_memory(adapted, batch_size=1 if one_row else B, seq_len=B * S if one_row else S,
                                        labelled=B * S, masked=True, gradient_checkpointing=layers, **common).total
        if most > step.budget_gib * GIB:
            return most, layers, layers, ""
    rows = [{"input_ids": [0] * S, "labels": [0] * S}] * B  # every token labelled, as `assumed` says
    plan = plan_recompute(adapted, requested=None, budget_gib=step.budget_gib, device=step.device, features=rows,
                          batch_size=B, one_row=options.padding_free, **common)
    return plan.estimate_bytes, plan.recomputed, plan.layers, plan.why


def method_fit(facts: ModelFacts, method: str, quantization_bit: int = 0, backend: str | None = None
               ) -> MethodFit | None:
    """The combination in `facts.fits`, or None where it is not offered for this model."""
    return next((f for f in facts.fits if (f.method, f.quantization_bit, f.backend) ==
                 (method, quantization_bit, backend)), None)

