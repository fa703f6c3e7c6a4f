"""Configuration of ChatGLM2-6B and ChatGLM3-6B (one architecture), read from an official config.json as is.

Field names and defaults are the official ones. `vocab_size` follows `padded_vocab_size`, as in the
official class; `num_hidden_layers` and `max_position_embeddings` are aliases generic code looks for.
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig


class ChatGLM2Config(PreTrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "seq_length"}
    keys_to_ignore_at_inference = ["past_key_values"]

    num_layers: int = 28
    padded_vocab_size: int = 65024
    vocab_size: int | None = None  # always padded_vocab_size
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128  # head dimension
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    multi_query_attention: bool = False
    multi_query_group_num: int = 1  # key/value groups when multi_query_attention
    apply_query_key_layer_scaling: bool = True  # no effect on the numbers (the official torch 2 path ignores it)
    attention_softmax_in_fp32: bool = True
    original_rope: bool = True
    # Longer contexts (the -32k checkpoints): ChatGLM2 divides positions by rope_ratio, ChatGLM3 multiplies
    # the rotary base by it. Which one is a property of the family, so the loader sets it.
    rope_ratio: float = 1.0
    rope_interpolates_positions: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # P-Tuning v2: `pre_seq_len` trained key/value pairs in front of every layer
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # width of the projection MLP; None = hidden_size (official)
    # Weight-only quantization of the encoder's linear layers (0 = off, 8 or 4)
    quantization_bit: int = 0

    def __post_init__(self, **kwargs):
        self.vocab_size = self.padded_vocab_size
        super().__post_init__(**kwargs)

    @property
    def kv_groups(self) -> int:
        """Key/value heads: the multi-query groups, or one per query head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads
