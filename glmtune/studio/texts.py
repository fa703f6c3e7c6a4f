"""Every word the studio shows, in English and Chinese: one table, so a label cannot exist in one language only
(tests/test_studio.py checks both sides of every entry). Option help comes from glmtune/config.py instead."""

from __future__ import annotations

LANGUAGES = (("English", "en"), ("中文", "zh"))

TEXTS: dict[str, tuple[str, str]] = {
    "title": ("glmtune studio: fine-tune in the browser", "glmtune studio：在浏览器里微调"),
    "intro": ("Pick a model and data, set the options, start a run, watch the loss, then chat with the result and "
              "export it. Each run is a `glmtune train` process of its own: closing this page does not stop it.",
              "选模型和数据，设置选项，开始训练，看 loss 曲线，然后和训练结果对话并导出。每次训练都是一个独立的 "
              "`glmtune train` 进程：关掉这个页面不会停止训练。"),
    "language": ("Language / 语言", "Language / 语言"),
    # tabs
    "tab_model": ("1 Model", "1 模型"),
    "tab_data": ("2 Data", "2 数据"),
    "tab_options": ("3 Options", "3 选项"),
    "tab_runs": ("4 Runs", "4 训练"),
    "tab_results": ("5 Results", "5 结果"),
    # model
    "model_info": ("A local checkpoint folder, or smollm2-135m (the embedded default model).",
                   "本地 checkpoint 目录，或 smollm2-135m（内置的默认模型）。"),
    "use_default_model": ("Use the default model", "使用默认模型"),
    "inspect_model": ("Inspect the model", "查看模型"),
    "model_facts": ("**{name}**: family {family}, {size} parameters, context {context} tokens, prompt format "
                    "{template}{stored}.",
                    "**{name}**：模型族 {family}，参数量 {size}，上下文 {context} 个 token，提示格式 {template}{stored}。"),
    "stored_quantized": (", stored quantized ({bits})", "，以量化形式存储（{bits}）"),
    "unknown": ("unknown", "未知"),
    "fits_intro": ("What fits here ({device}, {gib} GiB available: {source}; estimated peak of one training step "
                   "with {assumed}):",
                   "在这台机器上能跑什么（{device}，可用 {gib} GiB：{source}；估算的是一个训练步的峰值，条件：{assumed}）："),
    "col_method": ("method", "方法"),
    "col_quantization": ("quantization", "量化"),
    "col_memory": ("estimated peak GiB", "估计峰值 GiB"),
    "col_fits": ("fits", "放得下"),
    "yes": ("yes", "是"),
    "no": ("no", "否"),
    "fit_over_budget": ("over the memory available", "超出可用内存"),
    "fit_unavailable": ("cannot run on this machine", "这台机器上无法运行"),
    "fit_estimate_failed": ("no estimate", "无法估算"),
    "memory_gpu_free": ("the GPU's free memory minus a 10 percent margin", "GPU 空闲显存减去百分之十的余量"),
    "memory_cpu_default": ("the CPU default: 6 GiB or half the memory", "CPU 默认值：6 GiB 或内存的一半"),
    "full_weights": ("full weights", "全精度"),
    # data
    "train_file_label": ("Training data (train_file)", "训练数据（train_file）"),
    "dev_file_label": ("Development data (dev_file, optional)", "验证数据（dev_file，可选）"),
    "use_sample_data": ("Use the sample data", "使用示例数据"),
    "check_data": ("Check the data", "检查数据"),
    "data_facts": ("**{path}**: {format} format, {samples} samples, {answers} trained answers{tools}.",
                   "**{path}**：{format} 格式，{samples} 条样本，{answers} 个参与训练的答案{tools}。"),
    "data_tools": (", {calls} tool calls", "，{calls} 次工具调用"),
    "data_lengths": ("Token lengths with {model} (prompt format {template}):", "用 {model} 分词的 token 长度（提示格式 {template}）："),
    "data_cut": ("Samples each set of length limits would cut:", "各组长度上限会截断的样本数："),
    "col_part": ("part", "部分"),
    "preview_line": ("line {line}", "第 {line} 行"),
    "preview_cut": ("cut by the length limits", "被长度上限截断"),
    "preview_intro": ("The first rows as the model sees them; the marked part is what trains:",
                      "前几条样本在模型眼中的样子；高亮部分参与训练："),
    "no_train_file": ("Give the training data first (a JSON or JSONL file), or press Use the sample data.",
                      "请先给出训练数据（JSON 或 JSONL 文件），或点击“使用示例数据”。"),
    # options
    "preset": ("Start from", "起点"),
    "preset_info": ("glmtune's defaults, or the settings of an official tutorial run (model and data stay yours).",
                    "glmtune 的默认值，或某个官方教程的设置（模型和数据保持你选的）。"),
    "apply_preset": ("Apply", "应用"),
    "section_model": ("Model options", "模型选项"),
    "section_data": ("Data options", "数据选项"),
    "section_method": ("Method options", "方法选项"),
    "section_training": ("Training options", "训练选项"),
    "show_command": ("Show the command and the YAML", "显示命令和 YAML"),
    "command_label": ("The same run from a terminal", "在终端里跑同样的训练"),
    "yaml_label": ("Config YAML (edit it, then Load)", "配置 YAML（可编辑，然后点“载入”）"),
    "load_yaml": ("Load this YAML into the form", "把这段 YAML 载入表单"),
    "save_yaml": ("Save YAML", "保存 YAML"),
    "open_yaml": ("Open a YAML file", "打开 YAML 文件"),
    "yaml_loaded": ("Loaded {count} options into the form.", "已把 {count} 个选项载入表单。"),
    "yaml_ignored": (" Ignored {names}: the studio writes each run to the runs folder under its name.",
                     "已忽略 {names}：studio 把每个训练写到训练目录下以其名称命名的子目录。"),
    "options_ok": ("The options are valid.", "选项有效。"),
    # runs
    "run_name": ("Run name", "训练名称"),
    "run_name_info": ("The run is written to {runs}/NAME; empty: a name from the date and time.",
                      "训练写到 {runs}/名称；留空则按日期时间命名。"),
    "bad_run_name": ("run name {name} is not a plain folder name: use letters, digits, '-', '_' and '.', not "
                     "starting with '.', at most 100 characters",
                     "训练名称 {name} 不是一个普通的目录名：只能用字母、数字、“-”、“_”和“.”，不能以“.”开头，最多 100 个字符"),
    "start": ("Start training", "开始训练"),
    "stop": ("Stop", "停止"),
    "resume": ("Resume", "继续"),
    "kill": ("Kill", "强行结束"),
    "killed": ("Ended {name} at once (SIGTERM): it shows as interrupted, and resumes from its last checkpoint.",
               "已立即结束 {name}（SIGTERM）：它会显示为被中断，可从最后一个 checkpoint 继续。"),
    "refresh": ("Refresh", "刷新"),
    "run_choice": ("Run", "训练"),
    "runs_table": ("Runs in {runs}", "{runs} 中的训练"),
    "col_name": ("name", "名称"),
    "col_status": ("status", "状态"),
    "col_step": ("step", "步数"),
    "col_model": ("model", "模型"),
    "status_starting": ("starting", "启动中"),
    "status_running": ("running", "训练中"),
    "status_finished": ("finished", "已完成"),
    "status_stopped": ("stopped", "已停止"),
    "status_failed": ("failed", "失败"),
    "status_interrupted": ("interrupted", "被中断"),
    "progress": ("**{name}**: {status}, step {step} of {total}.", "**{name}**：{status}，第 {step} 步，共 {total} 步。"),
    "started": ("Started {name}.", "已开始 {name}。"),
    "stopping": ("Asked {name} to stop: it saves a checkpoint at the end of this step.",
                 "已请求停止 {name}：它会在这一步结束时保存 checkpoint。"),
    "resumed": ("Resuming {name}.", "正在继续 {name}。"),
    "loss_plot": ("Loss", "Loss 曲线"),
    "log": ("Log", "日志"),
    "no_run": ("Choose a run first.", "请先选择一个训练。"),
    # results
    "metrics": ("**{name}**: {steps} steps, final training loss {loss}, eval loss {eval} (before training {initial}, "
                "best {best}), {params} trainable parameters.",
                "**{name}**：{steps} 步，最终训练 loss {loss}，eval loss {eval}（训练前 {initial}，最佳 {best}），"
                "可训练参数 {params} 个。"),
    "no_metrics": ("{name} has no results yet (metrics.json is written when the run ends).",
                   "{name} 还没有结果（训练结束时才写 metrics.json）。"),
    "make_report": ("Make the before/after report", "生成训练前后对比报告"),
    "report_needs_dev": ("The before/after report answers the dev_file; this run has none.",
                         "训练前后对比报告要回答 dev_file 中的问题；这个训练没有 dev_file。"),
    "chat_heading": ("Chat with the base model and the tuned one, side by side", "并排与基座模型和微调后的模型对话"),
    "load_chat": ("Load the base and the tuned model", "载入基座模型和微调后的模型"),
    "chat_loaded": ("Loaded {model} with {run}'s adapter.", "已载入 {model} 和 {run} 的 adapter。"),
    "chat_not_loaded": ("Load the models first.", "请先载入模型。"),
    "base_chat": ("Base model", "基座模型"),
    "tuned_chat": ("Tuned model", "微调后的模型"),
    "max_new_tokens": ("Longest answer in tokens", "回答最多多少 token"),
    "message": ("Message", "消息"),
    "send": ("Send", "发送"),
    "export_heading": ("Export", "导出"),
    "export_mode": ("What to write", "导出什么"),
    "export_merge": ("LoRA merged into the base (a full checkpoint)", "把 LoRA 合并进基座（完整 checkpoint）"),
    "export_adapter": ("The adapter alone (a P-Tuning run: its prefix file)", "只导出 adapter（P-Tuning：prefix 文件）"),
    "export_folder": ("Export folder", "导出目录"),
    "export": ("Export", "导出"),
    "no_adapter": ("{name} has no adapter yet.", "{name} 还没有 adapter。"),
    # errors
    # glmtune's own checks word their messages in English: the Chinese page says what happened first
    "error": ("⚠️ {message}", "⚠️ 出错了：{message}"),
    "unexpected": ("unexpected error (the studio's output has the details): {message}",
                   "意外错误（详情见 studio 的输出）：{message}"),
    "working": ("Working…", "处理中…"),
}


def text(key: str, lang: str, **values) -> str:
    """The text of `key` in `lang` ("en" or "zh"), with `values` filled in."""
    english, chinese = TEXTS[key]
    chosen = chinese if lang == "zh" else english
    return chosen.format(**values) if values else chosen  # without values: a template for the caller to fill
