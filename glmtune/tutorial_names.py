"""Option names users bring from the ChatGLM tutorials and transformers' TrainingArguments, read as glmtune's.

One table (NAMES). Each name is either read as a glmtune option (its value converted where the meaning needs
it: `fp16: true` is `precision: fp16`), or accepted with a note saying what glmtune does instead
(`remove_unused_columns`), or refused with a pointer to what to use (`finetuning_type: full`). The sources:
the official ChatGLM `ptuning/main.py` arguments, ChatGLM-Efficient-Tuning / LLaMA-Factory, the ChatGLM3
finetune_demo YAML configs (their nested sections are read as flat options), Firefly-style `train_args`
JSON files and `transformers.TrainingArguments`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from glmtune.errors import GlmtuneError, shown

log = logging.getLogger(__name__)

SKIP = object()  # a converted value that sets nothing (`use_lora: false` leaves `method` as it is)
# The ChatGLM3 finetune_demo configs nest options in these sections; glmtune's options are one flat namespace.
SECTIONS = ("data_config", "training_args", "peft_config", "generation_config")


@dataclass(frozen=True)
class TutorialName:
    name: str
    option: str | None = None  # the glmtune option it is read as; None: accepted with `note`, or refused
    convert: Callable[[Any], Any] | None = None  # value -> glmtune's value (SKIP: set nothing); ValueError: bad
    note: str = ""  # what glmtune does instead (accepted names), or what to use (refused names)
    refused: bool = False
    flag: bool = False  # on the command line it may stand alone, as the tutorials' scripts write it (--fp16)
    many: bool = False  # on the command line it may take several values (--target_modules q_proj v_proj)
    in_files_only: bool = False  # on the command line it is a flag of glmtune's own


def _truth(value: Any) -> bool:
    """config.truth's words, and also the 0/1 integers the tutorials' JSON files write."""
    from glmtune.config import truth  # (config imports this module only inside its functions)

    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    result = truth(value)
    if result is None:
        raise ValueError("must be true or false")
    return result


def _when_true(result: Any) -> Callable[[Any], Any]:
    return lambda value: result if _truth(value) else SKIP


def _comma_text(value: Any) -> Any:
    """peft's target_modules is a list; glmtune's lora_target is comma-separated text."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError("must be module names")
        return ",".join(value)
    return value


def _one_backend(value: Any) -> Any:
    """TrainingArguments' report_to is a list (or "all"); glmtune logs to at most one backend."""
    if isinstance(value, (list, tuple)):
        kept = [v for v in value if v != "none"]
        if len(kept) > 1:
            raise ValueError("lists several backends; glmtune logs to one (none, tensorboard, wandb or mlflow)")
        return kept[0] if kept else "none"
    if value == "all":
        raise ValueError("is all; name one backend (none, tensorboard, wandb or mlflow)")
    return value


def _choice(mapping: dict[str, Any], refusal: str = "") -> Callable[[Any], Any]:
    """Case-insensitive lookup; a value mapped to None is refused with `refusal`."""
    def convert(value: Any) -> Any:
        key = str(value).lower()
        if key not in mapping:
            raise ValueError(f"must be one of {', '.join(k for k in mapping if mapping[k] is not None)}")
        if mapping[key] is None:
            raise ValueError(f"not supported; {refusal}")
        return mapping[key]
    return convert


def _quantization(bits: int) -> Callable[[Any], Any]:
    return lambda value: bits if _truth(value) else SKIP


def _renamed(name: str, option: str, **kw) -> TutorialName:
    return TutorialName(name, option, **kw)


def _noted(name: str, note: str, **kw) -> TutorialName:
    return TutorialName(name, None, note=note, **kw)


def _refused(name: str, note: str, **kw) -> TutorialName:
    return TutorialName(name, None, note=note, refused=True, **kw)


_FULL = "glmtune trains LoRA, QLoRA or P-Tuning v2 adapters (method: lora, qlora or ptuning), not the whole model"

_TABLE = [
    # batch sizes, lengths, files, model
    _renamed("per_device_train_batch_size", "batch_size"),
    _renamed("per_device_eval_batch_size", "eval_batch_size"),
    _renamed("max_input_length", "max_source_length"),
    _renamed("max_source_seq_len", "max_source_length"),
    _renamed("max_src_len", "max_source_length"),
    _renamed("max_output_length", "max_target_length"),
    _renamed("max_target_seq_len", "max_target_length"),
    _renamed("max_tgt_len", "max_target_length"),
    _renamed("max_seq_length", "cutoff_len"),
    _renamed("max_seq_len", "cutoff_len"),
    _renamed("max_len", "cutoff_len"),
    _renamed("model_name_or_path", "model"),
    _renamed("train_path", "train_file"),
    _renamed("data_path", "train_file"),
    _renamed("validation_file", "dev_file"),
    _renamed("val_file", "dev_file"),
    _renamed("dev_path", "dev_file"),
    _renamed("max_samples", "max_train_samples"),
    _renamed("max_new_tokens", "eval_max_new_tokens"),
    _renamed("template_name", "template"),
    # LLaMA-Factory's switch for training only the last turn of a conversation
    _renamed("mask_history", "train_on", convert=lambda v: "last_assistant" if _truth(v) else "all_assistant",
             flag=True),
    # method
    _renamed("use_lora", "method", convert=_when_true("lora"), flag=True),
    _renamed("use_ptuning", "method", convert=_when_true("ptuning"), flag=True),
    # LLaMA-Factory's PiSSA switch and peft's own name for the initialisation
    _renamed("pissa_init", "lora_init", convert=_when_true("pissa"), flag=True),
    _renamed("init_lora_weights", "lora_init",
             convert=_choice({"true": "default", "gaussian": "gaussian", "pissa": "pissa", "pissa_niter_16": "pissa",
                              "olora": "olora", "false": None, "loftq": None, "eva": None, "corda": None},
                             "glmtune starts LoRA with lora_init default, gaussian, pissa or olora")),
    _renamed("finetuning_type", "method",
             convert=_choice({"lora": "lora", "qlora": "qlora", "p_tuning": "ptuning", "ptuning": "ptuning",
                              "freeze": None, "full": None}, _FULL)),
    _renamed("train_mode", "method", convert=_choice({"lora": "lora", "qlora": "qlora", "full": None}, _FULL)),
    _renamed("peft_type", "method", convert=_choice({"lora": "lora", "prefix_tuning": "ptuning",
                                                     "p_tuning_v2": "ptuning"})),
    _renamed("lora_r", "lora_rank"),
    _renamed("r", "lora_rank"),
    _renamed("target_modules", "lora_target", convert=_comma_text, many=True),
    _renamed("lora_target_modules", "lora_target", convert=_comma_text, many=True),
    _renamed("lora_target", "lora_target", convert=_comma_text, many=True),  # LLaMA-Factory also takes a list
    _renamed("num_virtual_tokens", "pre_seq_len"),
    # precision and quantization
    _renamed("fp16", "precision", convert=_when_true("fp16"), flag=True),
    _renamed("bf16", "precision", convert=_when_true("bf16"), flag=True),
    _renamed("load_in_8bit", "quantization_bit", convert=_quantization(8), flag=True),
    _renamed("load_in_4bit", "quantization_bit", convert=_quantization(4), flag=True),
    # schedule, saving, logging
    _renamed("epochs", "num_train_epochs"),
    _renamed("lr", "learning_rate"),
    _renamed("num_epochs", "num_train_epochs"),
    _renamed("lr_scheduler_type", "lr_scheduler"),
    _renamed("save_freq", "save_steps"),
    _renamed("overwrite_output_dir", "overwrite", convert=_truth, flag=True),
    _renamed("report_to", "report_to", convert=_one_backend, many=True),
    _renamed("optim", "optim", convert=_choice(
        {"adamw_torch_fused": "adamw_torch_fused", "adamw_torch": "adamw_torch", "adamw_hf": "adamw_torch", "adafactor": "adafactor",
         "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"})),
    _renamed("evaluation_strategy", "eval_each_epoch",
             convert=_choice({"no": False, "epoch": True, "steps": SKIP})),
    _renamed("eval_strategy", "eval_each_epoch", convert=_choice({"no": False, "epoch": True, "steps": SKIP})),
    # accepted: glmtune decides these itself
    _noted("do_train", "glmtune train always trains", flag=True),
    _noted("do_eval", "glmtune evaluates whenever dev_file is given", flag=True),
    _noted("do_predict", "glmtune train does not predict; run glmtune predict or glmtune eval after training",
           flag=True),
    _noted("test_file", "glmtune train does not predict; run glmtune eval --data FILE after training"),
    _noted("predict_with_generate", "glmtune evaluates eval loss, and generates answers for metric_for_best and "
                                    "eval_generate", flag=True),
    _noted("remove_unused_columns", "glmtune builds the model inputs itself"),
    _noted("ddp_find_unused_parameters", "glmtune sets it (every trainable tensor takes part in each step)"),
    _noted("local_rank", "torchrun sets it; glmtune reads the process rank from the environment"),
    _noted("logging_dir", "glmtune logs to OUT/train_log.jsonl (and OUT/runs/ with report_to tensorboard)"),
    _noted("logging_strategy", "glmtune logs every logging_steps steps"),
    _noted("logging_first_step", "glmtune logs every logging_steps steps", flag=True),
    _noted("log_level", "glmtune logs at info; -v shows debug logs"),
    _noted("disable_tqdm", "glmtune shows its own progress line", flag=True),
    _noted("plot_loss", "glmtune always writes OUT/loss.png", flag=True),
    _noted("overwrite_cache", "glmtune's dataset cache is keyed by the data's content (dataset_cache: false "
                              "turns it off)", flag=True),
    _noted("preprocessing_num_workers", "glmtune tokenizes once and caches the result"),
    _noted("num_proc", "glmtune tokenizes once and caches the result"),
    _noted("pad_to_max_length", "glmtune pads each batch only to its longest sample", flag=True),
    _noted("ignore_pad_token_for_loss", "padding never counts in glmtune's loss", flag=True),
    _noted("val_max_target_length", "glmtune cuts dev answers at max_target_length too"),
    _noted("use_fast_tokenizer", "glmtune loads the checkpoint's own tokenizer", flag=True),
    _noted("cache_dir", "glmtune never downloads; model is a local folder"),
    _noted("task_type", "glmtune trains causal language models"),
    _noted("stage", "glmtune train is supervised fine-tuning (LLaMA-Factory's stage sft)"),
    _noted("device", "glmtune trains on the GPU when one is visible, else on the CPU; choose GPUs with "
                     "CUDA_VISIBLE_DEVICES"),
    _noted("half_precision_backend", "glmtune uses PyTorch autocast (see precision)"),
    _noted("save_safetensors", "glmtune writes safetensors", flag=True),
    # refused, with what to use instead
    _refused("dataset", "glmtune reads data files: give train_file (and dev_file)"),
    _refused("dataset_dir", "glmtune reads data files: give train_file (and dev_file)"),
    _refused("val_size", "split the data first with glmtune data split FILE, then give train_file and dev_file"),
    _refused("dev_ratio", "split the data first with glmtune data split FILE, then give train_file and dev_file"),
    _refused("ptuning_checkpoint", "load a trained P-Tuning checkpoint with --adapter DIR in predict, chat, serve "
                                   "or eval; to continue training use resume: true"),
    _refused("checkpoint_dir", "load a trained adapter with --adapter DIR in predict, chat, serve or eval; to "
                               "continue training use resume: true"),
    _refused("resume_from_checkpoint", "give the run's output_dir and resume: true"),
    _refused("train_args_file", "give it on the command line: glmtune train --train_args_file FILE.json",
             in_files_only=True),
]
NAMES: dict[str, TutorialName] = {entry.name: entry for entry in _TABLE}
# Names the tutorials share with glmtune, same meaning (listed in the docs; a test keeps them glmtune options).
SAME_NAMES = ("output_dir", "train_file", "prompt_column", "response_column", "max_source_length",
              "max_target_length", "cutoff_len", "max_train_samples", "max_eval_samples", "template",
              "quantization_bit", "pre_seq_len", "prefix_projection", "lora_rank", "lora_alpha", "lora_dropout",
              "num_train_epochs", "max_steps", "gradient_accumulation_steps", "learning_rate", "weight_decay",
              "max_grad_norm", "warmup_ratio", "warmup_steps", "logging_steps", "eval_steps", "save_strategy",
              "save_steps", "save_total_limit", "seed", "gradient_checkpointing", "dataloader_num_workers",
              "group_by_length", "deepspeed", "report_to", "optim", "use_rslora", "use_dora", "loraplus_lr_ratio",
              "neftune_noise_alpha")


def _flatten(raw: dict) -> Iterator[tuple[str, Any]]:
    for key, value in raw.items():
        if str(key) in SECTIONS and isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield str(key), value


def translate(raw: dict, source: str, options: set[str]) -> Iterator[tuple[str, str | None, Any]]:
    """(key as given, glmtune option or None for an unknown key, value) for each option of one source; tutorial
    names are read as glmtune's, with one log line each; refused names and bad values raise GlmtuneError."""
    for key, value in _flatten(raw):
        name = key.lstrip("-").replace("-", "_")
        entry = NAMES.get(name)
        if entry is None or (entry.option is not None and entry.option not in options):
            yield key, (name if name in options else None), value
            continue
        if entry.refused:
            raise GlmtuneError(f"{source}: {name} is not a glmtune option; {entry.note}")
        if entry.flag and value is not None:  # `--do_train run.yaml` must not swallow the config file unseen
            try:
                _truth(value)
            except ValueError as e:
                raise GlmtuneError(f"{source}: {name} {shown(value)}: {e}") from None
        if entry.option is None:
            log.info("ignoring %s: %s", name, entry.note)
            continue
        converted = value
        if entry.convert is not None and value is not None:
            try:
                converted = entry.convert(value)
            except ValueError as e:
                raise GlmtuneError(f"{source}: {name} {shown(value)}: {e}") from None
        if converted is SKIP:
            log.info("ignoring %s: %s (it sets nothing in glmtune)", name, shown(value))
            continue
        if name != entry.option:
            changed = str(converted).lower() != str(value).lower()  # --overwrite_output_dir alone is "true"
            log.info("reading %s as %s", f"{name}: {shown(value)}" if changed else name,
                     f"{entry.option}: {shown(converted)}" if changed else entry.option)
        elif str(converted).lower() != str(value).lower():
            log.info("reading %s: %s as %s", name, shown(value), shown(converted))
        yield key, entry.option, converted


# ---------------------------------------------------------------------------------------------------------
# "did you mean": only a hint that is right


def _distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn a into b."""
    previous2, previous = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if previous2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def _pointer(candidate: str, options: list[str]) -> str:
    """What a valid name stands for: a glmtune option as itself, a tutorial name as what glmtune does with it."""
    if candidate in options:
        return repr(candidate)
    entry = NAMES[candidate]
    if entry.option:
        return f"{candidate!r} (read as {entry.option})"
    return f"{candidate!r} ({entry.note})"


def hint(key: str, options: list[str]) -> str:
    """The '; did you mean ...' end of an unknown-option message: a name within a typo or two of the key, or
    the one name the key begins; else what the key is (a TrainingArguments option glmtune does not take) or
    the list of valid keys. Never a name that merely shares a few letters (device is not dev_file)."""
    candidates = sorted(set(options) | set(NAMES))
    limit = 0 if len(key) < 4 else 1 if len(key) < 8 else 2  # "lr" is one edit from "r", and means neither
    scored = sorted((_distance(key, c), c) for c in candidates if abs(len(c) - len(key)) <= limit)
    close = [c for d, c in scored if d <= limit and d == scored[0][0]]
    if len(close) == 1:
        return f"; did you mean {_pointer(close[0], options)}?"
    if len(key) >= 6:
        starts = [c for c in candidates if c.startswith(key) or (key.startswith(c) and len(c) >= 6)]
        if len(starts) == 1:
            return f"; did you mean {_pointer(starts[0], options)}?"
    if _is_training_argument(key):
        return ("; it is a transformers TrainingArguments option that glmtune does not take (docs/training.md, "
                "'Option names from the tutorials', lists the ones it reads)")
    return f"; valid keys: {', '.join(sorted(options))}"


def _is_training_argument(key: str) -> bool:
    import dataclasses

    from transformers import TrainingArguments  # only on this error path: it takes a second to import

    return key in {f.name for f in dataclasses.fields(TrainingArguments)}


# ---------------------------------------------------------------------------------------------------------
# The docs section (docs/training.md, "Option names from the tutorials"), made from the table


def docs_table() -> str:
    """Markdown: every tutorial name and what glmtune does with it."""
    lines = ["Same name, same meaning: " + ", ".join(f"`{name}`" for name in SAME_NAMES) + ".", "",
             "| name | glmtune reads it as |", "| --- | --- |"]
    for entry in sorted(_TABLE, key=lambda e: (e.refused, e.option is None, e.name)):
        if entry.refused:
            what = f"refused: {entry.note}"
        elif entry.option is None:
            what = f"accepted and ignored: {entry.note}"
        elif entry.convert is None:
            what = f"`{entry.option}`"
        else:
            what = f"`{entry.option}` ({_CONVERSIONS.get(entry.name, 'value converted')})"
        lines.append(f"| `{entry.name}` | {what} |")
    return "\n".join(lines) + "\n"


_CONVERSIONS = {
    "use_lora": "true: lora", "use_ptuning": "true: ptuning", "fp16": "true: fp16", "bf16": "true: bf16",
    "load_in_8bit": "true: 8", "load_in_4bit": "true: 4", "overwrite_output_dir": "true or false",
    "finetuning_type": "lora, qlora, p_tuning; full and freeze are refused",
    "train_mode": "lora, qlora; full is refused", "peft_type": "LORA: lora, PREFIX_TUNING: ptuning",
    "target_modules": "a list becomes comma-separated names", "lora_target_modules": "a list becomes "
    "comma-separated names", "lora_target": "a list becomes comma-separated names",
    "report_to": "a list of one backend becomes that backend", "optim": "adamw_hf: adamw_torch, adamw_bnb_8bit: "
    "adamw_8bit", "evaluation_strategy": "epoch: true, no: false, steps: eval_steps decides",
    "eval_strategy": "epoch: true, no: false, steps: eval_steps decides",
    "mask_history": "true: last_assistant, false: all_assistant",
}
