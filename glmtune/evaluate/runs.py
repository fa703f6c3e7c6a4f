"""`glmtune eval` and `glmtune compare`: answer a data file, score it, and compare base with tuned.

An eval folder holds `predictions.jsonl` (streamed, resumable), `metrics.json` and `eval_config.json`
(what produced them). Running the same command again continues an interrupted run; other settings for
the same folder are refused unless `overwrite`, so a file never mixes answers of two setups.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from glmtune.config import GenerationOptions
from glmtune.errors import GlmtuneError
from glmtune.files import (NestingError, check_output_file, check_output_folder, loads, path_error, read_text,
                           write_text)
from glmtune.models.kbit import Quantization

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
SETTINGS = "eval_config.json"
TASKS = ("auto", "generation", "extraction", "classification")
# Files `glmtune train` writes first into its output folder: a folder holding one is a training run, whose
# metrics.json and report.md an evaluation must not replace.
TRAINING_RUN_FILES = ("resolved_config.yaml", "train_log.jsonl")


def refuse_training_run(folder: Path, option: str = "--output") -> None:
    """An evaluation writes metrics.json (and compare report.md): never into a training run's own folder."""
    found = next((name for name in TRAINING_RUN_FILES if (folder / name).exists()), None)
    if found:
        raise GlmtuneError(f"{option} {folder} holds a training run ({found}); its metrics.json and report.md are "
                           f"the run's own: write the evaluation elsewhere, e.g. {folder / 'eval'}")


@dataclass
class EvalSettings:
    data: str
    output_dir: str
    model: str | None = None  # None: the adapter's base model, else the default model
    adapter: str | None = None
    template: str | None = None  # None: the adapter's, else auto
    task: str = "auto"
    batch_size: int = 8
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    max_samples: int | None = None
    max_source_length: int | None = None
    dtype: str = "auto"
    quantization: Any = None  # a Quantization, bits (0: full weights) or None (the adapter's)
    pre_seq_len: int | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    prompt_template: str | None = None  # None: the adapter's, "": none

    def __post_init__(self):
        if self.generation.temperature > 0 and self.generation.seed is None:
            # sampled answers are reproducible (and resumable) only with a seed
            self.generation = replace(self.generation, seed=42)

    def identity(self) -> dict[str, Any]:
        """What must match for an earlier run's predictions to be continued."""
        data = asdict(self)
        data.pop("output_dir")
        data.pop("batch_size")  # answers do not depend on it beyond numerics; resuming keeps whole batches
        data.pop("task")  # scoring only
        generation = data.pop("generation")  # kept in the layout of folders written before GenerationOptions
        data["seed"] = generation.pop("seed")
        data["sampling"] = generation
        if not data["prompt_template"]:  # none: as folders written before the option existed say
            data.pop("prompt_template")
        data["data"] = str(Path(self.data).resolve())
        return data


def _load_samples(settings: EvalSettings):
    from glmtune.data.formats import load_samples
    from glmtune.methods.adapter import prompt_template_for

    template = prompt_template_for(settings.prompt_template, settings.adapter, settings.model)
    samples, _ = load_samples(settings.data, prompt_column=settings.prompt_column,
                              response_column=settings.response_column, require_answer=True,
                              prompt_template=template)
    return samples[: settings.max_samples] if settings.max_samples else samples


def _check_folder(settings: EvalSettings, overwrite: bool) -> bool:
    """Check the eval folder without writing anything; True when an earlier run there is continued."""
    out = Path(settings.output_dir)
    recorded = out / SETTINGS
    if not check_output_folder(out):
        return False
    refuse_training_run(out)
    for name in (PREDICTIONS, METRICS, SETTINGS):  # never the data file itself, also with --overwrite
        check_output_file(out / name, overwrite=True, inputs=[settings.data])
    if overwrite:
        return False
    if recorded.is_file():
        try:
            earlier = loads(recorded.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):  # ValueError: bad JSON, or nested absurdly deep
            earlier = None
        if not isinstance(earlier, dict):
            raise GlmtuneError(f"{recorded} is damaged; use another output folder or --overwrite")
        now = json.loads(json.dumps(settings.identity()))
        differ = sorted(k for k in set(earlier) | set(now) if earlier.get(k) != now.get(k))
        if differ:
            details = ", ".join(f"{k}: {earlier.get(k)!r} then, {now.get(k)!r} now" for k in differ)
            raise GlmtuneError(f"{out} holds an evaluation with other settings ({details}); use another output "
                               "folder or --overwrite")
        return True
    if (out / PREDICTIONS).exists():
        raise GlmtuneError(f"{out / PREDICTIONS} exists but was not written by glmtune eval; use another output "
                           "folder or --overwrite")
    return False


def _start_folder(settings: EvalSettings, overwrite: bool, resumed: bool) -> None:
    """Create the eval folder (once the model has loaded and the prompts fit: a failed run writes nothing)."""
    out = Path(settings.output_dir)
    if resumed:
        return
    try:
        if overwrite:
            for name in (PREDICTIONS, METRICS, SETTINGS):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(out, e, "cannot write") from None
    write_text(out / SETTINGS, json.dumps(settings.identity(), indent=2, ensure_ascii=False) + "\n")


def run_eval(settings: EvalSettings, *, overwrite: bool = False) -> dict[str, Any]:
    """Answer every row (continuing an interrupted run), score, write metrics.json; returns the metrics."""
    from glmtune.data.preprocess import LengthLimits
    from glmtune.evaluate.predictions import write_predictions
    from glmtune.inference.generate import Generator
    from glmtune.evaluate.metrics import compute_metrics
    from glmtune.methods.adapter import load_tuned_model

    if settings.task not in TASKS:
        raise GlmtuneError(f"task must be one of {', '.join(TASKS)}; got {settings.task!r}")
    samples = _load_samples(settings)  # validate the data before loading any model
    resumed = _check_folder(settings, overwrite)
    out = Path(settings.output_dir)
    model, info = load_tuned_model(settings.model, settings.adapter, dtype=settings.dtype,
                                   quantization=settings.quantization, pre_seq_len=settings.pre_seq_len)
    template = settings.template or (info or {}).get("template") or "auto"
    generator = Generator(model, template, LengthLimits(max_source_length=settings.max_source_length))
    generator.check_prompts(samples)
    _start_folder(settings, overwrite, resumed)  # only now: a run that fails to load or to fit writes nothing
    answers = write_predictions(generator, samples, out / PREDICTIONS, batch_size=settings.batch_size,
                                generation=settings.generation, resume=resumed, seed=settings.generation.seed,
                                check_lengths=False, keep_partial=True)
    metrics = compute_metrics(zip(answers, [s.reference for s in samples]), task=settings.task)
    write_text(out / METRICS, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    log.info("%s: %d answers scored, metrics in %s", settings.output_dir, len(answers), out / METRICS)
    return metrics


def score_file(path: str | Path, task: str = "auto") -> dict[str, Any]:
    """Metrics of an existing predictions file whose lines hold `target` and `prediction`."""
    from glmtune.evaluate.metrics import compute_metrics

    if task not in TASKS:
        raise GlmtuneError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    path = Path(path)
    text = read_text(path, "predictions file")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = loads(line)
        except json.JSONDecodeError as e:
            raise GlmtuneError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        except NestingError as e:
            raise GlmtuneError(f"{path}:{number}: not a predictions row: {e}") from None
        if not isinstance(row, dict):
            raise GlmtuneError(f"{path}:{number}: a line must be a JSON object")
        for key in ("target", "prediction"):
            if not isinstance(row.get(key), str):
                raise GlmtuneError(f"{path}:{number}: {key!r} must be a string "
                                   f"({'missing' if key not in row else type(row[key]).__name__})")
        pairs.append((row["prediction"], row["target"]))
    if not pairs:
        raise GlmtuneError(f"{path} holds no predictions")
    return compute_metrics(pairs, task=task)


def run_compare(settings: EvalSettings, *, overwrite: bool = False, examples: int = 3,
                inside_run: bool = False) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Base and tuned model on the same file (OUT/base, OUT/tuned) and OUT/report.md side by side;
    returns the report's path and the base and tuned metrics. `inside_run`: OUT is the training run that
    asked for the comparison (eval_generate), the one training run folder it may write into."""
    from glmtune.data.formats import Message
    from glmtune.evaluate.report import write_report
    from glmtune.methods.adapter import prompt_template_for, read_adapter_info

    if not settings.adapter:
        raise GlmtuneError("compare needs --adapter (the tuned model); the base is the adapter's base model")
    info = read_adapter_info(settings.adapter) if (Path(settings.adapter) / "glmtune_adapter.json").is_file() \
        else {}
    from glmtune.methods.adapter import is_plain_peft, plain_peft_info

    if is_plain_peft(settings.adapter):  # a peft LoRA folder: its base must be known before the base is evaluated
        info = plain_peft_info(settings.adapter, settings.model)
    out = Path(settings.output_dir)
    if check_output_folder(out) and not inside_run:
        refuse_training_run(out)
    if (out / "report.md").exists() and not overwrite and not inside_run and not (out / "base").is_dir():
        raise GlmtuneError(f"{out / 'report.md'} exists but was not written by glmtune compare; use another output "
                           "folder or --overwrite")
    if overwrite and (out / "report.md").exists():
        (out / "report.md").unlink()
    model = settings.model or info.get("base_model")
    if info and model:  # an adapter that does not fit is refused before the base is evaluated
        from glmtune.methods.adapter import check_base_config

        check_base_config(info, Path(settings.adapter), model)
    quantization = Quantization.chosen(Quantization.from_record(info), settings.quantization)
    template = settings.template or info.get("template")
    # the base is asked the tuned model's prompts: the adapter's prompt_template, unless one was given
    prompt_template = prompt_template_for(settings.prompt_template, settings.adapter, settings.model) or ""
    base = replace(settings, output_dir=str(out / "base"), adapter=None, model=model, template=template,
                   quantization=quantization, pre_seq_len=None, prompt_template=prompt_template)
    tuned = replace(settings, output_dir=str(out / "tuned"), model=model, template=template,
                    quantization=quantization, prompt_template=prompt_template)
    before = run_eval(base, overwrite=overwrite)
    after = run_eval(tuned, overwrite=overwrite)

    samples = _load_samples(settings)
    rows_before = _read_rows(out / "base" / PREDICTIONS)
    rows_after = _read_rows(out / "tuned" / PREDICTIONS)
    shown = []
    for sample, b, a in list(zip(samples, rows_before, rows_after))[:examples]:
        prompt = "\n".join(m.content for m in sample.prompt_messages if isinstance(m, Message))
        shown.append({"prompt": prompt, "reference": sample.reference, "before": b["prediction"],
                      "after": a["prediction"]})
    setup = [f"data: `{settings.data}` ({len(samples)} rows)", f"base model: `{model}`",
             f"tuned: adapter `{settings.adapter}`", _decoding(settings)]
    report = write_report(out / "report.md", title="glmtune compare: base vs tuned", setup=setup, before=before,
                          after=after, examples=shown,
                          files=[f"base/{PREDICTIONS}", f"base/{METRICS}", f"tuned/{PREDICTIONS}",
                                 f"tuned/{METRICS}"])
    return report, before, after


def _decoding(settings: EvalSettings) -> str:
    s = settings.generation
    if s.temperature > 0:
        how = f"sampling (temperature {s.temperature}, top-p {s.top_p}, seed {s.seed})"
    else:
        how = "greedy"
    return f"decoding: {how}, at most {s.max_new_tokens} new tokens, repetition penalty {s.repetition_penalty}"


def _read_rows(path: Path) -> list[dict]:
    return [loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
