"""`glmtune bench`: training speed, memory and utilisation of glmtune's recipe and of the tutorials' recipe,
side by side on the same model, method and data.

- glmtune: what `glmtune train` does with the same options (padding-free batches in shuffled order, logits
  only at labelled positions, gradient checkpointing on as few layers as the memory budget needs, packing
  when asked);
- tutorial: the ChatGLM tutorials' recipe: every sample padded to max_source_length + max_target_length,
  gradient checkpointing on, logits and their float32 cross-entropy at every position, random batches.

Each recipe runs in a process of its own, so each peak memory is its own. Timing starts after the
warm-up steps; tokens, samples and FLOPs are those of the batches of the timed steps.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from glmtune.config import TrainConfig, to_yaml
from glmtune.errors import GlmtuneError

log = logging.getLogger(__name__)

RECIPES = ("glmtune", "tutorial")
TUTORIAL_LIMITS = (100, 100)  # the tutorials' max_source_length / max_target_length


@dataclass
class BenchSettings:
    config: TrainConfig
    steps: int = 10
    warmup_steps: int = 2
    recipes: tuple[str, ...] = RECIPES


def with_bench_defaults(cfg: TrainConfig) -> TrainConfig:
    """Without length limits of its own, a benchmark uses the tutorials' 100/100 for both recipes, so both
    train on the same real tokens."""
    if cfg.max_source_length is None and cfg.max_target_length is None:
        cfg = replace(cfg, max_source_length=TUTORIAL_LIMITS[0], max_target_length=TUTORIAL_LIMITS[1])
    return cfg


def recipe_config(cfg: TrainConfig, recipe: str) -> TrainConfig:
    if recipe == "tutorial":
        if cfg.max_source_length is None or cfg.max_target_length is None:
            raise GlmtuneError("the tutorial recipe pads to max_source_length + max_target_length: set both")
        return replace(cfg, gradient_checkpointing=True, group_by_length=False, packing=False, padding_free=False)
    return cfg


class BatchLedger:
    """Wraps a collator and writes down, batch by batch in the order they are made, what each holds."""

    def __init__(self, collator, flops):
        self.collator = collator
        self.flops = flops
        self.batches: list[dict[str, float]] = []

    def __call__(self, features):
        real = samples = labelled = 0
        flops = 0.0
        for feature in features:
            lengths = feature.get("lengths") or [len(feature["input_ids"])]
            start = 0
            for n in lengths:
                answer = sum(1 for t in feature["labels"][start + 1:start + n] if t != -100)
                real, samples, labelled = real + n, samples + 1, labelled + answer
                flops += self.flops.sample(n, answer)
                start += n
        batch = self.collator(features)
        self.batches.append({"real": real, "padded": int(batch["input_ids"].numel()), "samples": samples,
                             "labelled": labelled, "flops": flops, "shape": list(batch["input_ids"].shape)})
        return batch


class StepClock:
    """Trainer callback: the time at the end of every optimizer step."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                clock.times[state.global_step] = time.perf_counter()

        self.times: dict[int, float] = {}
        self.callback = Callback()


def run_recipe(cfg: TrainConfig, recipe: str, steps: int, warmup_steps: int, *, random_weights: bool = False,
               inspect: Callable[[Any, list[dict[str, Any]]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train `warmup_steps + steps` optimizer steps with `recipe` in this process and measure the last `steps`.

    `random_weights`: the model folder's architecture with random weights, built on the device (its config
    and tokenizer are enough; speed and memory do not depend on the values). `inspect(model, batches)`, if
    given, is called after training with the trained model and every batch's ledger entry; what it returns
    is added to the result."""
    from glmtune.bench.measure import FlopCounter
    from glmtune.data.collate import PadCollator
    from glmtune.models.loader import default_device, load_random_model
    from glmtune.train.peak_memory import PeakMemory
    from glmtune.train.recipe import batching, build_trainer, prepare

    cfg = recipe_config(cfg, recipe)
    if not cfg.train_file:
        raise GlmtuneError("bench needs --data FILE (training data in any format train accepts)")
    device = default_device()
    total_steps = warmup_steps + steps
    # Training steps only: no dev data, no evaluation, no checkpoint or log inside the timed steps.
    run_cfg = replace(cfg, max_steps=total_steps, save_steps=total_steps + 1, logging_steps=total_steps + 1,
                      eval_steps=0, eval_on_start=False, report_to="none", dev_file=None, metric_for_best="eval_loss",
                      early_stopping_patience=0, eval_generate=False)
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as out:
        prepared = prepare(replace(run_cfg, output_dir=out), load=load_random_model if random_weights else None,
                           progress=False)
        cfg, model, limits = prepared.cfg, prepared.model, prepared.limits
        collator = prepared.collator
        if recipe == "tutorial":  # every sample padded to max_source_length + max_target_length
            collator = PadCollator(prepared.loaded.tokenizer.pad_token_id,
                                   fixed_length=cfg.max_source_length + cfg.max_target_length, count_tokens=True)
        ledger = BatchLedger(collator, FlopCounter.of(model, cfg.pre_seq_len if cfg.method == "ptuning" else 0))
        clock = StepClock(device)
        trainer = build_trainer(prepared, [clock.callback], collator=ledger, labelled_logits=recipe != "tutorial")
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        memory = PeakMemory(device)
        memory.start()
        trainer.train()
        peak = memory.peak_bytes()
    loaded = prepared.loaded
    seconds = clock.times[total_steps] - clock.times[warmup_steps]
    accumulation = cfg.gradient_accumulation_steps
    timed = ledger.batches[warmup_steps * accumulation:total_steps * accumulation]
    totals = {key: sum(b[key] for b in timed) for key in ("real", "padded", "samples", "labelled", "flops")}
    achieved = totals["flops"] / seconds
    return {
        "recipe": recipe, "model": loaded.name, "family": loaded.family, "method": cfg.method,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "batch_size": cfg.batch_size, "gradient_accumulation_steps": accumulation,
        "padding": "fixed" if recipe == "tutorial" else batching(cfg),
        "padded_length": cfg.max_source_length + cfg.max_target_length if recipe == "tutorial" else None,
        "gradient_checkpointing": prepared.recompute.recomputed > 0,
        "recomputed_layers": f"{prepared.recompute.recomputed}/{prepared.recompute.layers}",
        "logits": "all" if recipe == "tutorial" else "labelled",
        "limits": limits.describe(), "steps": steps, "warmup_steps": warmup_steps, "seconds": round(seconds, 3),
        "steps_per_s": steps / seconds, "samples_per_s": totals["samples"] / seconds,
        "real_tokens_per_s": totals["real"] / seconds, "padded_tokens_per_s": totals["padded"] / seconds,
        "padding_share": 1 - totals["real"] / totals["padded"],
        "peak_memory_bytes": peak,
        "peak_memory_kind": memory.describe(),
        "model_flops_per_s": achieved,  # run_bench adds the matmul peak and the utilisation
        **(inspect(model, ledger.batches) if inspect else {}),
    }


def run_bench(settings: BenchSettings, in_process: bool = False) -> dict[str, Any]:
    """Every recipe in `settings`, each in a fresh child process unless `in_process`."""
    from glmtune.bench.measure import matmul_peak
    from glmtune.models.loader import default_device, resolve_dtype

    from glmtune.data.mixing import load_mixture

    cfg = with_bench_defaults(settings.config)
    if not cfg.train_file:
        raise GlmtuneError("bench needs --data FILE (training data in any format train accepts)")
    columns = {"prompt_column": cfg.prompt_column, "response_column": cfg.response_column,
               "prompt_template": cfg.prompt_template}
    load_mixture(cfg.train_file, read_with=columns, seed=cfg.seed)  # fail early
    for recipe in settings.recipes:
        recipe_config(cfg, recipe)  # a recipe that cannot run fails before any other runs
    device = default_device()
    # One peak for every recipe, so their utilisations compare as their FLOP rates do.
    peak = matmul_peak(device, resolve_dtype(cfg.dtype, device))
    results = {}
    for recipe in settings.recipes:
        log.info("bench: %s recipe, %d warm-up + %d timed steps", recipe, settings.warmup_steps, settings.steps)
        if in_process:
            results[recipe] = run_recipe(cfg, recipe, settings.steps, settings.warmup_steps)
        else:
            results[recipe] = _run_child(cfg, recipe, settings)
    for result in results.values():
        result.update(matmul_peak_flops_per_s=peak, mfu=result["model_flops_per_s"] / peak)
    summary: dict[str, Any] = {"recipes": results}
    if "glmtune" in results and "tutorial" in results:
        ours, theirs = results["glmtune"], results["tutorial"]
        summary["glmtune_vs_tutorial"] = {
            "real_tokens_per_s": ours["real_tokens_per_s"] / theirs["real_tokens_per_s"],
            "peak_memory": ours["peak_memory_bytes"] / theirs["peak_memory_bytes"],
            "mfu": ours["mfu"] / theirs["mfu"]}
    return summary


def _run_child(cfg: TrainConfig, recipe: str, settings: BenchSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as folder:
        config_file, result_file = Path(folder) / "config.yaml", Path(folder) / "result.json"
        config_file.write_text(to_yaml(cfg), encoding="utf-8")
        command = [sys.executable, "-m", "glmtune", "bench", str(config_file), "--in-process", "--recipe", recipe,
                   "--steps", str(settings.steps), "--warmup-steps", str(settings.warmup_steps),
                   "--json", str(result_file)]
        finished = subprocess.run(command, stdout=subprocess.DEVNULL)  # it reports through result_file
        if finished.returncode != 0 or not result_file.is_file():
            raise GlmtuneError(f"the {recipe} recipe's benchmark process failed (exit {finished.returncode}); "
                               "its messages are above")
        return json.loads(result_file.read_text(encoding="utf-8"))["recipes"][recipe]


def format_table(summary: dict[str, Any]) -> str:
    header = f"{'recipe':<9} {'steps/s':>8} {'samples/s':>10} {'real tok/s':>11} {'padding':>8} " \
             f"{'recomputed':>10} {'peak memory':>12} {'GFLOP/s':>8} {'MFU':>6}"
    lines = [header]
    for name, r in summary["recipes"].items():
        lines.append(f"{name:<9} {r['steps_per_s']:>8.3f} {r['samples_per_s']:>10.2f} {r['real_tokens_per_s']:>11.1f} "
                     f"{100 * r['padding_share']:>7.1f}% {r['recomputed_layers']:>10} "
                     f"{r['peak_memory_bytes'] / 2**30:>8.2f} GiB "
                     f"{r['model_flops_per_s'] / 1e9:>8.1f} {100 * r['mfu']:>5.1f}%")
    first = next(iter(summary["recipes"].values()))
    lines.append(f"matmul peak {first['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({first['dtype']}, {first['device']}, "
                 f"{first['threads']} threads); peak memory: {first['peak_memory_kind']}")
    ratio = summary.get("glmtune_vs_tutorial")
    if ratio:
        lines.append(f"glmtune / tutorial: real tokens/s x{ratio['real_tokens_per_s']:.2f}, "
                     f"peak memory x{ratio['peak_memory']:.2f}, MFU x{ratio['mfu']:.2f}")
    return "\n".join(lines)
