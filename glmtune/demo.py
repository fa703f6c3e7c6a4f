"""`glmtune demo`: the whole path on the shipped sample data, in a few minutes on two CPU cores.

1. load the default model (SmolLM2-135M-Instruct) and answer the sample dev set (the "before");
2. fine-tune it with LoRA on the sample train set (eval loss on the dev set before and after);
3. answer the dev set again with the trained adapter (the "after");
4. print a before/after table with three examples, and write everything, report.md included, under
   one output folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from glmtune.config import DEFAULT_MODEL, GenerationOptions, TrainConfig
from glmtune.data.formats import load_samples
from glmtune.errors import GlmtuneError
from glmtune.evaluate.metrics import compute_metrics, detect_task
from glmtune.evaluate.predictions import write_predictions
from glmtune.evaluate.report import comparison_table, format_examples, write_report
from glmtune.files import check_output_folder
from glmtune.inference.generate import Generator
from glmtune.methods import get_method
from glmtune.models.loader import default_device, load_model
from glmtune.paths import sample_data_dir
from glmtune.train.run_folder import default_output_dir
from glmtune.train.trainer import run_training

log = logging.getLogger(__name__)

# The demo trains with glmtune's defaults (method, rank, targets, learning rate, schedule); it only sets
# how long, sized to finish within the 10-minute budget on 2 CPU cores (docs/benchmarks.md).
RECIPE = {
    "max_steps": 30,
    "batch_size": 8,
    "logging_steps": 5,
}
DEV_SAMPLES = 40
MAX_NEW_TOKENS = 200
# One batch for the whole dev subset: on a CPU each decoding step costs about the same for 1 or 64
# prompts (it is bound by reading the weights), so fewer, larger batches finish sooner.
GENERATION_BATCH = 64


def _pick_examples(samples, before: list[str], after: list[str], count: int = 3) -> list[dict[str, str]]:
    """One example per task first, then the next rows in order."""
    order, seen = [], set()
    for i, sample in enumerate(samples):
        task = detect_task(sample.reference)
        if task not in seen:
            seen.add(task)
            order.append(i)
    order += [i for i in range(len(samples)) if i not in order]
    return [{"prompt": samples[i].prompt_messages[-1].content, "reference": samples[i].reference,
             "before": before[i], "after": after[i]} for i in order[:count]]


def run_demo(*, model: str = DEFAULT_MODEL, output_dir: str | None = None, max_steps: int | None = None,
             dev_samples: int | None = None, overwrite: bool = False) -> dict:
    started = time.perf_counter()
    out = Path(output_dir) if output_dir else default_output_dir("demo")
    if check_output_folder(out, option="--output-dir") and any(out.iterdir()) and not overwrite:
        raise GlmtuneError(f"{out} is not empty; pass --overwrite to replace it or choose another --output-dir")
    train_file, dev_file = sample_data_dir() / "train.jsonl", sample_data_dir() / "dev.jsonl"
    dev = load_samples(dev_file)[0][: dev_samples or DEV_SAMPLES]
    generation = {"batch_size": GENERATION_BATCH, "generation": GenerationOptions(MAX_NEW_TOKENS)}
    log.info("[1/4] loading %s", model)
    loaded = load_model(model, device=default_device())
    loaded.model.eval()
    out.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a failed start leaves nothing
    log.info("[2/4] answering %d dev questions with the base model", len(dev))
    before = write_predictions(Generator(loaded), dev, out / "predictions_before.jsonl", **generation)

    log.info("[3/4] fine-tuning with LoRA")
    recipe = dict(RECIPE, max_steps=max_steps or RECIPE["max_steps"])
    config = TrainConfig(model=model, train_file=str(train_file), dev_file=str(dev_file),
                         max_eval_samples=len(dev), output_dir=str(out / "run"), overwrite=overwrite,
                         eval_on_start=True, eval_each_epoch=False, save_steps=recipe["max_steps"], **recipe)
    result = run_training(config, loaded=loaded)
    loaded.model = get_method(config.method).for_inference(result.model)
    loaded.model.eval()

    log.info("[4/4] answering the dev questions with the fine-tuned model")
    after = write_predictions(Generator(loaded, result.template), dev, out / "predictions_after.jsonl", **generation)

    references = [s.reference for s in dev]
    scores_before = compute_metrics(zip(before, references))
    scores_after = compute_metrics(zip(after, references))
    scores_before["eval_loss"] = result.metrics.get("initial_eval_loss")
    scores_after["eval_loss"] = result.metrics["eval"].get("eval_loss")
    examples = _pick_examples(dev, before, after)
    minutes = (time.perf_counter() - started) / 60
    used = yaml.safe_load((out / "run" / "resolved_config.yaml").read_text(encoding="utf-8"))
    scaling = " with rsLoRA scaling" if used["use_rslora"] else ""
    setup = [f"model: {model}; LoRA rank {used['lora_rank']}{scaling} on {used['lora_target']} layers "
             "(glmtune's defaults)",
             f"training: {recipe['max_steps']} steps of {recipe['batch_size']} samples from {train_file.name} "
             f"(400 rows), learning rate {used['learning_rate']:g}",
             f"evaluation: {len(dev)} rows of {dev_file.name}, greedy decoding, at most {MAX_NEW_TOKENS} new tokens",
             f"total time: {minutes:.1f} minutes"]
    files = ["predictions_before.jsonl", "predictions_after.jsonl", "run/adapter/", "run/loss.png",
             "run/train_log.jsonl", "run/metrics.json", "demo_metrics.json"]
    report = write_report(out / "report.md", title="glmtune demo: LoRA on the sample data", setup=setup,
                          before=scores_before, after=scores_after, examples=examples, files=files)
    settings = ("learning_rate", "lora_rank", "lora_alpha", "use_rslora", "lora_target", "lr_scheduler",
                "warmup_ratio")
    summary = {"before": scores_before, "after": scores_after, "minutes": minutes,
               "recipe": dict(recipe, **{k: used[k] for k in settings}),
               "dev_samples": len(dev)}
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    print("\n" + comparison_table(scores_before, scores_after))
    print("\n" + format_examples(examples))
    print(f"\ndemo finished in {minutes:.1f} minutes; everything is in {out} (report: {report})")
    return summary
