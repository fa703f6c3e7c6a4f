"""Peak device memory of one training step, predicted from the model's shapes (no weights, no device needed).

The estimate has five parts, each counted from what glmtune's training path keeps alive during a step.
The peak is weights + trainable + activations + the larger of logits and workspace: every activation the
forward pass saved is still held when the loss is computed and when the backward pass starts, but the
loss's logits are freed before the backward pass's workspace is needed. B is the batch size, S its padded
length, P the P-Tuning prefix length (0 otherwise), T = B*S the positions, b the bytes of an element in
the compute dtype (2 for bf16/fp16, 4 for fp32), h the hidden width, I the MLP's inner width, V the
vocabulary.

- weights: every frozen parameter and buffer as training holds it: b bytes an element, whatever dtype a
  meta model happens to be in; ChatGLM's own int8/int4 layers (glmtune.models.quantization) 1 or 1/2 byte
  a weight plus an fp16 scale per output row; bitsandbytes 4-bit 1/2 byte a weight plus its block scales
  (one fp32 absmax per 64 weights, or one byte with double quantization), 8-bit 1 byte plus an fp32 scale
  per row. A model that is already quantized is counted from its real tensors.
- trainable: the trained tensors (LoRA's A and B, the prefix encoder) are fp32 (peft keeps adapters in
  fp32 over a half-precision base; glmtune builds prefix encoders in fp32): 4 bytes, its gradient 4 bytes,
  and the optimizer's state: AdamW 8 bytes (two fp32 moments), the 8-bit AdamWs 2, Adafactor the factored
  row and column statistics of a matrix (4 bytes an element otherwise), SGD without momentum nothing.
- activations: what autograd saves for the backward pass, per layer and per position (a frozen linear
  layer saves nothing: its input gradient needs only its weight):
    norms (two per layer, GLM-4 four): their input (in fp32 for transformers' RMSNorm, which upcasts
      first; else b) and an fp32 statistic;
    attention: query and output (heads * head_dim each), keys and values over S + P positions (the key/value
      heads, or all heads where transformers repeats them for a masked call), an fp32 log-sum-exp per
      head; where a mask is passed (padding, a prefix, ChatGLM's own masks), the kernel saves it as
      B * S * (S + P) elements of b. Flash and memory-efficient attention (CUDA) and PyTorch's CPU kernel
      keep no S x S matrix. ChatGLM's models always pass a mask, so transformers repeats ChatGLM2/3's
      grouped keys and values to every head (on CUDA the fused kernels that take grouped keys take no mask);
      eager attention (a model loaded with attn_implementation eager) keeps the probabilities in fp32 and
      in the compute dtype;
    MLP: gated (SwiGLU): the gate/up projection's output (2I) and the activation's output (I); GELU: its
      input (I);
    LoRA: every adapted layer saves its input (in_features) and its rank-r intermediate;
    P-Tuning: the prefix keys/values fed to every layer (ChatGLM's per sample after the prefix dropout;
      other families' once, in fp32);
  plus the final norm's input. With gradient checkpointing (non-reentrant, per decoder layer) only each
  recomputed layer's input (T * h * b) is kept, and one layer's activations are rebuilt during the backward
  pass (counted as workspace); the other layers keep theirs.
- logits: glmtune's loss projects only labelled positions to the vocabulary, a chunk of
  rows = 2**23 // V positions at a time: at most min(labelled, rows) * V elements are alive, as the
  compute-dtype product, its fp32 copy (none when b is 4) and log-sum-exp's fp32 temporary,
  plus the gathered hidden states and their gradient (labelled * h * b each). With `all_logits` (the
  model's own loss, the tutorials' recipe) logits exist at every position: in the backward pass the saved
  fp32 log-softmax, the loss's gradient and the log-softmax's gradient, 12 bytes per element of T * V.
- workspace: transients inside one operation at the peak: the gradients of the widest activation in the
  backward pass of the last layer (T * MLP width * b, or eager attention's score matrices), a quantized
  layer's weight dequantized for one matmul (out * in * b, plus the unpacked int8 copy for ChatGLM int4),
  and with gradient checkpointing the activations of the layer being recomputed.

What this does not count: the CUDA caching allocator's rounding and fragmentation (reserved memory is
higher than allocated), the CUDA context and cuBLAS/cuDNN workspaces (outside max_memory_allocated),
evaluation and generation during training, and DeepSpeed/FSDP sharding. The terms are the same on every
device for the dtype given (fp32 on CPU); tests/test_memory_estimate.py checks them against the
peak allocated bytes of real CPU training steps (glmtune.bench.measure.ProfiledMemory, the allocator's own events).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glmtune.models.kbit import Quantization

GIB = 1 << 30
LOGIT_CHUNK_ELEMENTS = 1 << 23  # as glmtune.train.loss: float32 logits per chunk
# The optimizer state, in bytes per trained element (fp32 parameters); Adafactor is handled apart.
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_apex_fused": 8,
                   "adamw_anyprecision": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2,
                   "paged_adamw_32bit": 8, "lion_32bit": 4, "lion_8bit": 1, "paged_lion_32bit": 4,
                   "paged_lion_8bit": 1, "rmsprop": 4, "adagrad": 4, "sgd": 0}
PARTS = ("weights", "trainable", "activations", "logits", "workspace")


@dataclass
class MemoryEstimate:
    parts: dict[str, int]  # bytes, by PARTS
    batch_size: int
    seq_len: int
    dtype: str
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The peak: the loss's logits come before the backward pass's workspace, never with it, so only the
        larger of the two counts."""
        held = sum(v for k, v in self.parts.items() if k not in ("logits", "workspace"))
        return held + max(self.parts.get("logits", 0), self.parts.get("workspace", 0))

    def describe(self) -> str:
        gib = {k: v / GIB for k, v in self.parts.items()}
        detail = (f"weights {gib['weights']:.1f}, trainable+grads+optimizer {gib['trainable']:.1f}, "
                  f"activations {gib['activations']:.1f}, then the larger of logits {gib['logits']:.1f} and "
                  f"backward workspace {gib['workspace']:.1f}")
        return (f"peak GPU memory (estimate): {self.total / GIB:.1f} GiB at batch {self.batch_size} x "
                f"{self.seq_len} tokens ({detail} GiB), {self.dtype}")

    def to_dict(self) -> dict:
        return {"total_bytes": self.total, "parts_bytes": dict(self.parts), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "dtype": self.dtype, "notes": list(self.notes)}


@dataclass
class ModelShape:
    """The sizes the estimate needs, read from a model's config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inner: int  # the MLP's inner width (one half of a gated projection)
    gated: bool
    vocab: int
    kind: str  # "chatglm" (ChatGLM-6B), "chatglm2" (ChatGLM2/3) or "transformers"
    upcast_norm: bool  # the norm saves its input in fp32 (transformers' RMSNorm)
    norms: int = 2  # norm layers per decoder layer (GLM-4 has four)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _kind(base) -> str:
    transformer = getattr(base, "transformer", None)
    if transformer is None or not hasattr(transformer, "enable_prefix"):
        return "transformers"
    return "chatglm" if hasattr(base.config, "inner_hidden_size") else "chatglm2"


def model_shape(model) -> ModelShape:
    base = _base(model)
    config = base.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = _kind(base)
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    layers = get("num_hidden_layers", "num_layers", "n_layer")
    head_dim = get("head_dim", "kv_channels") or hidden // heads
    if kind == "chatglm2":
        kv = config.multi_query_group_num if config.multi_query_attention else heads
    else:
        kv = get("num_key_value_heads") or heads
    inner = get("intermediate_size", "ffn_hidden_size", "inner_hidden_size", "n_inner") or 4 * hidden
    names = {type(m).__name__ for m in base.modules()}
    module_names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    gated = kind == "chatglm2" or bool(module_names & {"gate_proj", "gate_up_proj", "w1", "w3"})
    vocab = base.get_output_embeddings().weight.shape[0] if base.get_output_embeddings() is not None else \
        get("vocab_size", "padded_vocab_size")
    upcast = kind == "transformers" and any("RMSNorm" in n for n in names)
    blocks = next((m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers), None)
    norms = sum(1 for m in blocks[0].modules() if "norm" in type(m).__name__.lower()) if blocks is not None else 2
    return ModelShape(layers, hidden, heads, kv, head_dim, inner, gated, vocab, kind, upcast, norms or 2)


def _is_bnb(param) -> str | None:
    name = type(param).__name__
    return name if name in ("Params4bit", "Int8Params") else None


def _linear_names(base, shape: ModelShape, quantization: Quantization) -> set[str]:
    """Qualified names of the linear layers a requested (not yet applied) quantization converts."""
    from glmtune.models.quantization import CHATGLM_QUANTIZED_NAMES

    head = base.get_output_embeddings()
    found = set()
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or "prefix_encoder" in name:
            continue
        if "lora_" in name:
            continue
        # under LoRA the layer is `<name>.base_layer`: the name that says whether ChatGLM quantizes it is <name>'s
        if (quantization.backend == "chatglm"
                and name.removesuffix(".base_layer").rsplit(".", 1)[-1] not in CHATGLM_QUANTIZED_NAMES):
            continue
        found.add(name)
    return found


def _weights(model, shape: ModelShape, b: int, compute: int, quantization: Quantization
             ) -> tuple[int, int, list[str]]:
    """(bytes of the frozen weights at `b` bytes an element, the largest transient of a weight dequantized
    to the compute dtype (`compute` bytes), notes)."""
    from glmtune.models.quantization import QuantizedLinear

    base = _base(model)
    notes: list[str] = []
    already = any(isinstance(m, QuantizedLinear) for m in base.modules()) or \
        any(_is_bnb(p) for p in base.parameters())
    quantize = set() if already or not quantization.bits else _linear_names(base, shape, quantization)
    total = transient = 0
    seen: set[int] = set()
    for module_name, module in base.named_modules():
        params = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in params:
            if id(tensor) in seen or tensor is None:
                continue
            seen.add(id(tensor))
            if getattr(tensor, "requires_grad", False):
                continue  # counted as trainable
            count = tensor.numel()
            dequantized = getattr(module, "in_features", 0) * getattr(module, "out_features", 0) * compute
            if isinstance(module, QuantizedLinear):
                if name == "weight":
                    total += count  # int8 storage, two 4-bit values a byte
                    # int4 is unpacked to an int8 copy before it is scaled into the compute dtype
                    transient = max(transient, dequantized * (compute + (module.bits == 4)) // compute)
                else:
                    total += count * tensor.element_size()
            elif _is_bnb(tensor):
                total += count * tensor.element_size()
                state = getattr(tensor, "quant_state", None)
                if state is not None:
                    total += _quant_state_bytes(state)
                transient = max(transient, dequantized)
            elif module_name in quantize and name == "weight":
                out, inp = tensor.shape
                unpacked = quantization.bits == 4 and quantization.backend == "chatglm"
                transient = max(transient, out * inp * (compute + unpacked))
                total += _quantized_bytes(count, out, quantization)
            elif not tensor.is_floating_point():
                total += count * tensor.element_size()
            else:
                total += count * b
    if quantize:
        notes.append(f"{len(quantize)} linear layers counted quantized to {quantization.describe()}")
    return total, transient, notes


def _quant_state_bytes(state) -> int:
    total = 0
    for value in vars(state).values():
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        elif hasattr(value, "__dict__"):  # the nested state of double quantization
            total += sum(v.numel() * v.element_size() for v in vars(value).values() if torch.is_tensor(v))
    return total


def _quantized_bytes(count: int, rows: int, quantization: Quantization) -> int:
    if quantization.backend == "chatglm":
        return count * quantization.bits // 8 + rows * 2  # int values and one fp16 scale per output row
    if quantization.bits == 8:
        return count + rows * 4  # int8 values and one fp32 scale per row
    scales = count // 64 + count // (64 * 256) * 4 if quantization.double_quant else count // 64 * 4
    return count // 2 + scales


def _trainable(model, optim: str) -> tuple[int, list[str]]:
    notes = []
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        count = param.numel()
        if optim == "adafactor":
            state = (sum(param.shape[-2:]) if param.dim() >= 2 else count) * 4
        else:
            state = count * OPTIMIZER_BYTES.get(optim, 8)
        total += count * 8 + state  # fp32 parameter and gradient, then the optimizer's state
    if optim != "adafactor" and optim not in OPTIMIZER_BYTES:
        notes.append(f"optimizer {optim} counted as AdamW (two fp32 states)")
    return total, notes


def _lora_layers(model) -> list[tuple[int, int]]:
    """(in_features, rank) of every LoRA-adapted layer."""
    found = []
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and len(lora_a):
            a = next(iter(lora_a.values()))
            found.append((a.in_features, a.out_features))
    return found


def _prefix_length(model) -> int:
    from glmtune.models.prefix import PrefixEncoder

    return max((m.pre_seq_len for m in model.modules() if isinstance(m, PrefixEncoder)), default=0)


def estimate_training_memory(model, *, batch_size: int, seq_len: int, labelled: int, dtype: torch.dtype,
                             quantization: Quantization | None = None, gradient_checkpointing: bool | int = False,
                             all_logits: bool = False, pre_seq_len: int = 0, optim: str = "adamw_torch_fused",
                             masked: bool = True, family: str | None = None,
                             weights_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Predict the peak memory of one training step (see the module docstring for every term).

    `model` has the method applied (peft LoRA or a P-Tuning prefix) and may live on the meta device in any
    dtype: bytes come from `dtype` (the compute dtype training uses) and `quantization`. `seq_len` is the
    batch's padded length without the prefix; `labelled` the labelled positions in the whole batch.
    `masked`: whether the batch carries padding (a mask reaches attention); native ChatGLM models and
    P-Tuning always pass one. `family` is accepted for callers that know it; the model's own structure
    decides. `weights_dtype`: the dtype the frozen weights are loaded in where it differs from the compute
    dtype (fp32 weights under bf16 mixed precision); default `dtype`. `gradient_checkpointing`: True for every
    layer, or the number of layers that recompute their activations."""
    quantization = quantization or Quantization()
    shape = model_shape(model)
    b = torch.empty((), dtype=dtype).element_size()
    notes: list[str] = []
    weight_bytes = torch.empty((), dtype=weights_dtype or dtype).element_size()
    weights, dequantized, weight_notes = _weights(model, shape, weight_bytes, b, quantization)
    notes += weight_notes
    trainable, trainable_notes = _trainable(model, optim)
    notes += trainable_notes

    B, S = batch_size, seq_len
    P = max(pre_seq_len, _prefix_length(model))
    T = B * S
    h, d = shape.hidden, shape.head_dim
    native = shape.kind != "transformers"
    masked = masked or native or P > 0
    # attention as the kernel sees it: transformers' sdpa repeats key/value heads when a mask is passed
    # (the native ChatGLM models always pass one)
    repeated = masked
    kv = shape.heads if repeated else shape.kv_heads
    eager = getattr(_base(model).config, "_attn_implementation", None) == "eager"
    norm_bytes = 4 if shape.upcast_norm else b
    norms = shape.norms * T * (h * norm_bytes + 4)
    query_out = 2 * T * shape.heads * d * b
    if eager:  # attention written out: the softmax's fp32 output and its copy in the compute dtype are kept
        keys_values = 2 * B * shape.heads * (S + P) * d * b
        attention = query_out + keys_values + B * shape.heads * S * (S + P) * (4 + b)
        scores = 2 * B * shape.heads * S * (S + P) * 4
    else:
        keys_values = 2 * B * kv * (S + P) * d * b
        attention = query_out + keys_values + T * shape.heads * 4
        if masked:
            attention += B * S * (S + P) * b
        scores = 0
    mlp = T * shape.inner * (3 if shape.gated else 1) * b
    lora = sum(T * (inp + r) * b for inp, r in _lora_layers(model))
    per_layer = norms + attention + mlp + lora / max(shape.layers, 1)
    prefix = 0
    if P:
        width = shape.layers * 2 * shape.kv_heads * d
        prefix = B * P * width * (b + 1) if native else P * width * 4
    final_norm = T * (h * norm_bytes + 4)
    # gradient_checkpointing: True for every layer, or how many layers recompute (glmtune.train.recompute)
    recomputed = shape.layers if gradient_checkpointing is True else min(int(gradient_checkpointing or 0), shape.layers)
    # a recomputed layer keeps only its input; the layer being recomputed is backward workspace
    activations = (shape.layers - recomputed) * per_layer + recomputed * T * h * b + prefix + final_norm

    V = shape.vocab
    if all_logits:
        logits = 12 * T * V
    else:
        rows = min(labelled, max(1, LOGIT_CHUNK_ELEMENTS // V))
        per_element = (b + 4 if b != 4 else 4) + 4
        logits = rows * V * per_element + 2 * labelled * h * b
    workspace = max(T * shape.inner * (2 if shape.gated else 1) * b, scores) + dequantized
    if recomputed:
        workspace += per_layer
    parts = {"weights": weights, "trainable": trainable, "activations": int(activations), "logits": int(logits),
             "workspace": int(workspace)}
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return MemoryEstimate(parts, batch_size, seq_len, name, notes)
