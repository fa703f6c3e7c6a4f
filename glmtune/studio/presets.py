"""Starting points for the studio's option form: glmtune's defaults, or the method and training settings of the
official tutorial runs that examples/*.yaml reproduce (docs/training.md#recipes-from-the-tutorials). Model,
data and output folder are left out: those stay the user's. tests/test_studio.py checks each preset against
its example file, so the two cannot drift."""

from __future__ import annotations

from typing import Any

_PTUNING_OFFICIAL = {"quantization_bit": 4, "method": "ptuning", "pre_seq_len": 128, "prefix_projection": False,
                     "max_steps": 3000, "batch_size": 1, "gradient_accumulation_steps": 16, "learning_rate": 2e-2,
                     "lr_scheduler": "linear", "warmup_ratio": 0.0, "logging_steps": 10, "save_steps": 1000,
                     "eval_batch_size": 1}
_LORA_OFFICIAL = {"method": "lora", "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1,
                  "lr_scheduler": "linear", "warmup_ratio": 0.0}

# name -> (example file it reproduces, English title, Chinese title, options)
PRESETS: dict[str, tuple[str | None, str, str, dict[str, Any]]] = {
    "glmtune": (None, "glmtune's defaults", "glmtune 的默认值", {}),
    "chatglm6b_adgen_ptuning": (
        "chatglm6b_adgen_ptuning.yaml", "ChatGLM-6B ptuning/train.sh (P-Tuning v2, ADGEN)",
        "ChatGLM-6B ptuning/train.sh（P-Tuning v2，ADGEN）",
        {**_PTUNING_OFFICIAL, "prompt_column": "content", "response_column": "summary", "max_source_length": 64,
         "max_target_length": 64}),
    "chatglm2_ptuning": (
        "chatglm2_ptuning.yaml", "ChatGLM2-6B ptuning/train.sh (P-Tuning v2, ADGEN)",
        "ChatGLM2-6B ptuning/train.sh（P-Tuning v2，ADGEN）",
        {**_PTUNING_OFFICIAL, "prompt_column": "content", "response_column": "summary", "max_source_length": 64,
         "max_target_length": 128}),
    "chatglm6b_lora_multitask": (
        "chatglm6b_lora_multitask.yaml", "ChatGLM-6B LoRA tutorial (multi-task)", "ChatGLM-6B LoRA 教程（多任务）",
        {**_LORA_OFFICIAL, "max_source_length": 400, "max_target_length": 300, "lora_target": "query_key_value",
         "num_train_epochs": 2.0, "batch_size": 1, "learning_rate": 3e-5, "warmup_ratio": 0.06,
         "logging_steps": 100, "save_steps": 1000}),
    "chatglm3_lora": (
        "chatglm3_lora.yaml", "ChatGLM3-6B finetune_demo configs/lora.yaml", "ChatGLM3-6B finetune_demo configs/lora.yaml",
        {**_LORA_OFFICIAL, "cutoff_len": 769, "lora_target": "query_key_value", "max_steps": 3000, "batch_size": 4,
         "eval_batch_size": 16, "learning_rate": 5e-5, "logging_steps": 10, "eval_steps": 500, "save_steps": 500}),
    "glm4_lora": (
        "glm4_lora.yaml", "GLM-4-9B-Chat finetune_demo configs/lora.yaml",
        "GLM-4-9B-Chat finetune_demo configs/lora.yaml",
        {**_LORA_OFFICIAL, "cutoff_len": 1025, "lora_target": "q_proj,k_proj,v_proj", "max_steps": 3000,
         "batch_size": 1, "eval_batch_size": 4, "learning_rate": 5e-4, "logging_steps": 10, "eval_steps": 500,
         "save_steps": 500}),
}
# What a preset never sets: the user's model, data and the run's folder.
USER_OWNED = ("model", "train_file", "dev_file", "output_dir")


def preset_choices(lang: str) -> list[tuple[str, str]]:
    return [(zh if lang == "zh" else en, name) for name, (_, en, zh, _) in PRESETS.items()]
