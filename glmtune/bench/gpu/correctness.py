"""Section 1, correctness on the device: the tiny golden ChatGLM-6B/2/3 models against the official code's
outputs (../shared/fixtures/golden; made on CPU in float32), half precision against float32 on the same
device, and P-Tuning v2 and LoRA training steps on the device against the same steps on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch

from glmtune.families import NATIVE_FAMILIES

FAMILIES = NATIVE_FAMILIES  # glmtune's own models, each with golden outputs of the official code
ATOL = 1e-4  # the fixtures' README: logits and losses are O(10), made with one thread
HALF_TOLERANCE = {"bfloat16": 0.1, "float16": 0.02}  # largest |logit - fp32 logit| / largest |fp32 logit|
STEP_TOLERANCE = 1e-3  # loss after each of the training steps, device vs CPU, float32
TRAIN_STEPS = 3


def golden_model(folder: Path, family: str, config_name: str = "config.json", extra: str | None = None):
    """The tiny model of `family` with the fixture's weights, in float32 on the CPU."""
    from safetensors.torch import load_file

    from glmtune.models.loader import native_classes

    config_class, model_class, _ = native_classes(family)
    config = config_class.from_pretrained(folder / config_name)
    model = model_class(config)
    state = load_file(folder / "model.safetensors")
    if extra:
        state.update(load_file(folder / extra))
    result = model.load_state_dict({k: v for k, v in state.items() if "inv_freq" not in k}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"golden weights do not fit: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    return model.eval()


def _inputs(family: str, golden: dict[str, torch.Tensor], device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inference batch as the golden run passed it, and where its positions are valid (not padding)."""
    ids = golden["infer.input_ids"]
    if family == "chatglm":  # the official tokenizer's 4D mask and 2D positions
        inputs = {"input_ids": ids, "attention_mask": golden["infer.attention_mask"],
                  "position_ids": golden["infer.position_ids"]}
        valid = golden["infer.valid"]
    else:
        inputs = {"input_ids": ids, "attention_mask": golden["infer.attention_mask"]}
        valid = golden["infer.attention_mask"].bool()
    return {k: v.to(device) for k, v in inputs.items()}, valid.to(device)


def _greedy(model, family: str, golden: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    ids = golden["infer.input_ids"].to(device)
    pad = model.config.pad_token_id
    mask = (ids != pad).long() if family == "chatglm" else golden["infer.attention_mask"].to(device)
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False).cpu()


@torch.no_grad()
def check_family(folder: Path, family: str, device: str, record: Callable[[dict[str, Any]], None]) -> None:
    """Every check of one family; each result is recorded as it is made."""
    import json

    from safetensors.torch import load_file

    golden = load_file(folder / "golden.safetensors")
    results = json.loads((folder / "golden.json").read_text(encoding="utf-8"))["results"]
    inputs, valid = _inputs(family, golden, device)
    train = {"input_ids": golden["train.input_ids"].to(device), "labels": golden["train.labels"].to(device)}

    model = golden_model(folder, family).to(device)
    logits = model(**inputs).logits
    diff = (logits.cpu() - golden["infer.logits"])[valid.cpu()].abs().max().item()
    record(_item(f"{family} float32 logits vs official", diff, ATOL))
    loss = model(**train).loss.item()
    record(_item(f"{family} float32 loss vs official", abs(loss - golden["train.loss"].item()), ATOL))
    same = torch.equal(_greedy(model, family, golden, device), golden["generate.sequences"])
    record({"name": f"{family} greedy tokens vs official", "ok": same, "value": same})

    reference = logits.float()
    scale = reference[valid].abs().max().item()
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        half = copy.deepcopy(model).to(dtype)
        half_logits = half(**inputs).logits.float()
        relative = (half_logits - reference)[valid].abs().max().item() / scale
        top1 = (half_logits.argmax(-1) == reference.argmax(-1))[valid].float().mean().item()
        record({**_item(f"{family} {name} logits vs float32", relative, HALF_TOLERANCE[name]),
                "measure": "max |difference| / max |float32 logit|", "top1_agreement": round(top1, 4)})
        del half

    tag = "ptuning_proj"
    prefixed = golden_model(folder, family, f"{tag}.config.json", f"{tag}.prefix_encoder.safetensors").to(device)
    logits = prefixed(**inputs).logits
    diff = (logits.cpu() - golden[f"{tag}.infer.logits"])[valid.cpu()].abs().max().item()
    record(_item(f"{family} P-Tuning v2 logits vs official", diff, ATOL))
    loss = prefixed(**train).loss.item()
    record(_item(f"{family} P-Tuning v2 loss vs official", abs(loss - results[f"{tag}.train.loss"]), ATOL))
    same = torch.equal(_greedy(prefixed, family, golden, device), golden[f"{tag}.generate.sequences"])
    record({"name": f"{family} P-Tuning v2 greedy tokens vs official", "ok": same, "value": same})


def check_training_steps(folder: Path, family: str, device: str, record: Callable[[dict[str, Any]], None]) -> None:
    """P-Tuning v2 and LoRA: a few AdamW steps on the golden training batch, on the CPU and on `device`
    from the same initial weights (dropout off), in float32; the losses must agree."""
    from safetensors.torch import load_file

    from glmtune.config import TrainConfig
    from glmtune.methods import get_method

    golden = load_file(folder / "golden.safetensors")
    batch = {"input_ids": golden["train.input_ids"], "labels": golden["train.labels"]}
    for method, lr in (("ptuning", 1e-2), ("lora", 1e-3)):
        cfg = TrainConfig(method=method, pre_seq_len=4, lora_dropout=0.0, lora_target="query_key_value")
        torch.manual_seed(0)
        model = get_method(method).apply(golden_model(folder, family), cfg, family)
        if method == "ptuning":
            model.transformer.prefix_dropout.p = 0.0  # deterministic passes on both devices
        start = copy.deepcopy(model.state_dict())
        losses = {}
        for where in ("cpu", device):
            model.load_state_dict(start)
            model.to(where).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr)
            runs = []
            for _ in range(TRAIN_STEPS):
                with torch.enable_grad():
                    loss = model(**{k: v.to(where) for k, v in batch.items()}).loss
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                runs.append(loss.item())
            losses[where] = runs
        finite = all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
        diff = max(abs(a - b) for a, b in zip(losses["cpu"], losses[device]))
        record({**_item(f"{family} {method} {TRAIN_STEPS} train steps, {device} vs cpu", diff, STEP_TOLERANCE),
                "ok": finite and diff <= STEP_TOLERANCE, "losses": {k: [round(x, 6) for x in v]
                                                                    for k, v in losses.items()}})


def _item(name: str, value: float, tolerance: float) -> dict[str, Any]:
    return {"name": name, "value": value, "tolerance": tolerance, "ok": bool(value <= tolerance)}


def run(shapes, device: str, record: Callable[[dict[str, Any]], None]) -> None:
    if device.startswith("cuda"):  # TF32 would round float32 matmuls to 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for family in FAMILIES:
        check_family(shapes.golden / family, family, device, record)
    check_training_steps(shapes.golden / "chatglm3", "chatglm3", device, record)
    check_training_steps(shapes.golden / "chatglm", "chatglm", device, record)
