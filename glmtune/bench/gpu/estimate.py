"""Section 4, the memory estimate against the measured peaks: for every training case of section 2, the
prediction `glmtune train --dry-run` makes (glmtune.train.memory) for the largest batch that run met, made
with the run's own model, against the peak `torch.cuda.max_memory_allocated` measured; and the dry run's own
worst-case figure for the whole data (built on the meta device, nothing loaded)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

TOLERANCE = 0.15  # the target: within 15% of the measured peak


def predict_for_run(model, cfg, rows: int, length: int, labelled: int, device: str, *,
                    all_logits: bool = False) -> dict[str, Any]:
    """The estimate for one batch shape, with the run's model (method applied, possibly quantized)."""
    from glmtune.models.loader import resolve_dtype
    from glmtune.train.memory import estimate_training_memory
    from glmtune.train.recipe import requested_quantization

    estimate = estimate_training_memory(
        model, batch_size=rows, seq_len=length, labelled=labelled, dtype=resolve_dtype(cfg.dtype, device),
        quantization=requested_quantization(cfg), gradient_checkpointing=cfg.gradient_checkpointing,
        all_logits=all_logits, pre_seq_len=cfg.pre_seq_len if cfg.method == "ptuning" else 0, optim=cfg.optim,
        masked=rows > 1 or cfg.packing)  # as the dry run decides it
    return {"bytes": estimate.total, "parts": estimate.parts, "line": estimate.describe()}


def dry_run_estimate(cfg, work: Path) -> dict[str, Any]:
    """What `glmtune train --dry-run` prints for this config (worst batch of the data, for a GPU)."""
    from glmtune.train.dry_run import dry_run

    result = dry_run(replace(cfg, output_dir=str(work / "dry-run"), overwrite=True))
    estimate = getattr(result, "memory", None)
    if estimate is None:
        raise RuntimeError("the dry run made no memory estimate")
    return {"bytes": estimate.total, "line": estimate.describe()}


def run(shapes, device: str, record: Callable[[dict[str, Any]], None], training_rows: list[dict[str, Any]]) -> None:
    from glmtune.bench.gpu.training import CASES, config_for

    on_gpu = device.startswith("cuda")
    measured = [r for r in training_rows if r.get("peak_memory_bytes") and r.get("case")]
    if not measured:
        record({"name": "estimate vs measured", "ok": None,
                "skipped": "no training case was measured (section training did not run or failed)"})
    for row in measured:
        item: dict[str, Any] = {"name": f"{row['name']} estimate", "case": row["case"],
                                "recipe": row.get("recipe"), "measured_bytes": row["peak_memory_bytes"],
                                "batch": row.get("largest_batch")}
        estimate = row.get("estimate")
        if not estimate:
            record({**item, "ok": False, "error": row.get("estimate_error", "no estimate was recorded")})
            continue
        error = estimate["bytes"] / row["peak_memory_bytes"] - 1
        item.update(estimate_bytes=estimate["bytes"], parts=estimate.get("parts"), error=error, tolerance=TOLERANCE)
        if on_gpu:
            record({**item, "ok": abs(error) <= TOLERANCE})
        else:  # a CPU peak is the process's resident memory, which the estimate of tensor memory does not predict
            record({**item, "ok": None, "skipped": "compared on a GPU only (a CPU peak is the resident set)"})
    for case in CASES:
        if case.loop_steps or case.needs_bitsandbytes:
            continue
        try:
            cfg = config_for(case, shapes, on_gpu, shapes.model(case.model))
            found = dry_run_estimate(cfg, shapes.work)
            peaks = [r["peak_memory_bytes"] for r in measured
                     if r["case"] == case.name and r.get("recipe") == "glmtune"]
            record({"name": f"{case.name} dry run", "case": case.name, "ok": True, "dry_run_bytes": found["bytes"],
                    "line": found["line"], "measured_bytes": peaks[0] if peaks and on_gpu else None})
        except Exception as e:
            record({"name": f"{case.name} dry run", "case": case.name, "ok": False,
                    "error": f"{type(e).__name__}: {e}"})
