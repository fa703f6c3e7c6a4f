"""ChatGLM-6B (v1) written for current transformers: reads top to bottom like the model.

What makes this model unusual (all as the official THUDM code computes it; tests compare against its
outputs in fixtures/golden/chatglm):
- The prompt ends with `[gMASK] <sop>`. Everything before `<sop>` is context and attends both ways;
  `<sop>` and the answer after it attend causally.
- 2D rotary positions: the first half of each head is rotated by the token's position (every answer
  token sits at the position of the mask token), the second half by its block position (0 in the
  context, 1, 2, ... from `<sop>` on).
- Post-LayerNorm "DeepNorm" residuals: the normalised input, scaled by sqrt(2 * num_layers), is the
  residual; masked attention scores are set to -10000, not -inf.
- P-Tuning v2: a trained key/value prefix in front of every layer's keys and values. The prefix is not
  rotated, every query sees it, and positions do not move. It is recomputed at each forward (cheap), so
  the KV cache only ever holds real tokens.

Tensors are batch-first; the KV cache is a transformers `Cache` holding [batch, heads, seq, head_dim].
Masks inside this file, as everywhere in glmtune, are bool with True where a query may attend (SDPA's and
transformers' convention). The model takes its mask as
- nothing: derived from the ids, as the official model does;
- `attention_mask` 2D: a padding mask (1 = token, 0 = padding), what glmtune's collators give;
- `attention_mask` 4D bool: the official tokenizer's mask, True = blocked. That is what the official
  tokenizer returns and official callers pass, so it is accepted as it is and inverted once on the way in;
- `attend_mask` 4D bool, True = may attend: what glmtune's own packing and generation pass.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple

from glmtune.models.chatglm.configuration import ChatGLMConfig
from glmtune.models.native import layer_prefixes, next_token_loss
from glmtune.models.prefix import PrefixEncoder
from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES, empty_quantized_modules

MASKED_SCORE = -10000.0  # the official fill value for blocked attention scores
PREFIX_DROPOUT = 0.1  # the official dropout on the P-Tuning prefix while training
OFFICIAL_BLOCK_LAYERS = 28  # what the residual scale is computed from, see GLMBlock

CosSin = tuple[torch.Tensor, torch.Tensor]  # rotary cos and sin [batch, seq, 1, dim]
# 2D positions: (position tables, block position tables); 1D positions: one pair
Rotary = CosSin | tuple[CosSin, CosSin]
KeyValue = tuple[torch.Tensor, torch.Tensor]  # one layer's P-Tuning prefix [batch, heads, pre_seq_len, head_dim]


# ---------------------------------------------------------------- positions and masks

def token_layout(input_ids: torch.Tensor, config: ChatGLMConfig, padding_mask: torch.Tensor | None = None,
                 prefer_mask: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [batch, 2, seq] ([batch, seq] for 1D positions), allowed [batch, 1, seq, seq], True
    where a query may attend).

    Without a padding mask every token counts, as in the official model's own fallback, which looks for
    `[gMASK]` first. With one, padding tokens get position 0 and are blocked both ways, and `[MASK]` is
    looked for first: what the official tokenizer builds (its mask is the inverse of `allowed`), and so
    what official generation sees.
    `prefer_mask` overrides which mask token is looked for first.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    order = (real.long().cumsum(-1) - 1).clamp(min=0) * real  # position among the real tokens
    sop = (input_ids == config.bos_token_id) & real
    if not bool(sop.any(-1).all()):
        raise ValueError(f"every ChatGLM-6B input needs the <sop> token (id {config.bos_token_id}) that starts "
                         "the answer; build prompts as text + [gMASK] + <sop>")
    if prefer_mask is None:
        prefer_mask = padding_mask is not None
    mask_first, mask_second = config.mask_token_id, config.gmask_token_id
    if not prefer_mask:
        mask_first, mask_second = mask_second, mask_first
    first = (input_ids == mask_first) & real
    second = (input_ids == mask_second) & real
    if not bool((first | second).any(-1).all()):
        raise ValueError(f"every ChatGLM-6B input needs a [gMASK] (id {config.gmask_token_id}) or [MASK] "
                         f"(id {config.mask_token_id}) token before <sop>")
    mask_at = torch.where(first.any(-1), first.int().argmax(-1), second.int().argmax(-1))
    context = sop.int().argmax(-1)  # index of <sop>; the context is everything before it

    index = torch.arange(length, device=device)
    answer = index[None, :] >= context[:, None]
    if config.position_encoding_2d:
        positions = torch.where(answer, order.gather(1, mask_at[:, None]), order)
        blocks = torch.where(answer, index[None, :] - context[:, None] + 1, 0)
        position_ids = torch.stack([positions * real, blocks * real], dim=1)
    else:  # 1D positions: only a [MASK] infill pins the answer to the mask's position
        pinned = answer & (input_ids.gather(1, mask_at[:, None]) == config.mask_token_id)
        position_ids = torch.where(pinned, order.gather(1, mask_at[:, None]), order) * real

    causal = index[None, :, None] >= index[None, None, :]  # [1, query, key]
    in_context = index[None, None, :] < context[:, None, None]  # [batch, 1, key]
    allowed = (causal | in_context) & real[:, None, :] & real[:, :, None]
    return position_ids, allowed[:, None]


def packed_layout(config: ChatGLMConfig):
    """For glmtune.data.collate.PackCollator: each packed sample gets its own ChatGLM-6B layout (2D
    positions, bidirectional context) and sees no other sample. The padding after a row's last sample
    attends causally among itself only; its outputs are never used."""

    def layout(input_ids: torch.Tensor, lengths: list[list[int]]) -> dict[str, torch.Tensor]:
        batch, length = input_ids.shape
        shape = (batch, 2, length) if config.position_encoding_2d else (batch, length)
        positions = torch.zeros(shape, dtype=torch.long)
        allowed = torch.zeros(batch, 1, length, length, dtype=torch.bool)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                ids = input_ids[row:row + 1, start:start + n]
                sample_positions, sample_allowed = token_layout(ids, config, torch.ones_like(ids))
                positions[row, ..., start:start + n] = sample_positions[0]
                allowed[row, :, start:start + n, start:start + n] = sample_allowed[0]
                start += n
            allowed[row, 0, start:, start:] = torch.ones(length - start, length - start, dtype=torch.bool).tril()
        return {"position_ids": positions, "attend_mask": allowed}

    return layout


# ---------------------------------------------------------------- building blocks

def rotary_tables(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [batch, seq, 1, dim] for integer positions [batch, seq].

    The official code stores the inverse frequencies in fp16; they are rounded the same way here so the
    angles are identical, then everything is computed in fp32.
    """
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)).half().float()
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out with the official arithmetic: the query is also scaled down by (layer + 1) and
    the scores back up in fp32, which keeps fp16 scores in range; blocked scores become -10000.
    `attention_mask` is bool (True = may attend) or additive."""
    coeff = float(module.layer_idx + 1)
    scores = torch.matmul(query * (scaling / coeff), key.transpose(-1, -2))
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, MASKED_SCORE)
    elif attention_mask is not None:
        scores = scores + attention_mask / coeff
    probs = F.dropout(F.softmax(scores.float() * coeff, dim=-1), dropout, module.training).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_function(config: ChatGLMConfig, output_attentions: bool = False):
    """The attention the layers call: written out for eager (and whenever the probabilities are asked for),
    else the function transformers registers under `config._attn_implementation` (sdpa by default, or any
    function registered with transformers.AttentionInterface)."""
    if output_attentions:
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask with the official fill: 0 where a query may attend, -10000 where
    not (the official SDPA path's; a fully blocked padding row then gives numbers, not NaN)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, MASKED_SCORE)


class SelfAttention(nn.Module):
    """Query, key and value projection and 2D rotary embedding; the attention itself is attention_function's."""

    is_causal = False  # what transformers' attention functions read: ChatGLM-6B's context attends both ways

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        inner = self.num_heads * self.head_dim
        # Per head the output holds [query | key | value] side by side (the official strided layout).
        self.query_key_value = nn.Linear(config.hidden_size, 3 * inner)
        self.dense = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden: torch.Tensor, rotary: Rotary, mask: torch.Tensor, prefix: KeyValue | None = None,
                past_key_values: Cache | None = None, output_attentions: bool = False, **kwargs
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.split(self.head_dim, dim=-1)  # [batch, seq, heads, head_dim]
        if self.config.position_encoding_2d:
            (cos_p, sin_p), (cos_b, sin_b) = rotary
            q1, q2 = query.chunk(2, dim=-1)
            k1, k2 = key.chunk(2, dim=-1)
            query = torch.cat((rotate(q1, cos_p, sin_p), rotate(q2, cos_b, sin_b)), dim=-1)
            key = torch.cat((rotate(k1, cos_p, sin_p), rotate(k2, cos_b, sin_b)), dim=-1)
        else:
            cos, sin = rotary
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [batch, heads, seq, head_dim]

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if prefix is not None:
            key = torch.cat((prefix[0], key), dim=2)
            value = torch.cat((prefix[1], value), dim=2)

        attention = attention_function(self.config, output_attentions)
        context, probs = attention(self, query, key, value, mask, scaling=self.scaling, **kwargs)
        context = context.reshape(batch, length, self.num_heads * self.head_dim)
        return self.dense(context), probs if output_attentions else None


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    """One layer; with gradient checkpointing on, transformers recomputes its forward in the backward pass
    (the tensors that need gradients, `hidden` and `prefix`, come positionally)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        # DeepNorm residual scale. The official model never passes num_layers to its blocks, so every
        # ChatGLM-6B uses the default of 28 layers here whatever its depth: sqrt(56).
        self.alpha = math.sqrt(2 * OFFICIAL_BLOCK_LAYERS)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, rotary: Rotary, mask: torch.Tensor, prefix: KeyValue | None = None,
                past_key_values: Cache | None = None, output_attentions: bool = False, **kwargs
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.input_layernorm(hidden)
        attended, probs = self.attention(normed, rotary, mask, prefix, past_key_values, output_attentions, **kwargs)
        hidden = normed * self.alpha + attended
        normed = self.post_attention_layernorm(hidden)
        return normed * self.alpha + self.mlp(normed), probs


# ---------------------------------------------------------------- models

class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True  # attention goes through transformers' AttentionInterface
    # Official checkpoints carry the rotary inverse frequencies; they are recomputed, never loaded.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
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
        width = config.num_layers * 2 * config.hidden_size  # a key and a value of every layer
        self.prefix_encoder = PrefixEncoder(pre_seq_len, width, projection=projection, embed_width=config.hidden_size,
                                            hidden_width=hidden_size or config.hidden_size)
        self.prefix_encoder.to(self.word_embeddings.weight.device)
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)

    def disable_prefix(self) -> None:
        """Take the prefix encoder off again (a server computes a P-Tuning adapter's prefix once and keeps it in
        its cache rows instead)."""
        self.prefix_encoder = None
        self.config.pre_seq_len = None

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def prefix_key_values(self, batch: int, dtype: torch.dtype, device) -> list[KeyValue]:
        """Per layer (key, value) [batch, heads, pre_seq_len, head_dim] from the prefix encoder."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device)[None]
        flat = self.prefix_encoder(tokens).to(dtype).expand(batch, -1, -1)
        flat = self.prefix_dropout(flat)  # per sample, as the official code drops out the batch copy
        return layer_prefixes(flat, config.num_layers, config.num_attention_heads, config.head_dim)

    @can_return_tuple  # honours return_dict=False (and config.return_dict) with the output's to_tuple()
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attend_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`attention_mask`: a 2D padding mask or the official 4D bool mask (True = blocked); `attend_mask`:
        a 4D bool mask with True = may attend, used instead of a 4D `attention_mask`. Remaining keyword
        arguments go to the attention function."""
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_attentions = bool(output_attentions)
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a recomputed layer would write its keys and values to the cache twice
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0

        padding = attention_mask
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool:
                raise ValueError("a 4D attention_mask must be bool with True where attention is blocked "
                                 "(the official ChatGLM-6B convention); pass attend_mask for True = may attend")
            padding = None
            if attend_mask is None:
                attend_mask = ~attention_mask  # the official convention, inverted once here
        if attend_mask is not None and (attend_mask.dim() != 4 or attend_mask.dtype != torch.bool):
            raise ValueError("attend_mask must be 4D bool [batch, 1, query, key], True where a query may attend")
        if position_ids is None or attend_mask is None:
            if input_ids is None or past:
                raise ValueError("without input_ids, or when continuing from a cache, pass position_ids "
                                 "[batch, 2, seq] and a 4D mask (generate() does this)")
            derived_positions, derived_allowed = token_layout(input_ids, config, padding)
            position_ids = derived_positions if position_ids is None else position_ids
            attend_mask = derived_allowed if attend_mask is None else attend_mask
        allowed = attend_mask.to(inputs_embeds.device)

        prefix = None
        if self.prefix_encoder is not None:
            prefix = self.prefix_key_values(batch, inputs_embeds.dtype, inputs_embeds.device)
            # Every query sees the whole prefix.
            visible = torch.ones(batch, 1, length, config.pre_seq_len, dtype=torch.bool, device=allowed.device)
            allowed = torch.cat((visible, allowed.expand(batch, -1, -1, -1)), dim=-1)
        # Built once for all layers: eager takes the bool mask, every other attention function the official
        # additive one.
        eager = attention_function(config, output_attentions) is eager_attention_forward
        mask = allowed if eager else attention_bias(allowed, inputs_embeds.dtype)

        half = config.head_dim // 2 if config.position_encoding_2d else config.head_dim
        if config.position_encoding_2d:
            rotary = (rotary_tables(position_ids[:, 0], half, inputs_embeds.dtype),
                      rotary_tables(position_ids[:, 1], half, inputs_embeds.dtype))
        else:
            rotary = rotary_tables(position_ids, half, inputs_embeds.dtype)

        hidden = inputs_embeds
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden,)
            layer_prefix = prefix[i] if prefix is not None else None
            hidden, probs = layer(hidden, rotary, mask, layer_prefix, past_key_values=past_key_values,
                                  output_attentions=output_attentions, **kwargs)
            if output_attentions:
                all_attentions += (probs,)
        hidden = self.final_layernorm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values,
                                       hidden_states=all_hidden, attentions=all_attentions)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.quantization_bit:
            # Stored quantized (chatglm-6b-int4 / -int8): int weights and per-row scales load by name.
            empty_quantized_modules(self.transformer, config.quantization_bit, CHATGLM_QUANTIZED_NAMES)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        attend_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, attend_mask=attend_mask,
                                   return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = next_token_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # ------------------------------------------------------------ generation

    def generate(self, *args, attention_mask=None, **kwargs):
        """transformers' generate, also accepting the official tokenizer's 4D bool mask (True = blocked),
        which generate itself refuses; it travels inverted, as `attend_mask`, and grows the official way."""
        if attention_mask is not None and attention_mask.dim() == 4:
            kwargs["attend_mask"] = ~attention_mask.bool()
            attention_mask = None
        return super().generate(*args, attention_mask=attention_mask, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # transformers would count positions 0, 1, 2...; ChatGLM positions come from the token layout,
        # which prepare_inputs_for_generation derives.
        return None

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, inputs_embeds=None, use_cache=None,
                                      attend_mask=None, **kwargs):
        """Feed only the tokens the cache has not seen, with their rows of the mask and their positions.

        The layout is derived from the whole sequence so far (ids plus the 2D padding mask that generate
        extends), unless the caller passed a 4D mask and position ids, which
        `_update_model_kwargs_for_generation` extends the official way.
        """
        done = past_key_values.get_seq_length() if past_key_values is not None else 0
        allowed = attend_mask
        if position_ids is None or allowed is None:
            padding = attention_mask if allowed is None else None
            # Generation follows the official tokenizer's layout ([MASK] first), also when transformers
            # dropped an all-ones padding mask.
            derived_positions, derived_allowed = token_layout(input_ids, self.config, padding, prefer_mask=True)
            position_ids = derived_positions if position_ids is None else position_ids
            allowed = derived_allowed if allowed is None else allowed
        inputs = {
            "input_ids": input_ids[:, done:],
            "position_ids": position_ids[..., done:],
            "attend_mask": allowed[:, :, done:, :],
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if inputs_embeds is not None and done == 0:
            inputs["inputs_embeds"], inputs["input_ids"] = inputs_embeds, None
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        # Official layouts grow their own way: a new answer token keeps the mask position and takes the
        # next block position; its mask row sees everything its predecessor saw, plus itself.
        position_ids = model_kwargs.pop("position_ids", None)
        mask = model_kwargs.pop("attend_mask", None)
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        for _ in range(num_new_tokens):
            if position_ids is not None:
                step = position_ids[..., -1:].clone()
                if step.dim() == 3:
                    step[:, 1] += 1
                else:  # 1D positions
                    step += 1
                position_ids = torch.cat((position_ids, step), dim=-1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_zeros(*mask.shape[:3], 1)), dim=3)
                row = mask[:, :, -1:].clone()
                row[..., -1] = True
                mask = torch.cat((mask, row), dim=2)
        if position_ids is not None:
            model_kwargs["position_ids"] = position_ids
        if mask is not None:
            model_kwargs["attend_mask"] = mask
        return model_kwargs

    # ------------------------------------------------------------ the official convenience API

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: list[tuple[str, str]] | None = None, *, max_length: int = 2048,
             do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, **generate_kwargs):
        """Answer `query` after `history` ([(question, answer), ...]) in the official `[Round i]` format, with
        the official sampling defaults; returns (answer, history + [(query, answer)])."""
        from glmtune.models.chatglm.tokenization import build_chat_prompt

        history = list(history or [])
        inputs = tokenizer([build_chat_prompt(query, history)], return_tensors="pt").to(self.device)
        output = self.generate(**inputs, max_length=max_length, do_sample=do_sample, top_p=top_p,
                               temperature=temperature, **generate_kwargs)
        answer = tidy_response(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:].tolist()))
        return answer, history + [(query, answer)]


def tidy_response(text: str) -> str:
    """What the official chat() does to an answer: strip it, fill in the training-date placeholder, and use
    full-width punctuation next to Chinese characters."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, wide_mark in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")):
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([\u4e00-\u9fff]){mark}", rf"\1{wide_mark}", text)
        text = re.sub(rf"{mark}([\u4e00-\u9fff])", rf"{wide_mark}\1", text)
    return text
