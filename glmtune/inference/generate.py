"""Generation with one loaded (possibly adapted) model: prompts built as training built them, and batched answers
with left padding through transformers' generate. Used by evaluate (predict, eval, compare, the demo,
evaluation during training) and export's check; serve (chat, the API, the web UI) builds its prompts here and
decodes them with continuous batching (glmtune.inference.batching).

Prompts are built by the same Encoder as training data, so the model sees the exact prompt tokens it
was trained on. Generation stops at any stop token of the model (tokenizer eos and the generation
config's eos ids, e.g. a chat template's end-of-turn token).
"""

from __future__ import annotations

import torch

from glmtune.config import GenerationOptions
from glmtune.data.collate import PadCollator
from glmtune.data.formats import Message, Sample
from glmtune.data.messages import tool_name
from glmtune.data.preprocess import Encoder, LengthLimits
from glmtune.data.templates import Part, Segment, get_template
from glmtune.data.tool_format import TOOL_STYLES, parse_tool_call
from glmtune.errors import GlmtuneError
from glmtune.models.loader import LoadedModel, context_length


def generation_config(options: GenerationOptions, pad_id: int, stop_ids: set[int]):
    """transformers' GenerationConfig for `options` (its seed is the caller's: seeding is global in torch)."""
    from transformers import GenerationConfig

    sampled = options.temperature > 0
    return GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        do_sample=sampled,
        temperature=options.temperature if sampled else None,
        top_p=options.top_p if sampled else None,
        top_k=None,
        repetition_penalty=options.repetition_penalty,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
    )


class Generator:
    """Answers conversations with one loaded (possibly adapted) model."""

    def __init__(self, loaded: LoadedModel, template: str = "auto", limits: LengthLimits | None = None):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.encoder = Encoder(loaded.tokenizer, get_template(template, loaded.tokenizer, loaded.family),
                               loaded.stop_ids)
        self.limits = limits
        self.collate = PadCollator(loaded.tokenizer.pad_token_id, side="left")
        self.prompts_cut = 0

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @property
    def stop_ids(self) -> set[int]:
        """The tokens that end an answer."""
        return self.encoder.stop_ids

    @property
    def context_length(self) -> int | None:
        """Prompt and answer together, in tokens; None where the model's config does not say."""
        return context_length(self.loaded.model.config)

    @property
    def quantization_bit(self) -> int | None:
        return self.loaded.quantization_bit

    @property
    def template_name(self) -> str:
        """The prompt format in use: chatglm, chatglm2, chatglm3, glm4, chat or plain (glmtune.data.templates)."""
        return self.encoder.template.name

    @property
    def family(self) -> str:
        return self.loaded.family

    def prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """The prompt tokens of a conversation that ends with a user message or a tool result (not cut by
        `limits`); `tools`: the functions the model may call, written into the prompt as in training."""
        return self.encoder.prompt_ids(messages, tools=tools)[0]

    def answer_start_ids(self, text: str) -> list[int]:
        """Tokens that put `text` after a prompt as the start of the answer (e.g. a tool's name line, to make the
        model call that tool), tokenized as training tokenizes an answer's first line; plain text, like messages."""
        return self.encoder.encode_segment(Segment([Part(text, True, separate=True)]), split=False, plain=True).ids()

    def inputs(self, conversations: list[list[Message]],
               tools: list[list[dict] | None] | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs for a batch of conversations: prompts cut by `limits`, left-padded, on its device.
        `tools`: each conversation's tool list (or None), as Sample.tools."""
        features = []
        for i, messages in enumerate(conversations):
            ids, cut = self.encoder.prompt_ids(messages, self.limits, tools=tools[i] if tools else None)
            self.prompts_cut += cut
            features.append({"input_ids": ids})
        return {k: v.to(self.device) for k, v in self.collate(features).items()}

    def check_prompts(self, samples: list[Sample]) -> None:
        """Refuse, naming its row, a prompt that leaves the model no room for an answer (counted after
        `limits` cut it), so that a file is refused whole before anything is written rather than answered
        half-way or past the context."""
        limit = self.context_length
        if limit is None:
            return
        for index, sample in enumerate(samples):
            ids, _ = self.encoder.prompt_ids(sample.prompt_messages, self.limits, tools=sample.tools)
            if len(ids) >= limit:
                where = sample.where or f"row {index + 1}"
                raise GlmtuneError(f"{where}: the prompt is {len(ids)} tokens, but the model's context is {limit} "
                                   f"tokens (prompt and answer together); shorten it, or cut long prompts with "
                                   f"--max-source-length (below {limit})")

    @torch.inference_mode()
    def _new_tokens(self, conversations: list[list[Message]], options: GenerationOptions | None,
                    tools: list[list[dict] | None] | None = None) -> torch.Tensor:
        options = options or GenerationOptions()
        inputs = self.inputs(conversations, tools)
        config = generation_config(options, self.tokenizer.pad_token_id, self.stop_ids)
        output = self.loaded.model.generate(**inputs, generation_config=config)
        return output[:, inputs["input_ids"].shape[1]:]

    def generate(self, conversations: list[list[Message]], options: GenerationOptions | None = None,
                 tools: list[list[dict] | None] | None = None) -> list[str]:
        """One batch: the answer to each conversation (which ends with a user message or a tool result); `tools`:
        each conversation's tool list (Sample.tools)."""
        rows = self._new_tokens(conversations, options, tools)
        return [self._answer_text(row, tools[i] if tools else None) for i, row in enumerate(rows)]

    def _answer_text(self, row, tools: list[dict] | None) -> str:
        """An answer as text; with tools, a call in ChatGLM3's or GLM-4's form is written as the JSON
        {"name", "arguments"} that a reference answer with that call reads as (Message.reference_text)."""
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        if tools and self.template_name in TOOL_STYLES:
            call = parse_tool_call(text, self.template_name, {tool_name(t) for t in tools})
            if call is not None:
                return call.as_json()
        return text.strip()

    def generate_ids(self, conversations: list[list[Message]],
                     options: GenerationOptions | None = None) -> list[list[int]]:
        """One batch, as token ids: each answer's new tokens up to and including the stop token that ended it
        (the padding after it left out). Stricter than the text, which hides special and unknown tokens."""
        stops = self.stop_ids
        answers = []
        for row in self._new_tokens(conversations, options).tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            answers.append(row[:end])
        return answers
