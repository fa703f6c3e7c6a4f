"""ChatGLM2-6B / ChatGLM3-6B written for current transformers: reads top to bottom like the model.

The architecture (as the official THUDM code computes it; tests compare against its outputs in
fixtures/golden/chatglm2 and chatglm3):
- Pre-norm blocks with RMSNorm (LayerNorm when `rmsnorm` is off), SwiGLU MLP, untied output layer.
- Multi-query attention: `multi_query_group_num` key/value groups shared by the query heads (query head h
  uses group h // (heads / groups)); with it off, every head has its own keys and values.
- Rotary embedding on the first half of each head only, rotating interleaved pairs (x0, x1), (x2, x3)...
- Plain causal attention. Prompts start with `[gMASK] sop`; positions count real tokens from 0.
- P-Tuning v2: a trained key/value prefix (per layer, one per key/value group) in front of the keys and
  values, not rotated, visible to every token, positions unchanged. It is recomputed at each forward, so
  the KV cache only ever holds real tokens.

Tensors are batch-first; the KV cache is a transformers `Cache` holding [batch, groups, seq, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple

from glmtune.models.chatglm2.configuration import ChatGLM2Config
from glmtune.models.native import layer_prefixes, next_token_loss
from glmtune.models.prefix import PrefixEncoder
from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES, empty_quantized_modules

PREFIX_DROPOUT = 0.1  # the official dropout on the P-Tuning prefix while training

KeyValue = tuple[torch.Tensor, torch.Tensor]  # one layer's P-Tuning prefix [batch, groups, pre_seq_len, head_dim]


def attend_mask(padding_mask: torch.Tensor | None, batch: int, length: int, past: int, prefix: int,
                device, segments: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, 1, length, prefix + past + length] bool, True where a query may attend (SDPA's and
    transformers' convention).

    Causal over the cache and the new tokens, padding columns blocked, the prefix always visible. With
    neither cache nor prefix, padding rows are left fully open, as the official code does (their outputs
    are never used, and a fully blocked row would be NaN). `segments` [batch, length] (packed samples,
    see packed_segments) also blocks attention between different samples.
    """
    total = past + length
    query_at = torch.arange(past, total, device=device)[:, None]
    allowed = (torch.arange(total, device=device)[None, :] <= query_at)[None].expand(batch, -1, -1)
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    if padding_mask is not None:
        real = padding_mask[:, -total:].bool()
        allowed = allowed & real[:, None, :]
        if not past and not prefix:
            allowed = allowed | ~real[:, :, None]
    if prefix:
        allowed = torch.cat((torch.ones(batch, length, prefix, dtype=torch.bool, device=device), allowed), dim=-1)
    return allowed[:, None]


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Which packed sample each token belongs to ([batch, seq]): a new one starts wherever the position
    does not go up by one (the convention of transformers' models); None when every row is one sample."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    segments = (step != 1).cumsum(-1)
    return segments if bool((segments[:, -1] > 0).any()) else None


def positions_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens count from 0; padding gets 0 (what the official tokenizer's padding returns)."""
    real = padding_mask.long()
    return ((real.cumsum(-1) - 1) * real).clamp(min=0)


def rotary_table(config: ChatGLM2Config, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cos and sin [batch, seq, 1, rotated_dim / 2, 2] for integer positions [batch, seq]."""
    rotated = config.kv_channels // 2  # only the first half of each head turns
    base = 10000.0
    positions = positions.float()
    if config.rope_ratio != 1:
        if config.rope_interpolates_positions:
            positions = positions / config.rope_ratio
        else:
            base = base * config.rope_ratio
    theta = 1.0 / base ** (torch.arange(0, rotated, 2, device=positions.device, dtype=torch.float) / rotated)
    angles = positions[..., None] * theta
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[:, :, None].to(dtype)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, head_dim]: rotate the first half as interleaved pairs, keep the rest."""
    rotated = table.shape[-2] * 2
    pairs = x[..., :rotated].unflatten(-1, (-1, 2))
    cos, sin = table[..., 0], table[..., 1]
    turned = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin,
                          pairs[..., 1] * cos + pairs[..., 0] * sin), dim=-1).flatten(-2)
    return torch.cat((turned, x[..., rotated:]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (hidden * torch.rsqrt(variance + self.eps))).to(hidden.dtype)


def norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, as the official code computes it: scores and softmax in fp32. Grouped keys
    and values are repeated to every query head; `attention_mask` is bool, True = may attend."""
    share = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(share, dim=1), value.repeat_interleave(share, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = F.dropout(F.softmax(scores, dim=-1), dropout, module.training).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    """Query, key and value projection and rotary embedding; the attention itself is the function
    transformers registers for `config._attn_implementation` (sdpa by default, eager above, or any function
    registered with transformers.AttentionInterface), called with a bool mask, True = may attend."""

    is_causal = True  # what transformers' attention functions read; the mask passed is always explicit

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.kv_groups, config.kv_channels
        # transformers' sdpa repeats grouped keys and values to every head when a mask is passed (on CUDA the
        # fused kernels that take grouped keys take no mask, and the math kernel would keep every layer's fp32
        # probabilities for the backward pass), and shares them when decoding one token
        self.num_key_value_groups = self.heads // self.groups
        self.scaling = self.head_dim ** -0.5
        width = self.heads * self.head_dim + 2 * self.groups * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden: torch.Tensor, rotary: torch.Tensor, allowed: torch.Tensor, prefix: KeyValue | None = None,
                past_key_values: Cache | None = None, **kwargs) -> torch.Tensor:
        batch, length, _ = hidden.shape
        qkv = self.query_key_value(hidden)
        if self.config.multi_query_attention:  # [all queries | group keys | group values]
            query, key, value = qkv.split([self.heads * self.head_dim, self.groups * self.head_dim,
                                           self.groups * self.head_dim], dim=-1)
            query = query.view(batch, length, self.heads, self.head_dim)
            key = key.view(batch, length, self.groups, self.head_dim)
            value = value.view(batch, length, self.groups, self.head_dim)
        else:  # per head [query | key | value] side by side
            query, key, value = qkv.view(batch, length, self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        query, key = rotate(query, rotary), rotate(key, rotary)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [batch, heads, seq, head_dim]

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if prefix is not None:
            key = torch.cat((prefix[0], key), dim=2)
            value = torch.cat((prefix[1], value), dim=2)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        context, _ = attention(self, query, key, value, allowed, scaling=self.scaling, dropout=dropout, **kwargs)
        return self.dense(context.reshape(batch, length, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden).chunk(2, dim=-1)  # SwiGLU
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(GradientCheckpointingLayer):
    """One layer; with gradient checkpointing on, transformers recomputes its forward in the backward pass
    (the tensors that need gradients, `hidden` and `prefix`, come positionally)."""

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.input_layernorm = norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = norm(config)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, rotary: torch.Tensor, allowed: torch.Tensor, prefix: KeyValue | None = None,
                past_key_values: Cache | None = None, **kwargs) -> torch.Tensor:
        post_norm_residual = self.config.apply_residual_connection_post_layernorm
        dropout = self.config.hidden_dropout
        normed = self.input_layernorm(hidden)
        attended = self.self_attention(normed, rotary, allowed, prefix, past_key_values, **kwargs)
        hidden = (normed if post_norm_residual else hidden) + F.dropout(attended, dropout, self.training)
        normed = self.post_attention_layernorm(hidden)
        return (normed if post_norm_residual else hidden) + F.dropout(self.mlp(normed), dropout, self.training)


class Embedding(nn.Module):
    """Exists only so the weights keep the official checkpoint name `transformer.embedding.word_embeddings`."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class GLMTransformer(nn.Module):
    """Exists only so the weights keep the official checkpoint names `transformer.encoder.layers.*` and
    `transformer.encoder.final_layernorm`; ChatGLM2Model.forward runs the layers."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = norm(config) if config.post_layer_norm else None


# ---------------------------------------------------------------- models

class ChatGLM2PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM2Config
    config: ChatGLM2Config
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True  # attention goes through transformers' AttentionInterface
    # Official checkpoints carry the rotary inverse frequencies; they are recomputed, never loaded.
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]


class ChatGLM2Model(ChatGLM2PreTrainedModel):
    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        # the LM head, inside the base model as in the official checkpoints (`transformer.output_layer`)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.prefix_encoder = None
        if config.pre_seq_len:
            self.enable_prefix(config.pre_seq_len, projection=config.prefix_projection,
                               hidden_size=config.prefix_hidden_size)
        self.post_init()

    def enable_prefix(self, pre_seq_len: int, *, projection: bool = False, hidden_size: int | None = None) -> None:
        """Add a freshly initialised P-Tuning v2 prefix encoder (in fp32, so it can train under mixed
        precision) and record its shape in the config."""
        config = self.config
        config.pre_seq_len, config.prefix_projection, config.prefix_hidden_size = pre_seq_len, projection, hidden_size
        width = config.num_layers * 2 * config.kv_groups * config.kv_channels  # a key and a value per layer
        self.prefix_encoder = PrefixEncoder(pre_seq_len, width, projection=projection, embed_width=width,
                                            hidden_width=hidden_size or config.hidden_size)
        self.prefix_encoder.to(self.embedding.word_embeddings.weight.device)
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)

    def disable_prefix(self) -> None:
        """Take the prefix encoder off again (a server computes a P-Tuning adapter's prefix once and keeps it in
        its cache rows instead)."""
        self.prefix_encoder = None
        self.config.pre_seq_len = None

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def prefix_key_values(self, batch: int, dtype: torch.dtype, device) -> list[KeyValue]:
        """Per layer (key, value) [batch, groups, pre_seq_len, head_dim] from the prefix encoder."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device)[None]
        flat = self.prefix_dropout(self.prefix_encoder(tokens).to(dtype).expand(batch, -1, -1))
        return layer_prefixes(flat, config.num_layers, config.kv_groups, config.kv_channels)

    @can_return_tuple  # honours return_dict=False (and config.return_dict) with the output's to_tuple()
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a recomputed layer would write its keys and values to the cache twice
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ChatGLM2/3 take a 2D attention_mask (1 = token, 0 = padding)")

        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_padding(attention_mask)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None].expand(batch, -1)
        # Packed samples (glmtune.data.packing) come as restarting positions with no mask, as for
        # transformers' models; with a cache the positions are the generation's own.
        segments = packed_segments(position_ids) if attention_mask is None and not past else None
        prefix = None
        if self.prefix_encoder is not None:
            prefix = self.prefix_key_values(batch, inputs_embeds.dtype, inputs_embeds.device)
        allowed = attend_mask(attention_mask, batch, length, past, config.pre_seq_len if prefix else 0,
                              inputs_embeds.device, segments)
        rotary = rotary_table(config, position_ids, inputs_embeds.dtype)

        hidden = inputs_embeds
        all_hidden = () if output_hidden_states else None
        for i, layer in enumerate(self.encoder.layers):
            if output_hidden_states:
                all_hidden += (hidden,)
            layer_prefix = prefix[i] if prefix is not None else None
            hidden = layer(hidden, rotary, allowed, layer_prefix, past_key_values=past_key_values, **kwargs)
        if output_hidden_states:
            all_hidden += (hidden,)  # the official last hidden state comes before the final norm
        if self.encoder.final_layernorm is not None:
            hidden = self.encoder.final_layernorm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values,
                                       hidden_states=all_hidden)


class ChatGLM2ForConditionalGeneration(ChatGLM2PreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        if config.quantization_bit:
            # Stored quantized (chatglm2-6b-int4): int weights and per-row scales load by name.
            empty_quantized_modules(self.transformer.encoder, config.quantization_bit, CHATGLM_QUANTIZED_NAMES)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def get_decoder(self):
        return self.transformer

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, output_hidden_states=output_hidden_states,
                                   return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.transformer.output_layer(hidden)
        loss = next_token_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, inputs_embeds=None, use_cache=None, **kwargs):
        """Feed only the tokens the cache has not seen, with their positions; the 2D mask stays whole."""
        done = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_padding(attention_mask)
        inputs = {
            "input_ids": input_ids[:, done:],
            "attention_mask": attention_mask,
            "position_ids": position_ids[..., done:] if position_ids is not None else None,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if inputs_embeds is not None and done == 0:
            inputs["inputs_embeds"], inputs["input_ids"] = inputs_embeds, None
        return inputs
