"""Configuration of ChatGLM-6B (v1), read from an official checkpoint's config.json as it is.

Field names and defaults are the official ones (the 6B model), so a THUDM/chatglm-6b config.json loads
without its remote code. `num_hidden_layers` and `max_position_embeddings` are aliases that generic
transformers and peft code look for.
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig


class ChatGLMConfig(PreTrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length"}
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 130004  # <sop>: the answer starts after it
    eos_token_id: int | list[int] | None = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]: infill a span
    gmask_token_id: int = 130001  # [gMASK]: generate after the text
    pad_token_id: int | None = 3
    tie_word_embeddings: bool = True  # the official class never unties lm_head from the embeddings
    # P-Tuning v2: a trained prefix of `pre_seq_len` key/value pairs in front of every layer
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # width of the projection MLP; None = hidden_size (official)
    # Weight-only quantization of the transformer's linear layers (0 = off, 8 or 4)
    quantization_bit: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
