"""Oracles for tool conversations (test code, not glmtune's): the training examples the official ChatGLM3 and
GLM-4 fine-tuning scripts build, written from their documented behaviour, independently of glmtune's layouts.

ChatGLM3 (finetune_demo's multi-turn format): a `tools` list becomes a first system message (an English sentence,
a newline, the list as JSON indented by 4); a `tool` entry is an assistant message named after the tool whose text
is `tool_call(...)` unparsed from a Python AST in a python block, then an observation message with the result;
every message is the tokenizer's `build_single_message`; the loss mask covers assistant messages and is shifted
one token right; eos ends the sample.

GLM-4 (finetune/finetune.py with the glm-4-9b-chat template): each message is rendered on its own by the chat
template (tools: a fixed system text with each function's JSON; otherwise `<|role|>{metadata}\\n{content}`,
nothing for empty content) and tokenized; the mask covers every role but system, user and observation and is
shifted one token right; `<|user|>` ends the sample.
"""

from __future__ import annotations

import ast
import json
from typing import Any

CHATGLM3_INTRO = "Answer the following questions as best as you can. You have access to the following tools:\n"
GLM4_TOOLS_HEAD = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                   "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_TAIL = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _shifted_labels(ids: list[int], mask: list[bool]) -> list[int]:
    shifted = [False] + mask[:-1]
    return [t if keep else -100 for t, keep in zip(ids, shifted)]


def chatglm3_official_tool_example(tokenizer, item: dict[str, Any]) -> dict[str, list[int]]:
    conversation = list(item["conversations"])
    if "tools" in item:
        conversation.insert(0, {"role": "system",
                                "content": CHATGLM3_INTRO + json.dumps(item["tools"], indent=4, ensure_ascii=False)})
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    mask = [False, False]

    def add(tokens: list[int], loss: bool) -> None:
        ids.extend(tokens)
        mask.extend([loss] * len(tokens))

    for message in conversation:
        loss = message.get("loss", True) and message["role"] not in ("system", "user")
        if message["role"] == "tool":
            call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                            keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in message["parameters"].items()])
            code = "```python\n" + ast.unparse(call) + "\n```"
            add(tokenizer.build_single_message("assistant", message["name"], code), loss)
            observation = message["observation"]
            if not isinstance(observation, str):
                observation = json.dumps(observation, ensure_ascii=False)
            add(tokenizer.build_single_message("observation", "", observation), False)
        else:
            add(tokenizer.build_single_message(message["role"], "", message["content"]), loss)
    add([tokenizer.eos_token_id], False)
    return {"input_ids": ids, "labels": _shifted_labels(ids, mask)}


def glm4_message_text(message: dict[str, Any]) -> str:
    """One message as the glm-4-9b-chat template writes it (function tools only)."""
    text = ""
    if "tools" in message:
        text += "<|system|>\n" + GLM4_TOOLS_HEAD
        for tool in message["tools"]:
            function = tool["function"]
            text += f"\n\n## {function['name']}\n\n" + json.dumps(function, ensure_ascii=False, indent=4) + GLM4_TOOL_TAIL
    if message.get("content"):
        text += f"<|{message['role']}|>{message.get('metadata', '')}\n{message['content']}"
    return text


def glm4_official_example(tokenizer, messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    ids = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    mask = [False, False]
    for message in messages:
        tokens = tokenizer(glm4_message_text(message), add_special_tokens=False)["input_ids"]
        ids += tokens
        mask += [message["role"] not in ("system", "user", "observation")] * len(tokens)
    ids.append(tokenizer.convert_tokens_to_ids("<|user|>"))
    mask.append(False)
    return {"input_ids": ids, "labels": _shifted_labels(ids, mask)}
