"""Typed options for every command, read from a YAML/JSON file plus command-line overrides.

One flat namespace of keys (``max_steps``), grouped into dataclasses by layer for readability. The
same key can be given in a config file (``max_steps: 50``), as a flag (``--max-steps 50`` or
``--max_steps 50``) or as ``max_steps=50``; later sources win: defaults < file < command line.
Unknown keys are errors that name the closest valid key; the option names of the ChatGLM tutorials and
transformers' TrainingArguments are read as glmtune's (glmtune/tutorial_names.py).
"""

import argparse
import dataclasses
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from glmtune.errors import GlmtuneError, one_line, shown
from glmtune.families import TEMPLATE_NAMES
from glmtune.files import MAX_NESTING, NestingError, loads, read_text

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_WARMUP_RATIO = 0.05
# lora_init values that move part of each weight into the adapter (the base in memory is no longer the original)
MUTATING_LORA_INIT = ("pissa", "olora")
ALPHA_PER_RANK = 2.0  # lora_alpha's default: twice the rank (with rsLoRA's scaling, see rslora_of)


def lora_alpha_of(options) -> float:
    """lora_alpha as given, else the default for the rank (for options resolve has not seen yet)."""
    return options.lora_alpha if options.lora_alpha is not None else ALPHA_PER_RANK * options.lora_rank


def rslora_of(options) -> bool:
    """use_rslora as given, else on for LoRA whose alpha is the default: rsLoRA with alpha 2 x rank trained
    faster than plain LoRA on the default model, while an alpha the user chose keeps its usual meaning."""
    if options.use_rslora is not None:
        return options.use_rslora
    return options.lora_alpha is None and options.method != "ptuning"
# metric_for_best: eval loss (lower is better) or a generated-answer metric (higher is better)
BEST_METRICS = ("eval_loss", "exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "extraction_f1",
                "classification_accuracy", "classification_micro_f1")


def option(default: Any, help: str, *, zh: str | None = None, choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           check: Any = None) -> Any:
    """A dataclass field that documents itself, in English (`help`) and Chinese (`zh`, kept as `help_zh`:
    docs/training.zh.md's option tables and the web UI show it), and knows its valid range (`check(value,
    name)` raises GlmtuneError for a value of the right type that still cannot work). Help texts are plain
    text without a percent sign (argparse formats them)."""
    meta = {"help": help, "help_zh": zh, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above,
            "check": check}
    return field(default=default, metadata=meta)


def _check_train_file(value: Any, source: str) -> None:
    from glmtune.data.mixing import check_train_file  # the forms of several files, with their numbers

    check_train_file(value, source)


def _check_prompt_template(value: str, source: str) -> None:
    from glmtune.data.prompt_template import check_template  # depends on nothing but glmtune.errors

    check_template(value, f"{source}: prompt_template")


@dataclass
class ModelOptions:
    model: str = option(DEFAULT_MODEL, "Local checkpoint folder, or the alias smollm2-135m (the embedded default model).",
                        zh="本地 checkpoint 目录，或别名 smollm2-135m（内置的默认模型）。")
    template: str = option("auto", "Prompt format: auto (the family's format, else the tokenizer's chat template, "
                           "else plain), chat (the tokenizer's chat template), plain (prompt then answer), "
                           "and the ChatGLM families' own: chatglm ([Round i] history, answer after [gMASK] <sop>), "
                           "chatglm2 ([Round i] from 1), chatglm3 (role tokens), and glm4 (GLM-4's role tokens as its "
                           "official fine-tuning writes them, tools included; auto for GLM-4).",
                           zh="提示格式：auto（模型族自己的格式，否则用 tokenizer 的 chat template，再否则用 "
                              "plain）、chat（tokenizer 的 chat template）、plain（提示后直接接答案），以及 ChatGLM "
                              "系列自己的格式：chatglm（[Round i] 历史，答案在 [gMASK] <sop> 之后）、"
                              "chatglm2（[Round i] 从 1 开始）、chatglm3（角色 token）、glm4（GLM-4 "
                              "官方微调写出的角色 token，包括工具；GLM-4 的 auto 即用它）。",
                           choices=TEMPLATE_NAMES)
    dtype: str = option("auto", "Weight dtype: auto is float32 on CPU, bfloat16 on a GPU that supports it, else float16.",
                        zh="权重精度：auto 在 CPU 上是 float32，在支持 bf16 的 GPU 上是 bfloat16，否则是 float16。",
                        choices=("auto", "float32", "float16", "bfloat16"))
    quantization_bit: int | None = option(None, "Quantize the frozen base to 8 or 4 bits; 0 keeps full weights; "
                                          "default 4 for method qlora, else 0. Checkpoints stored quantized (e.g. "
                                          "chatglm-6b-int4, chatglm2-6b-int4) are read as they are.",
                                          zh="把冻结的基座量化到 8 或 4 bit；0 保持全精度；method 为 qlora 时默认 "
                                             "4，否则默认 0。以量化形式存储的 checkpoint（如 chatglm-6b-int4、"
                                             "chatglm2-6b-int4）按原样读取。",
                                          choices=(0, 4, 8))
    quantization_backend: str = option("auto", "How the base is quantized: chatglm (ChatGLM-6B/2/3's own int8/int4 "
                                       "layout, runs anywhere), bitsandbytes (every family; QLoRA's NF4), auto "
                                       "(chatglm for ChatGLM-6B/2/3 except with method qlora, else bitsandbytes).",
                                       zh="基座的量化方式：chatglm（ChatGLM-6B/2/3 自己的 int8/int4 格式，CPU/GPU "
                                          "都能跑）、bitsandbytes（所有模型族；QLoRA 的 NF4）、auto（ChatGLM-6B/2/3 "
                                          "用 chatglm，method 为 qlora 时除外；其他用 bitsandbytes）。",
                                       choices=("auto", "chatglm", "bitsandbytes"))
    quantization_type: str = option("nf4", "bitsandbytes 4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.",
                                    zh="bitsandbytes 4-bit 的数据类型：nf4（QLoRA 的 NormalFloat）或 fp4。",
                                    choices=("nf4", "fp4"))
    double_quantization: bool = option(True, "bitsandbytes 4-bit: quantize the quantization scales too (QLoRA's "
                                       "double quantization; saves about 0.4 bits per weight).",
                                       zh="bitsandbytes 4-bit：对量化 scale 再做一次量化（QLoRA 的双重量化；"
                                          "每个权重约省 0.4 bit）。")


@dataclass
class DataOptions:
    train_file: str | list | None = option(None, "Training data, JSON or JSONL (context/target, instruction/input/"
                                           "output, history, conversations/messages, or columns named by "
                                           "prompt_column/response_column). Several files are mixed into one set "
                                           "shuffled by seed: a list, or several values after --train-file, each "
                                           "path (taken whole), path:N (N samples) or path:W with 0 < W < 1 (the "
                                           "file's share of the mix), e.g. [task.jsonl, general.jsonl:0.3] "
                                           "(docs/data.md#mixing-data-against-forgetting).",
                                           zh="训练数据，JSON 或 JSONL（context/target、instruction/input/output、"
                                              "history、conversations/messages，或由 prompt_column/response_column "
                                              "指定的列）。多个文件会混合成一个按 seed 打乱的训练集：写成列表，或在 "
                                              "--train-file 后给出多个值，每项为 path（整个文件）、path:N（N "
                                              "个样本）或 path:W，0 < W < 1（该文件在混合集中所占的比例），例如 "
                                              "[task.jsonl, general.jsonl:0.3]（docs/data.zh.md#混合数据以防遗忘）。",
                                           check=_check_train_file)
    dev_file: str | None = option(None, "Development data in the same formats; evaluated for eval loss and the best adapter.",
                                  zh="验证数据，格式同上；用来计算 eval loss 和选出最佳 adapter。")
    prompt_column: str | None = option(None, "Read the prompt from this column (e.g. ADGEN's content).",
                                       zh="从这一列读取提示（例如 ADGEN 的 content）。")
    response_column: str | None = option(None, "Read the answer from this column (e.g. ADGEN's summary).",
                                         zh="从这一列读取答案（例如 ADGEN 的 summary）。")
    prompt_template: str | None = option(None, "Write each single-turn row's prompt from its fields, e.g. "
                                         "'问：{instruction}\\n补充信息：{input}\\n答：' ({{ and }} are literal braces); "
                                         "the adapter records it, and predict, eval, chat, serve and webui use it "
                                         "(docs/data.md#prompt_template).",
                                         zh="用每个单轮样本的字段拼出它的提示，例如 '问：{instruction}\\n补充信息："
                                            "{input}\\n答：'（{{ 和 }} 表示字面花括号）；adapter 会记录它，predict、"
                                            "eval、chat、serve 和 webui 都会沿用（见"
                                            " docs/data.zh.md#prompt_template）。", check=_check_prompt_template)
    max_source_length: int | None = option(None, "Longest prompt in tokens (as in the ChatGLM tutorials); longer prompts are cut and counted.",
                                           zh="提示最多多少 token（同 ChatGLM 教程）；更长的提示会被截断并计数。", minimum=1)
    max_target_length: int | None = option(None, "Longest answer in tokens, its end token included; longer answers are cut and counted.",
                                           zh="答案最多多少 token，含结束符；更长的答案会被截断并计数。", minimum=2)
    cutoff_len: int = option(1024, "Longest whole sample in tokens; prompt and answer share it when both are long.",
                             zh="整个样本最多多少 token；提示和答案都很长时两者分享这个长度。", minimum=2)
    max_train_samples: int | None = option(None, "Use only the first N training samples.",
                                           zh="只用前 N 条训练样本。", minimum=1)
    max_eval_samples: int | None = option(None, "Use only the first N dev samples.",
                                          zh="只用前 N 条验证样本。", minimum=1)
    group_by_length: bool = option(False, "Batch samples of similar length together: less padding, but batches and "
                                   "their order follow length (and so often task); on short runs that trained worse "
                                   "(docs/benchmarks.md).",
                                   zh="把长度相近的样本放进同一个 batch：padding 更少，但 batch "
                                      "及其顺序会跟着长度走（因而常常跟着任务类型走）；短训练中效果更差（见 "
                                      "docs/benchmarks.md）。")
    padding_free: bool = option(True, "Put each step's batch_size samples (drawn in random order, as for padded "
                                "batches) side by side in one sequence with no padding; attention and positions "
                                "keep them apart, so the loss is that of the padded batch. Where a model cannot keep "
                                "samples apart, batches are padded (said in the log).",
                                zh="把每一步的 batch_size 个样本（与 padding 的 batch 一样随机抽取）"
                                   "首尾相接放进一条序列，不加 padding；attention 和位置编号把它们分开，所以 loss "
                                   "与 padding 后的 batch 相同。模型做不到把样本分开时改用 padding 的 "
                                   "batch（日志会说明）。")
    packing: bool = option(False, "Pack several samples into each training sequence of up to cutoff_len tokens "
                           "(no compute on padding); attention stays inside each sample and positions restart, so "
                           "the loss is unchanged. batch_size then counts packed sequences.",
                           zh="把多个样本打包进每条最长 cutoff_len 个 token 的训练序列（padding 上不花算力）；"
                              "attention 只在各样本内部进行，位置编号重新开始，所以 loss 不变。此时 batch_size "
                              "数的是打包后的序列。")
    dataset_cache: bool = option(True, "Keep tokenized data in glmtune's cache (keyed by file content, tokenizer, "
                                 "template and limits) so the next run skips tokenizing.",
                                 zh="把分词后的数据存进 glmtune 的缓存（以文件内容、tokenizer、"
                                    "模板和长度上限为键），下次运行跳过分词。")
    split_special_tokens: bool = option(False, "Tokenize training messages as plain text: a control token spelled "
                                        "in a message (a chat template's role markers, GLM's [gMASK] or <sop>) "
                                        "stays those characters, as in the prompts that serve, chat, webui, predict "
                                        "and eval build. Off, it becomes the control token, as Hugging Face chat "
                                        "templates and the official scripts tokenize it. Text that spells none is "
                                        "tokenized the same either way (docs/serving.md).",
                                        zh="把训练消息当作纯文本分词：消息里拼写出的控制 token（chat template "
                                           "的角色标记、GLM 的 [gMASK] 或 <sop>）保持为这些字符，与 serve、chat、"
                                           "webui、predict 和 eval 构造的提示一致。关闭时它会变成控制 token，与 "
                                           "Hugging Face chat template 和官方脚本的分词方式一致。"
                                           "不含这类字符串的文本两种方式结果相同（见 docs/serving.md）。")
    train_on: str = option("all_assistant", "Which answers of a conversation train: all_assistant (every assistant "
                           "message, tool calls included) or last_assistant (only the last; LLaMA-Factory's "
                           "mask_history: true). Earlier answers then stay as context. Tool results and the answers of "
                           "a single-turn row's history never train (docs/data.md#which-turns-train).",
                           zh="对话中哪些答案参与训练：all_assistant（每条 assistant 消息，包括工具调用）或 "
                              "last_assistant（只有最后一条；即 LLaMA-Factory 的 mask_history: true）。"
                              "其余答案作为上下文。工具结果和单轮格式 history 里的回答从不参与训练（见 "
                              "docs/data.md#which-turns-train）。",
                           choices=("all_assistant", "last_assistant"))


@dataclass
class MethodOptions:
    method: str = option("lora", "Fine-tuning method: lora, qlora (LoRA over a 4-bit NF4 or 8-bit bitsandbytes "
                         "base), or ptuning (P-Tuning v2: a trained key/value prefix in every layer).",
                         zh="微调方法：lora、qlora（在 bitsandbytes 的 4-bit NF4 或 8-bit 基座上做 LoRA）或 "
                            "ptuning（P-Tuning v2：在每一层训练一段 key/value prefix）。",
                         choices=("lora", "qlora", "ptuning"))
    lora_rank: int = option(16, "LoRA rank r.",
                            zh="LoRA 的秩 r。", minimum=1)
    lora_alpha: float | None = option(None, "LoRA alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) "
                                      "with use_rslora). Default twice lora_rank.",
                                      zh="LoRA alpha；更新量按 alpha / rank 缩放（打开 use_rslora 时按 alpha / "
                                         "sqrt(rank)）。默认是 lora_rank 的两倍。", above=0)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.",
                                 zh="LoRA 输入上的 dropout。", minimum=0, maximum=0.99)
    lora_target: str = option("all-linear", "Modules to adapt: all-linear (every linear layer of the decoder), "
                              "auto (the family's official targets, e.g. query_key_value for ChatGLM, q_proj,v_proj "
                              "for Llama-like models), or comma-separated names.",
                              zh="要加 LoRA 的模块：all-linear（decoder 里所有线性层）、auto（模型族官方的目标模块，"
                                 "例如 ChatGLM 的 query_key_value、类 Llama 模型的 q_proj,v_proj），"
                                 "或逗号分隔的模块名。")
    use_rslora: bool | None = option(None, "rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / "
                                     "rank, so high ranks keep learning (peft's use_rslora). Default: on when "
                                     "lora_alpha is not set (it trained faster on the default model, "
                                     "docs/training.md), off when it is, so a tutorial's alpha keeps its meaning.",
                                     zh="rsLoRA：更新量按 alpha / sqrt(rank) 缩放而不是 alpha / rank，"
                                        "秩大时也能学得动（即 peft 的 use_rslora）。默认：没有设置 lora_alpha "
                                        "时打开（它在默认模型上训得更快，见 docs/training.zh.md），设置了就关闭，"
                                        "这样教程里的 alpha 保持原来的含义。")
    use_dora: bool = option(False, "DoRA: train each adapted weight's magnitude apart from its LoRA direction "
                            "(peft's use_dora; slower steps, not over ChatGLM's own int8/int4 layout).",
                            zh="DoRA：把每个被适配权重的幅度与 LoRA 的方向分开训练（即 peft 的 use_dora；每步更慢，"
                               "不支持 ChatGLM 自带的 int8/int4 量化格式）。")
    loraplus_lr_ratio: float | None = option(None, "LoRA+: train LoRA's B matrices at this multiple of "
                                             "learning_rate (the paper suggests 16); unset, A and B share it.",
                                             zh="LoRA+：LoRA 的 B 矩阵用 learning_rate 的这个倍数训练（论文建议 "
                                                "16）；不设置时 A 和 B 用同一个学习率。",
                                             minimum=1)
    lora_init: str = option("default", "How LoRA's matrices start: default (A random, B zero: the update starts at "
                            "zero), gaussian, pissa (A and B from the weight's principal singular vectors, fast "
                            "SVD with 16 iterations; the rest stays in the base), or olora (from a QR "
                            "decomposition). pissa and olora need an unquantized base; the saved adapter is "
                            "converted to apply to the original base.",
                            zh="LoRA 矩阵的初始值：default（A 随机、B 为零：更新量从零开始）、gaussian、pissa（A 和 "
                               "B 取自权重的主奇异向量，用 16 次迭代的快速 SVD；其余部分留在基座里）或 olora（来自 "
                               "QR 分解）。pissa 和 olora 需要未量化的基座；保存的 adapter "
                               "会被转换成可直接加在原始基座上的形式。",
                            choices=("default", "gaussian", "pissa", "olora"))
    pre_seq_len: int = option(64, "P-Tuning v2: prefix length in tokens (64 trained better than the official "
                              "tutorials' 128 on the default model, docs/training.md); given "
                              "without method, it selects method ptuning, as the official ptuning/ scripts do.",
                              zh="P-Tuning v2：prefix 的长度（token 数；在默认模型上 64 比官方教程的 128 训得更好，"
                                 "见 docs/training.zh.md）；没有给 method 时，它会选定 method ptuning，与官方 "
                                 "ptuning/ 脚本一致。",
                              minimum=1)
    prefix_projection: bool = option(False, "P-Tuning v2: produce the prefix through a two-layer MLP (more parameters) "
                                     "instead of training it directly.",
                                     zh="P-Tuning v2：通过一个两层 MLP 生成 prefix（参数更多），而不是直接训练 "
                                        "prefix。")
    prefix_hidden_size: int | None = option(None, "P-Tuning v2: width of that MLP; default the model's hidden size.",
                                            zh="P-Tuning v2：这个 MLP 的宽度；默认是模型的 hidden size。",
                                            minimum=1)


@dataclass
class TrainingOptions:
    output_dir: str | None = option(None, "Where the run is written; default runs/train-<date>-<time>.",
                                    zh="运行结果写到哪里；默认 runs/train-<日期>-<时间>。")
    overwrite: bool = option(False, "Replace the results of an earlier run in output_dir.",
                             zh="替换 output_dir 中之前一次运行的结果。")
    resume: bool = option(False, "Continue from the newest checkpoint in output_dir.",
                          zh="从 output_dir 中最新的 checkpoint 继续训练。")
    num_train_epochs: float = option(3.0, "Epochs to train (ignored when max_steps is set).",
                                     zh="训练多少个 epoch（设置了 max_steps 时忽略）。", above=0)
    max_steps: int | None = option(None, "Optimizer steps to train; overrides num_train_epochs.",
                                   zh="训练多少个优化器步；优先于 num_train_epochs。", minimum=1)
    batch_size: int = option(4, "Training samples per device per step.",
                             zh="每个设备每步的训练样本数。", minimum=1)
    eval_batch_size: int = option(8, "Samples per device per evaluation step.",
                                  zh="每个设备每个评测步的样本数。", minimum=1)
    gradient_accumulation_steps: int = option(1, "Batches accumulated into one optimizer step.",
                                              zh="累积多少个 batch 做一次优化器更新。", minimum=1)
    learning_rate: float | None = option(None, "Peak learning rate of the optimizer. Default by method and model "
                                         "size: P-Tuning v2 2e-2 (the official recipe); LoRA and QLoRA 2e-3 up to "
                                         "135M parameters, falling log-linearly to 2e-4 at 7B and 1e-4 from about "
                                         "23B (docs/training.md#defaults).",
                                         zh="优化器的峰值学习率。默认值取决于方法和模型大小：P-Tuning v2 为 "
                                            "2e-2（官方配方）；LoRA 和 QLoRA 在 135M 参数及以下为 2e-3，"
                                            "按对数线性降到 7B 时的 2e-4，约 23B 起为 1e-4（见 "
                                            "docs/training.zh.md#默认值）。", above=0)
    lr_scheduler: str = option("cosine", "Learning-rate schedule after warmup.",
                               zh="warmup 之后的学习率调度。", choices=("linear", "cosine", "constant"))
    warmup_ratio: float | None = option(None, "Fraction of the steps spent warming the learning rate up from 0; "
                                        "default 0.05, or 0 when warmup_steps is given.",
                                        zh="总步数中用于把学习率从 0 升上来的比例；默认 0.05，给了 warmup_steps "
                                           "时为 0。", minimum=0, maximum=1)
    warmup_steps: int = option(0, "Steps spent warming the learning rate up from 0 (a count; give this or "
                               "warmup_ratio, not both).",
                               zh="用于把学习率从 0 升上来的步数（绝对步数；与 warmup_ratio 二选一，不能同时给）。", minimum=0)
    optim: str = option("adamw_torch_fused", "Optimizer: adamw_torch_fused (AdamW in PyTorch's fused kernel, the "
                        "Trainer's own default), adamw_torch (the same AdamW, unfused: equal up to rounding), "
                        "adafactor (less memory: no full second moments), adamw_8bit or paged_adamw_8bit (AdamW with "
                        "8-bit states, through bitsandbytes; paged needs CUDA, elsewhere it runs unpaged).",
                        zh="优化器：adamw_torch_fused（PyTorch 融合内核实现的 AdamW，也是 Trainer 自己的默认值）、"
                           "adamw_torch（同样的 AdamW，不融合：结果只差舍入误差）、"
                           "adafactor（更省内存：不保存完整的二阶矩）、adamw_8bit 或 paged_adamw_8bit（状态为 8-bit "
                           "的 AdamW，通过 bitsandbytes；paged 需要 CUDA，其他情况下以非 paged 方式运行）。",
                        choices=("adamw_torch_fused", "adamw_torch", "adafactor", "adamw_8bit", "paged_adamw_8bit"))
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to biases and norm weights).",
                                 zh="AdamW 的 weight decay（从不作用于 bias 和 norm 权重）。", minimum=0)
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 turns clipping off).",
                                  zh="把梯度范数裁剪到这个值（0 表示不裁剪）。", minimum=0)
    nonfinite: str = option("skip", "A step whose loss or gradients are NaN or infinite: skip (drop its update, count "
                            "it, go on) or stop (at once, keeping the last checkpoint).",
                            zh="loss 或梯度为 NaN / 无穷大的那一步：skip（丢弃这一步的更新，计数，继续训练）或 "
                               "stop（立即停止，保留最后一个 checkpoint）。", choices=("skip", "stop"))
    max_nonfinite_steps: int = option(10, "Stop when this many steps in a row were not finite.",
                                      zh="连续这么多步不是有限值时停止训练。", minimum=1)
    neftune_noise_alpha: float | None = option(None, "NEFTune: add uniform noise to the input embeddings while "
                                               "training, scaled by alpha / sqrt(length x hidden size) with each "
                                               "sample's own length (the paper tries 5 to 15); unset, no noise.",
                                               zh="NEFTune：训练时在输入 embedding 上加均匀噪声，幅度为 alpha / "
                                                  "sqrt(长度 x hidden size)，长度按每个样本自己的长度算（论文试了 5 "
                                                  "到 15）；不设置时不加噪声。",
                                               above=0)
    seed: int = option(42, "Random seed for initialisation, shuffling and dropout.",
                       zh="初始化、打乱数据和 dropout 用的随机种子。")
    logging_steps: int = option(10, "Log loss, learning rate and speed every N steps.",
                                zh="每 N 步记录一次 loss、学习率和速度。", minimum=1)
    eval_steps: int = option(0, "Evaluate on dev_file every N steps (0: only at the end of each epoch).",
                             zh="每 N 步在 dev_file 上评测一次（0：只在每个 epoch 结束时评测）。", minimum=0)
    eval_each_epoch: bool = option(True, "Evaluate on dev_file at the end of each epoch.",
                                   zh="每个 epoch 结束时在 dev_file 上评测。")
    eval_on_start: bool = option(False, "Evaluate on dev_file once before training (the untrained baseline, logged at step 0).",
                                 zh="训练开始前先在 dev_file 上评测一次（未训练的基线，记为第 0 步）。")
    metric_for_best: str = option("eval_loss", "What picks OUT/best and drives early stopping: eval_loss, or a "
                                  "metric of answers generated for dev_file at each evaluation (docs/metrics.md).",
                                  zh="用什么选出 OUT/best、决定是否提前停止：eval_loss，或每次评测时为 dev_file "
                                     "生成的回答的某个指标（见 docs/metrics.md）。",
                                  choices=BEST_METRICS)
    early_stopping_patience: int = option(0, "Stop after this many evaluations without a better metric_for_best "
                                          "(0: never stop early).",
                                          zh="连续这么多次评测 metric_for_best 都没有变好就停止（0：从不提前停止）。", minimum=0)
    eval_max_new_tokens: int = option(256, "Longest answer generated for dev_file when metric_for_best or "
                                      "eval_generate needs answers.",
                                      zh="metric_for_best 或 eval_generate 需要生成回答时，为 dev_file "
                                         "生成的回答的最大长度。", minimum=1)
    eval_generate: bool = option(False, "After training, answer dev_file with the base and the trained model and "
                                 "write OUT/report.md (what `glmtune compare` does).",
                                 zh="训练结束后，分别用基座模型和训练后的模型回答 dev_file，并写出 "
                                    "OUT/report.md（即 `glmtune compare` 做的事）。")
    save_strategy: str = option("steps", "When resumable checkpoints are written: steps (every save_steps, and at "
                                "the end), epoch (at the end of each epoch), or no (never; OUT/adapter is still "
                                "written, but the run cannot be resumed).",
                                zh="什么时候写可恢复的 checkpoint：steps（每 save_steps 步一次，结束时再写一次）、"
                                   "epoch（每个 epoch 结束时）或 no（从不写；OUT/adapter 照样会写，"
                                   "但这次运行无法恢复）。", choices=("steps", "epoch", "no"))
    save_steps: int = option(200, "Write a resumable checkpoint every N steps (one is also written at the end).",
                             zh="每 N 步写一个可恢复的 checkpoint（结束时也会写一个）。", minimum=1)
    save_total_limit: int = option(2, "Keep at most this many checkpoints.",
                                   zh="最多保留这么多个 checkpoint。", minimum=1)
    precision: str = option("auto", "auto: fp32 on CPU, bf16 (else fp16) mixed precision on GPU.",
                            zh="auto：CPU 上 fp32，GPU 上 bf16（不支持时 fp16）混合精度。",
                            choices=("auto", "fp32", "fp16", "bf16"))
    gradient_checkpointing: bool | None = option(None, "Recompute activations in the backward pass to save memory: "
                                                 "true on every layer (about a third more compute), false on none; "
                                                 "unset (auto), on as few layers as keep the worst step's estimated "
                                                 "peak under memory_budget (the log says how many and why).",
                                                 zh="反向传播时重算激活值以节省内存：true 为每一层都重算（多约三分之"
                                                    "一的计算量），false 为都不重算；不设置（auto）"
                                                    "时只重算尽可能少的层，使最坏一步的估算峰值不超过 "
                                                    "memory_budget（日志会说明重算几层以及原因）。")
    memory_budget: float | None = option(None, "GiB a training step may use, for gradient_checkpointing auto. "
                                         "Default: on a GPU its free memory minus 10 percent, on the CPU 6 GiB "
                                         "or half the machine's memory, whichever is less.",
                                         zh="gradient_checkpointing 为 auto 时，一个训练步可以使用的内存（GiB）。"
                                            "默认：GPU 上为空闲显存减去百分之十的余量，CPU 上为 6 GiB "
                                            "和机器内存一半中较小的那个。", above=0)
    dataloader_num_workers: int = option(0, "Worker processes for batching.",
                                         zh="组 batch 用的 worker 进程数。", minimum=0)
    report_to: str = option("none", "Also log to this backend (its package must be installed; tensorboard writes "
                            "OUT/runs/, pip install tensorboard).",
                            zh="同时把日志发给这个后端（必须装了对应的包；tensorboard 写到 OUT/runs/，需 pip "
                               "install tensorboard）。",
                            choices=("none", "tensorboard", "wandb", "mlflow"))
    deepspeed: str | None = option(None, "DeepSpeed config JSON for the Trainer's DeepSpeed integration, e.g. "
                                   "examples/deepspeed_zero2.json or examples/deepspeed_zero3_offload.json "
                                   "(needs pip install deepspeed and CUDA GPUs; launch with torchrun or --nproc; "
                                   "docs/distributed.md).",
                                   zh="给 Trainer 的 DeepSpeed 集成用的 DeepSpeed 配置 JSON，例如 "
                                      "examples/deepspeed_zero2.json 或 examples/deepspeed_zero3_offload.json（需要 "
                                      "pip install deepspeed 和 CUDA GPU；用 torchrun 或 --nproc 启动；见 "
                                      "docs/distributed.md）。")


@dataclass
class TrainConfig(ModelOptions, DataOptions, MethodOptions, TrainingOptions):
    """Everything `glmtune train` reads."""


def resolve(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the defaults that depend on other options worked out, and the combinations that cannot
    work refused: the one place train, bench, `--dry-run` and resolved_config.yaml take them from.
    Resolving a resolved config changes nothing.

    - learning_rate stays unset when not given: its default depends on the model's size, known once the
      model is built (glmtune.train.size_defaults);
    - lora_alpha: twice lora_rank when not given, and then use_rslora on unless given (rslora_of);
      warmup_ratio: DEFAULT_WARMUP_RATIO unless warmup_steps;
    - the LoRA variants (use_dora, use_rslora, loraplus_lr_ratio, lora_init) belong to LoRA and QLoRA, and
      pissa/olora need an unquantized base;
    - quantization_bit and quantization_backend: QLoRA is LoRA over a bitsandbytes base, 4-bit unless
      quantization_bit says 8; the other methods quantize only when quantization_bit is set (the
      family-dependent `auto` backend is worked out once the model's family is known);
    - padding_free: off under packing, whose rows already carry no padding to speak of;
    - the options that need generated answers for dev_file need a dev_file."""
    bits, backend = cfg.quantization_bit or 0, cfg.quantization_backend
    if cfg.method == "qlora":
        if cfg.quantization_bit == 0:
            raise GlmtuneError("method qlora trains LoRA over a 4-bit or 8-bit base; quantization_bit 0 is method lora")
        if backend == "chatglm":
            raise GlmtuneError("method qlora quantizes the base with bitsandbytes; for LoRA over ChatGLM's own "
                               "int8/int4 layout use method: lora with quantization_bit")
        bits, backend = cfg.quantization_bit or 4, "bitsandbytes"
    needs_dev = [name for name, used in (("metric_for_best", cfg.metric_for_best != "eval_loss"),
                                         ("early_stopping_patience", cfg.early_stopping_patience > 0),
                                         ("eval_generate", cfg.eval_generate)) if used]
    if needs_dev and not cfg.dev_file:
        raise GlmtuneError(f"{', '.join(needs_dev)} need(s) dev_file")
    variants = [name for name, used in (("use_dora", cfg.use_dora), ("use_rslora", cfg.use_rslora),
                                        ("loraplus_lr_ratio", cfg.loraplus_lr_ratio is not None),
                                        ("lora_init", cfg.lora_init != "default")) if used]
    if variants and cfg.method == "ptuning":
        raise GlmtuneError(f"{', '.join(variants)} belong(s) to LoRA; method ptuning trains a prefix instead")
    if cfg.lora_init in MUTATING_LORA_INIT and bits:
        raise GlmtuneError(f"lora_init {cfg.lora_init} starts LoRA from the base's own weights, which needs them "
                           f"unquantized; use lora_init default with a {bits}-bit base")
    if cfg.warmup_ratio is None:
        warmup_ratio = 0.0 if cfg.warmup_steps else DEFAULT_WARMUP_RATIO
    else:
        warmup_ratio = cfg.warmup_ratio
    return dataclasses.replace(cfg, lora_alpha=lora_alpha_of(cfg), use_rslora=rslora_of(cfg),
                               warmup_ratio=warmup_ratio,
                               quantization_bit=bits, quantization_backend=backend,
                               padding_free=cfg.padding_free and not cfg.packing)


def section_of(cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """The option groups of a config class in documentation order: (section name, fields)."""
    groups = [c for c in (ModelOptions, DataOptions, MethodOptions, TrainingOptions) if issubclass(cls, c)] or [cls]
    return [(g.__name__.removesuffix("Options").lower(), list(fields(g))) for g in groups]


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def _base_type(annotation: Any) -> type:
    """int for `int | None`, etc. (this module keeps annotations as real types, not strings)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _takes_list(annotation: Any) -> bool:
    """An option that may hold a list (`str | list | None`: train_file's several files)."""
    return list in typing.get_args(annotation)


def truth(raw: Any) -> bool | None:
    """A YAML/JSON boolean, or a word for one (true/yes/1/on, false/no/0/off); None for anything else."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(raw, str) and raw.lower() in ("false", "no", "0", "off"):
        return False
    return None


def _coerce(key: str, raw: Any, f: dataclasses.Field, source: str) -> Any:
    """Turn a value from a file or the command line into the field's type, or explain why not."""
    kind = _base_type(f.type)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and _optional(f.type)):
        if _optional(f.type):
            return None
        raise GlmtuneError(f"{source}: {key} cannot be empty (default: {f.default!r})")
    if kind is bool:
        value = truth(raw)
        if value is not None:
            return value
        raise GlmtuneError(f"{source}: {key} must be true or false, got {shown(raw)}")
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise GlmtuneError(f"{source}: {key} must be a whole number, got {shown(raw)}")
        try:
            return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
        except (TypeError, ValueError):
            raise GlmtuneError(f"{source}: {key} must be a whole number, got {shown(raw)}") from None
    if kind is float:
        if isinstance(raw, bool):
            raise GlmtuneError(f"{source}: {key} must be a number, got {shown(raw)}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise GlmtuneError(f"{source}: {key} must be a number, got {shown(raw)}") from None
        if not math.isfinite(value):  # nan passes every range check
            raise GlmtuneError(f"{source}: {key} must be a finite number, got {shown(raw)}")
        return value
    if isinstance(raw, (dict, list)) and _takes_list(f.type):  # train_file's files (glmtune/data/mixing.py)
        items = raw if isinstance(raw, list) else [raw]
        return items[0] if len(items) == 1 and isinstance(items[0], str) else list(items)
    if isinstance(raw, (dict, list)):
        raise GlmtuneError(f"{source}: {key} must be a single value, got {type(raw).__name__}")
    if isinstance(raw, bool):  # a JSON true/false (YAML's are kept as written): never a folder named False
        raise GlmtuneError(f"{source}: {key} must be text, got {str(raw).lower()}; write it in quotes")
    return str(raw)


def _check_range(key: str, value: Any, f: dataclasses.Field, source: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise GlmtuneError(f"{source}: {key} must be one of {', '.join(map(str, meta['choices']))}; got {shown(value)}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise GlmtuneError(f"{source}: {key} must be at least {meta['minimum']}; got {shown(value)}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise GlmtuneError(f"{source}: {key} must be at most {meta['maximum']}; got {shown(value)}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise GlmtuneError(f"{source}: {key} must be greater than {meta['above']}; got {shown(value)}")
    if meta.get("check"):
        meta["check"](value, source)


def unknown_key_error(key: str, valid: list[str], source: str) -> GlmtuneError:
    from glmtune.tutorial_names import hint  # knows the tutorials' names too, so its hints are right

    normalized = key.lstrip("-").replace("-", "_")
    return GlmtuneError(f"{source}: unknown option {shown(key)}{hint(normalized, valid)}")


class ConfigValues(dict):
    """The option values of a config file, plus `texts`: each plain (unquoted) YAML scalar as it was written,
    so that an option that takes text keeps `off`, `no`, `1.10` or `017` instead of what YAML made of it
    (False, 1.1, 15)."""

    def __init__(self, values: dict, texts: dict[str, str] | None = None):
        super().__init__(values)
        self.texts = texts or {}


class _ConfigLoader(yaml.SafeLoader):
    """YAML for config files. An alias (*name) of a list or mapping is refused: a flat config never needs
    one, and a few hundred bytes of nested aliases stand for gigabytes wherever the value is walked or
    drawn (the "billion laughs"). Nesting is bounded, because the composer recurses."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if isinstance(self.anchors.get(event.anchor), yaml.CollectionNode):
                raise yaml.composer.ComposerError(
                    None, None, f"the alias *{event.anchor[:40]} repeats a list or mapping; aliases of lists and "
                    "mappings are not supported in config files (option values are single values)", event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str) -> ConfigValues | Any:
    """The YAML document's value; a mapping comes with the text of its plain scalar values."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    if isinstance(data, dict) and isinstance(node, yaml.MappingNode):
        texts = {str(k.value): v.value for k, v in node.value
                 if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode) and v.style is None}
        return ConfigValues(data, texts)
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option names to values from a YAML or JSON file (a ConfigValues for YAML)."""
    p = Path(path)
    return parse_config_text(read_text(p, "config file"), str(p), json_text=p.suffix == ".json")


def parse_config_text(text: str, p: str, *, json_text: bool = False) -> dict[str, Any]:
    """`read_config_file` for text that is not in a file (the studio's YAML box); `p` names it in messages."""
    try:
        data = loads(text) if json_text else _load_yaml(text)
    except json.JSONDecodeError as e:
        raise GlmtuneError(f"{p}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except NestingError as e:
        raise GlmtuneError(f"{p}: not valid as a config: {e}") from None
    except RecursionError:  # the bound above should come first; never a traceback either way
        raise GlmtuneError(f"{p}: not valid as a config: nested too deeply") from None
    except yaml.YAMLError as e:  # its own message spans lines, with the offending line drawn under it
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or e
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise GlmtuneError(f"{p}{where}: not valid YAML: {one_line(what)}{column}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GlmtuneError(f"{p}: the config must be a mapping of option names to values")
    return data


def build_config(cls: type, layers: list[tuple[str, dict[str, Any]]]):
    """Merge layers of raw values (each with a source name for messages) into a validated `cls`."""
    from glmtune.tutorial_names import translate

    by_name = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for source, raw in layers:
        texts = getattr(raw, "texts", {})  # a YAML file's plain values as written (ConfigValues)
        given: dict[str, tuple[str, Any]] = {}  # option -> (the name it came as, value) within this source
        for key, name, value in translate(raw, source, set(by_name)):  # tutorials' names read as glmtune's
            if name is None:
                raise unknown_key_error(str(key), list(by_name), source)
            if (_base_type(by_name[name].type) is str and value is not None and not isinstance(value, str)
                    and str(key) in texts):
                value = texts[str(key)]  # `output_dir: off` is the folder "off", not "False"
            value = _coerce(name, value, by_name[name], source)
            if name in given and given[name][1] != value:  # e.g. per_device_train_batch_size and batch_size
                raise GlmtuneError(f"{source}: {given[name][0]} and {key} both set {name}, to {shown(given[name][1])} "
                                   f"and {shown(value)}; give one of them")
            given[name] = (str(key), value)
            values[name] = (value, source)
    if "pre_seq_len" in values and "method" not in values and "method" in by_name:
        # the official ptuning/ scripts train P-Tuning v2 whenever pre_seq_len is given: so does their command here
        log.info("reading pre_seq_len without method as method: ptuning (as the official ptuning/ scripts do)")
        values["method"] = ("ptuning", values["pre_seq_len"][1])
    for name, (value, source) in values.items():
        _check_range(name, value, by_name[name], source)
    return cls(**{name: value for name, (value, _) in values.items()})


TUTORIAL_DEST = "tutorial_name:"  # the dest prefix of the tutorials' option names on the command line


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field (`--max-steps` and `--max_steps`), defaults suppressed so only given flags count;
    plus the tutorials' names (glmtune/tutorial_names.py), hidden from --help."""
    from glmtune.tutorial_names import NAMES

    names = {f.name for f in fields(cls)} - set(skip)
    for entry in NAMES.values():
        if entry.name in names or entry.in_files_only or (entry.option is not None and entry.option not in names):
            continue
        flags = [f"--{entry.name}"] + ([f"--{entry.name.replace('_', '-')}"] if "_" in entry.name else [])
        shape = {"nargs": "?", "const": "true"} if entry.flag else {"nargs": "+"} if entry.many else {}
        parser.add_argument(*flags, dest=TUTORIAL_DEST + entry.name, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS, **shape)
    for section, group_fields in section_of(cls):
        group = parser.add_argument_group(f"{section} options")
        for f in group_fields:
            if f.name in skip:
                continue
            flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
            help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
            if _base_type(f.type) is bool:
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
                group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",  # snake_case, as the rest
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                # flags arrive as text, typed and checked later (after a tutorial's value is converted: adamw_hf)
                choices = f.metadata.get("choices") if f.name not in NAMES else None
                group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                   choices=tuple(map(str, choices)) if choices else None, help=help_text,
                                   # --train-file a.jsonl b.jsonl:0.3, or the flag repeated
                                   **({"nargs": "+", "action": "extend"} if _takes_list(f.type) else {}))


def split_overrides(items: list[str]) -> tuple[str | None, dict[str, str]]:
    """Positional words of a command: at most one config file, and key=value overrides."""
    config_file, overrides = None, {}
    for item in items:
        if "=" in item and not Path(item).exists():
            key, _, value = item.partition("=")
            overrides[key.strip()] = value
        elif config_file is None:
            config_file = item
        else:
            raise GlmtuneError(f"only one config file can be given; got {config_file!r} and {item!r}")
    return config_file, overrides


def check_unknown_flags(unknown: list[str], cls: type) -> None:
    for word in unknown:
        if word.startswith("-"):
            raise unknown_key_error(word.split("=")[0], [f.name for f in fields(cls)], "command line")
    if unknown:
        raise GlmtuneError(f"command line: unexpected argument {unknown[0]!r}")


def config_from_args(cls: type, namespace: argparse.Namespace, positional: list[str], unknown: list[str]):
    """Build `cls` from the parsed command line: file < key=value < --flags."""
    check_unknown_flags(unknown, cls)
    positional = list(positional)
    for f in fields(cls):  # --train-file a.jsonl run.yaml max_steps=5: argparse gave it the words after it too
        values = vars(namespace).get(f.name)
        if _takes_list(f.type) and isinstance(values, list):
            words = [v for v in values[1:] if v.endswith((".yaml", ".yml")) or ("=" in v and not Path(v).exists())]
            setattr(namespace, f.name, [v for v in values if v not in words])
            positional += words
    config_file, overrides = split_overrides(positional)
    train_args_file = getattr(namespace, "train_args_file", None)  # the tutorials' TrainingArguments JSON
    if train_args_file and config_file:
        raise GlmtuneError(f"give one config file: {config_file!r} or --train_args_file {train_args_file!r}, "
                           "not both (put the options of one into the other)")
    config_file = config_file or train_args_file
    layers = []
    if config_file:
        layers.append((str(config_file), read_config_file(config_file)))
    if overrides:
        layers.append(("command line", overrides))
    names = {f.name for f in fields(cls)}
    flags = {k.removeprefix(TUTORIAL_DEST): (v[0] if isinstance(v, list) and len(v) == 1 else v)
             for k, v in vars(namespace).items() if k in names or k.startswith(TUTORIAL_DEST)}
    if flags:
        layers.append(("command line", flags))
    return build_config(cls, layers)


def to_yaml(config) -> str:
    """The resolved config as YAML, one commented section per layer; `read_config_file` reads it back."""
    lines = ["# glmtune resolved config: every option with the value this run used"]
    for section, group_fields in section_of(type(config)):
        lines.append(f"\n# {section}")
        for f in group_fields:
            value = getattr(config, f.name)
            lines.append(yaml.safe_dump({f.name: value}, allow_unicode=True, default_flow_style=False).strip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Generation: one set of names for predict, eval, compare, chat, serve and webui (glmtune/inference)


def number_type(kind: type, minimum: float, *, above: bool = False, maximum: float | None = None):
    """An argparse type: a number of `kind` that is at least `minimum` (greater, if `above`), at most `maximum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if above else 'at least'} {minimum}, "
                                             f"got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


@dataclass
class GenerationOptions:
    """How answers are generated: greedy unless `temperature` > 0. `{default}` in a help text is the default
    of the command that shows it (chat, serve and webui answer longer than predict and eval)."""

    max_new_tokens: int = option(256, "longest answer in tokens (default: {default})", minimum=1)
    temperature: float = option(0.0, "0 (default) decodes greedily; above 0 samples", minimum=0)
    top_p: float = option(1.0, "nucleus sampling mass when sampling (default: {default})", above=0, maximum=1)
    repetition_penalty: float = option(1.0, "above 1 discourages repeats (default: {default})", above=0)
    seed: int | None = option(None, "random seed for sampling (0 to 4294967295, as numpy takes)", minimum=0,
                              maximum=2 ** 32 - 1)


def add_generation_arguments(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None,
                             defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None) -> None:
    """One typed flag per GenerationOptions field (`--max-new-tokens`), checked against its range as it is
    parsed; `defaults` and `helps` give a command's own default or wording, `only` a subset of the fields."""
    for f in fields(GenerationOptions):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        default = (defaults or {}).get(f.name, f.default)
        above = meta["above"] is not None
        parse = number_type(_base_type(f.type), meta["above"] if above else meta["minimum"], above=above,
                            maximum=meta["maximum"])
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=parse, default=default,
                            help=(helps or {}).get(f.name, meta["help"]).format(default=default))


def generation_from_args(namespace: argparse.Namespace) -> GenerationOptions:
    """The GenerationOptions a command's flags gave (fields without a flag keep their defaults)."""
    return GenerationOptions(**{f.name: getattr(namespace, f.name) for f in fields(GenerationOptions)
                                if hasattr(namespace, f.name)})
