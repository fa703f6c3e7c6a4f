"""Section 2, full-size training with random weights: peak memory, real tokens/s and utilisation of each
recipe the tutorials and official demos publish a figure for, glmtune's recipe and the tutorials' recipe side
by side (glmtune.bench.run), plus fifty fp16 steps of the real training loop for non-finite losses.

Weights are initialised on the device from the official config (no checkpoint is needed: neither memory
nor speed depends on their values); the data is the shared seed_mixed training set, tokenized by each
model's real tokenizer (GLM-4's by a stand-in, see shapes.py)."""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from glmtune.config import TrainConfig

GB, MiB = 10 ** 9, 2 ** 20
OFFICIAL_LORA = {"lora_rank": 8, "lora_alpha": 32.0, "lora_dropout": 0.1}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a shapes.Shapes.model name
    title: str
    options: dict[str, Any]  # TrainConfig values
    recipes: tuple[str, ...] = ("glmtune", "tutorial")
    official: str = ""  # the published figure this case reproduces, and where it comes from
    official_bytes: int | None = None
    target_bytes: int | None = None  # issue 19's target for glmtune's recipe
    needs_bitsandbytes: bool = False
    loop_steps: int = 0  # >0: the real training loop (glmtune train) for this many steps instead of bench
    gpu_only: dict[str, Any] = field(default_factory=dict)  # options that apply on a GPU only (precision)


CASES = (
    Case("chatglm3-lora", "chatglm3", "ChatGLM3-6B LoRA, official finetune demo (256+512 tokens, batch 4, bf16)",
         {"method": "lora", **OFFICIAL_LORA, "lora_target": "query_key_value", "batch_size": 4,
          "max_source_length": 256, "max_target_length": 512, "learning_rate": 5e-5},
         official="14,082 MiB (ChatGLM3 finetune_demo README, LoRA)", official_bytes=14082 * MiB,
         target_bytes=10 * GB, gpu_only={"dtype": "bfloat16", "precision": "bf16"}),
    Case("chatglm3-ptuning", "chatglm3", "ChatGLM3-6B P-Tuning v2, official finetune demo (pre_seq_len 128, "
         "256+512 tokens, batch 4, bf16)",
         {"method": "ptuning", "pre_seq_len": 128, "batch_size": 4, "max_source_length": 256,
          "max_target_length": 512, "learning_rate": 2e-2},
         official="18,426 MiB (ChatGLM3 finetune_demo README, P-Tuning v2)", official_bytes=18426 * MiB,
         target_bytes=12 * GB, gpu_only={"dtype": "bfloat16", "precision": "bf16"}),
    Case("chatglm6b-ptuning-int4", "chatglm6b", "ChatGLM-6B P-Tuning v2 on the INT4 base, official ptuning/train.sh "
         "(pre_seq_len 128, 64+64 tokens, batch 1)",
         {"method": "ptuning", "pre_seq_len": 128, "quantization_bit": 4, "batch_size": 1,
          "max_source_length": 64, "max_target_length": 64, "learning_rate": 2e-2},
         official="6.7 GB (ChatGLM-6B ptuning README, INT4)", official_bytes=int(6.7 * GB), target_bytes=5 * GB,
         gpu_only={"dtype": "float16", "precision": "fp16"}),
    Case("chatglm6b-lora-fp16", "chatglm6b", "ChatGLM-6B LoRA r 8, fp16, batch 4 x 256 (128+128) tokens",
         {"method": "lora", **OFFICIAL_LORA, "lora_target": "query_key_value", "batch_size": 4,
          "max_source_length": 128, "max_target_length": 128},
         official="13-16 GB (the tutorials' figures for LoRA in fp16)",
         gpu_only={"dtype": "float16", "precision": "fp16"}),
    Case("chatglm6b-ptuning-fp16", "chatglm6b", "ChatGLM-6B P-Tuning v2, fp16, batch 4 x 256 (128+128) tokens",
         {"method": "ptuning", "pre_seq_len": 128, "batch_size": 4, "max_source_length": 128,
          "max_target_length": 128, "learning_rate": 2e-2},
         official="13-16 GB (the tutorials' figures for P-Tuning v2 in fp16)",
         gpu_only={"dtype": "float16", "precision": "fp16"}),
    Case("glm4-9b-lora", "glm4_9b", "GLM-4-9B (glm-4-9b-chat-hf shape) LoRA, finetune demo settings (512+512 "
         "tokens, batch 1, bf16)",
         {"method": "lora", **OFFICIAL_LORA, "lora_target": "q_proj,k_proj,v_proj", "batch_size": 1,
          "max_source_length": 512, "max_target_length": 512, "learning_rate": 5e-4},
         recipes=("glmtune",), official="about 22 GB (GLM-4 finetune demo README, LoRA)", official_bytes=22 * GB,
         gpu_only={"dtype": "bfloat16", "precision": "bf16"}),
    Case("chatglm6b-lora-fp16-50-steps", "chatglm6b", "ChatGLM-6B LoRA, 50 fp16 steps of glmtune train "
         "(loss scaler on)",
         {"method": "lora", "batch_size": 4, "max_source_length": 128, "max_target_length": 128},
         recipes=("glmtune",), loop_steps=50, gpu_only={"dtype": "float16", "precision": "fp16"}),
    Case("glm4-9b-qlora", "glm4_9b", "GLM-4-9B QLoRA (bitsandbytes NF4 base), 512+512 tokens, batch 1, bf16",
         {"method": "qlora", "quantization_bit": 4, **OFFICIAL_LORA, "lora_target": "q_proj,k_proj,v_proj",
          "batch_size": 1, "max_source_length": 512, "max_target_length": 512, "learning_rate": 5e-4},
         recipes=("glmtune",), needs_bitsandbytes=True, gpu_only={"dtype": "bfloat16", "precision": "bf16"}),
)

STEPS = {"gpu": (2, 6), "tiny": (1, 1)}  # (warm-up, timed) optimizer steps per recipe
GPU_SAMPLES = 256  # the first rows of the data: batches are drawn from them at random
TINY_SAMPLES = 16
TINY_LOOP_STEPS = 3


def config_for(case: Case, shapes, on_gpu: bool, model_path: Path) -> TrainConfig:
    values = {**case.options, **(case.gpu_only if on_gpu else {"dtype": "float32", "precision": "fp32"}),
              "max_train_samples": GPU_SAMPLES if on_gpu else TINY_SAMPLES}
    if not on_gpu:  # a quarter of the lengths: the tutorial recipe's full logits are slow on a CPU
        for key in ("max_source_length", "max_target_length"):
            if values.get(key):
                values[key] = max(values[key] // 4, 8)
    return TrainConfig(model=str(model_path), train_file=str(shapes.train_file), dataset_cache=True,
                       report_to="none", seed=42, **values)


def bitsandbytes_problem(device: str) -> str | None:
    """Why a bitsandbytes base cannot be built here, or None."""
    from glmtune.models.kbit import bitsandbytes_problem as problem

    try:
        return problem(device.split(":")[0])
    except ImportError as e:
        return f"bitsandbytes cannot be imported ({e})"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _estimate(cfg: TrainConfig, device: str, recipe: str) -> Callable[[Any, list[dict[str, Any]]], dict[str, Any]]:
    """run_recipe's inspect hook: the memory estimate for the largest batch this run met, made with the
    trained model itself, to compare with the measured peak (section 4)."""
    def inspect(model, batches):
        biggest = max(batches, key=lambda b: b["padded"])
        rows, length = biggest["shape"]
        found = {"largest_batch": {"rows": rows, "length": length, "labelled": biggest["labelled"]}}
        try:
            from glmtune.bench.gpu.estimate import predict_for_run

            found["estimate"] = predict_for_run(model, cfg, rows, length, biggest["labelled"], device,
                                                all_logits=recipe == "tutorial")
        except Exception as e:  # recorded: section 4 reports it
            found["estimate_error"] = f"{type(e).__name__}: {e}"
        return found
    return inspect


def _bench_case(case: Case, cfg: TrainConfig, recipe: str, steps: tuple[int, int], device: str,
                peak: float, weights_on_disk: bool) -> dict[str, Any]:
    from glmtune.bench.run import recipe_config, run_recipe

    warmup, timed = steps
    result = run_recipe(cfg, recipe, timed, warmup, random_weights=not weights_on_disk,
                        inspect=_estimate(recipe_config(cfg, recipe), device, recipe))
    result.update(matmul_peak_flops_per_s=peak, mfu=result["model_flops_per_s"] / peak)
    return result


def _loop_case(case: Case, cfg: TrainConfig, steps: int, work: Path) -> dict[str, Any]:
    """The real training loop (as `glmtune train` runs it) for `steps` steps, logging every step."""
    from glmtune.models.loader import load_random_model
    from glmtune.train.recipe import requested_quantization
    from glmtune.train.trainer import run_training

    out = work / f"run-{case.name}"
    cfg = replace(cfg, output_dir=str(out), overwrite=True, max_steps=steps, logging_steps=1, save_strategy="no")
    loaded = load_random_model(cfg.model, dtype=cfg.dtype, quantization=requested_quantization(cfg))
    started = time.perf_counter()
    result = run_training(cfg, loaded=loaded)
    seconds = time.perf_counter() - started
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    losses = [row["loss"] for row in logs if "loss" in row]
    nonfinite = sum(1 for x in losses if not (isinstance(x, (int, float)) and abs(x) < float("inf") and x == x))
    del loaded, result
    return {"recipe": "glmtune train", "steps": steps, "seconds": round(seconds, 2), "losses_logged": len(losses),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "nonfinite_losses": nonfinite,
            "steps_skipped": sum(row.get("nonfinite_skipped", 0) for row in logs),
            "loss_scaler": cfg.precision == "fp16",
            "ok_no_nonfinite": nonfinite == 0 and len(losses) > 0}


def _with_weights(cfg: TrainConfig, work: Path) -> TrainConfig:
    """A folder holding the random model's weights, so that bitsandbytes quantizes them while loading as it
    does a real checkpoint's."""
    import shutil

    from glmtune.models.loader import load_random_model

    source = Path(cfg.model)
    target = work / f"{source.name}-weights"
    if not (target / "config.json").is_file():
        loaded = load_random_model(str(source), dtype=cfg.dtype)
        loaded.model.save_pretrained(target)
        del loaded
        _free()
        for file in source.iterdir():
            if file.name != "config.json":
                shutil.copy(file, target / file.name)
    return replace(cfg, model=str(target))


def run(shapes, device: str, record: Callable[[dict[str, Any]], None], *, deadline: float,
        cases: tuple[Case, ...] = CASES) -> None:
    from glmtune.bench.measure import matmul_peak

    on_gpu = device.startswith("cuda")
    steps = STEPS["gpu" if on_gpu else "tiny"]
    peak = matmul_peak(device, torch.bfloat16 if on_gpu else torch.float32)
    record({"name": "matmul peak", "ok": True, "value": peak,
            "dtype": "bfloat16" if on_gpu else "float32"})
    for case in cases:
        for recipe in case.recipes:
            name = f"{case.name} {recipe}"
            row: dict[str, Any] = {"name": name, "case": case.name, "title": case.title, "official": case.official,
                                   "official_bytes": case.official_bytes, "target_bytes": case.target_bytes}
            if time.time() > deadline:
                record({**row, "ok": None, "skipped": "the section's time budget was spent"})
                continue
            if case.needs_bitsandbytes:
                problem = bitsandbytes_problem(device)
                if problem:
                    record({**row, "ok": None, "skipped": f"bitsandbytes is not available: {problem}"})
                    continue
            if on_gpu:  # what earlier cases left allocated would count in this one's peak: shown, to be seen
                row["allocated_before_bytes"] = torch.cuda.memory_allocated()
            started = time.perf_counter()
            try:
                cfg = config_for(case, shapes, on_gpu, shapes.model(case.model))
                if case.needs_bitsandbytes:
                    cfg = _with_weights(cfg, shapes.work)
                if case.loop_steps:
                    found = _loop_case(case, cfg, case.loop_steps if on_gpu else TINY_LOOP_STEPS, shapes.work)
                    row.update(found, ok=found["ok_no_nonfinite"])
                else:
                    found = _bench_case(case, cfg, recipe, steps, device, peak, case.needs_bitsandbytes)
                    row.update(found, ok=True)
            except Exception as e:  # one case's failure (an out-of-memory error too) is recorded; the rest run
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-3000:])
            row["wall_s"] = round(time.perf_counter() - started, 2)
            record(row)
            _free()

