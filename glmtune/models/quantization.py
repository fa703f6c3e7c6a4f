"""Weight-only int8 / int4 quantization of linear layers, stored the way ChatGLM-6B's `quantization_bit` does.

Why this format: the official `chatglm-6b-int8` / `chatglm-6b-int4` checkpoints (and ChatGLM2/3's, which use
the same scheme) store, per quantized linear, `weight` (int8), `weight_scale` (one fp16 scale per output row)
and `bias`. Keeping exactly that layout lets those checkpoints load by name. Why plain PyTorch: the official
code needs cpm_kernels (CUDA) or a C kernel compiled at run time (CPU); here dequantization is a few tensor
ops, so the same code runs on CPU and GPU.

The scheme (per output row r, with L = 2**(bits-1) - 1, i.e. 127 or 7):
    scale[r] = fp16(max_c |W[r, c]| / L)
    q[r, c]  = round(W[r, c] / scale[r])          in [-L, L]
    W'[r, c] = q[r, c] * scale[r]
For 4 bits two values share one int8 byte: column 2j in the high nibble, column 2j+1 in the low nibble, both
two's complement (the order of the official int4 kernels), so `weight` is [out, in // 2].

The base stays frozen: forward dequantizes into the input's dtype, multiplies, and drops the float copy;
backward dequantizes again instead of keeping it, so training adapters (LoRA, P-Tuning) over a quantized
model costs the int memory only.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BITS = (8, 4)
# The linear layers the official ChatGLM-6B `quantize()` replaces (attention and MLP of every block).
CHATGLM_QUANTIZED_NAMES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class QuantizedMergeError(RuntimeError):
    """Raised instead of merging a LoRA update into int weights, which would need a lossy re-quantization."""


def _max_level(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be 8 or 4, not {bits!r}")
    return 2 ** (bits - 1) - 1


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> int8 bytes, last dim halved (column 2j high nibble, 2j+1 low)."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {values.shape[-1]}")
    if values.device.type != "meta" and values.numel() and (values.min() < -8 or values.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = values.to(torch.int16) & 0x0F  # two's complement nibble; int16 so the shift cannot overflow
    return ((nibbles[..., 0::2] << 4) | nibbles[..., 1::2]).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 bytes -> int8 values in [-8, 7], last dim doubled."""
    high = packed >> 4  # arithmetic shift of a signed byte sign-extends the high nibble
    low = ((packed & 0x0F) ^ 0x08) - 0x08  # sign-extend the low nibble
    return torch.stack((high, low), dim=-1).flatten(-2)


def quantize_weight(weight: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (int8 qweight [out, in] or packed [out, in // 2], scale [out] in scale_dtype).

    The math is done in float32 and divides by the scale after rounding it to scale_dtype, so that
    dequantizing with the stored scale is within scale / 2 of the original. An all-zero row gets scale 0.
    """
    limit = _max_level(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"4-bit quantization needs an even in_features, got {weight.shape[1]}")
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / limit).to(scale_dtype)
    divisor = scale.float()
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    q = (w / divisor.unsqueeze(-1)).round_().clamp_(-limit, limit).to(torch.int8)
    del w, divisor
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(qweight, scale) as stored -> float weight [out, in] in dtype: value * scale of its row."""
    _max_level(bits)
    values = unpack_int4(qweight) if bits == 4 else qweight
    weight = values.to(dtype, copy=values is qweight)  # a fresh tensor: it is scaled in place below
    return weight.mul_(scale.to(dtype).unsqueeze(-1))


class _DequantizedMatmul(torch.autograd.Function):
    """x @ dequantize(qweight).T that saves the int weight, not a float copy, for backward."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bits):
        ctx.bits = bits
        ctx.save_for_backward(qweight, scale)
        return F.linear(x, dequantize_weight(qweight, scale, bits, x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            qweight, scale = ctx.saved_tensors
            grad_input = grad_output.matmul(dequantize_weight(qweight, scale, ctx.bits, grad_output.dtype))
        return grad_input, None, None, None


def _mark_initialized(module: nn.Module) -> None:
    # transformers' _init_weights treats every nn.Linear as float and would try normal_() on the int weight
    module._is_hf_initialized = True
    for tensor in module.parameters(recurse=False):
        tensor._is_hf_initialized = True


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is int8 (8 bits) or packed int4 (4 bits) with one scale per output row.

    Parameters, as in the official checkpoints: `weight` int8 [out, in] or [out, in // 2], `weight_scale`
    [out] (fp16 by default), `bias` [out] or None; none requires grad. A subclass of nn.Linear so that peft
    (LoRA, including target_modules="all-linear") wraps it like any linear layer; peft's own merge cannot
    handle int weights, see register_quantized_lora. The constructor makes zero weights of the right shapes,
    ready for load_state_dict; QuantizedLinear.from_linear / quantize_linear quantize a float layer.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, *,
                 device=None, dtype: torch.dtype | None = None, scale_dtype: torch.dtype = torch.float16):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialize a float weight
        _max_level(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"4-bit quantization needs an even in_features, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        stored_in = in_features // 2 if bits == 4 else in_features
        self.weight = nn.Parameter(torch.zeros(out_features, stored_in, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        _mark_initialized(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, *, scale_dtype: torch.dtype = torch.float16
                    ) -> "QuantizedLinear":
        """Quantize a float linear layer (on its device); the bias is copied as is."""
        has_bias = linear.bias is not None
        module = cls(linear.in_features, linear.out_features, bits, bias=has_bias, device="meta",
                     dtype=linear.bias.dtype if has_bias else None, scale_dtype=scale_dtype)
        qweight, scale = quantize_weight(linear.weight, bits, scale_dtype)
        module.weight = nn.Parameter(qweight, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if has_bias:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        module.train(linear.training)
        _mark_initialized(module)
        return module

    def reset_parameters(self) -> None:
        """Nothing to reset: the weights come from quantization or a checkpoint."""

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh float [out, in] copy of the weight (dtype defaults to the scale's)."""
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype or self.weight_scale.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        device_type = input.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # compute in the autocast dtype, not fp32 first and cast afterwards
            input = input.to(torch.get_autocast_dtype(device_type))
        bias = None if self.bias is None else self.bias.to(input.dtype)
        if torch.is_grad_enabled() and input.requires_grad:
            output = _DequantizedMatmul.apply(input, self.weight, self.weight_scale, self.bits)
            return output if bias is None else output + bias
        return F.linear(input, self.dequantized_weight(input.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}")


def quantize_linear(linear: nn.Linear, bits: int, *, scale_dtype: torch.dtype = torch.float16) -> QuantizedLinear:
    """The quantized copy of a float linear layer."""
    return QuantizedLinear.from_linear(linear, bits, scale_dtype=scale_dtype)


def dequantized_linear(q: QuantizedLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A float nn.Linear copy of a quantized layer (frozen), e.g. for export or merging adapters.

    dtype defaults to the bias's, else the scale's (fp16, the dtype of the official checkpoints).
    """
    if dtype is None:
        dtype = q.bias.dtype if q.bias is not None else q.weight_scale.dtype
    linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    linear.weight = nn.Parameter(q.dequantized_weight(dtype), requires_grad=False)
    if q.bias is not None:
        linear.bias = nn.Parameter(q.bias.detach().to(dtype).clone(), requires_grad=False)
    linear.train(q.training)
    return linear


def _as_names(names: Iterable[str]) -> frozenset[str]:
    return frozenset((names,) if isinstance(names, str) else names)


def _children_named(model: nn.Module, names: frozenset[str], kind: type) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every submodule of `kind` whose attribute name is in names (all names if empty).

    Returns parents, not the children, so that replacing a child can free it at once.
    """
    found = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, kind) and (not names or attribute in names):
                found.append((parent, attribute))
    return found


def _replace(model: nn.Module, places: list[tuple[nn.Module, str]], convert) -> int:
    done: dict[int, nn.Module] = {}  # a module shared under two names is converted once
    for parent, attribute in places:
        child = getattr(parent, attribute)
        key = id(child)
        if key not in done:
            done[key] = convert(child)
        setattr(parent, attribute, done[key])
        del child  # the float weights go as soon as nothing else holds the old layer
    return len(places)


def quantize_modules(model: nn.Module, bits: int, names: Iterable[str], *, empty: bool = False,
                     scale_dtype: torch.dtype = torch.float16) -> int:
    """Replace, in place, every nn.Linear whose attribute name is in names by a QuantizedLinear; returns the count.

    Layer by layer, so peak memory is the model plus one layer. With empty=True the new layers hold zeros
    of the right shapes (for loading an already quantized checkpoint); the float weights are not read.
    Already quantized layers are left alone.
    """
    _max_level(bits)
    names = _as_names(names)
    if not names:
        raise ValueError("quantize_modules needs the attribute names of the layers to quantize")

    def convert(linear: nn.Linear) -> QuantizedLinear:
        if not empty:
            return QuantizedLinear.from_linear(linear, bits, scale_dtype=scale_dtype)
        has_bias = linear.bias is not None
        module = QuantizedLinear(linear.in_features, linear.out_features, bits, bias=has_bias,
                                 device=linear.weight.device, dtype=linear.bias.dtype if has_bias else None,
                                 scale_dtype=scale_dtype)
        return module.train(linear.training)

    places = [(p, a) for p, a in _children_named(model, names, nn.Linear)
              if not isinstance(getattr(p, a), QuantizedLinear)]
    return _replace(model, places, convert)


def empty_quantized_modules(model: nn.Module, bits: int, names: Iterable[str], *,
                            scale_dtype: torch.dtype = torch.float16) -> int:
    """quantize_modules(..., empty=True): zero quantized layers to load a quantized checkpoint into."""
    return quantize_modules(model, bits, names, empty=True, scale_dtype=scale_dtype)


def dequantize_modules(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace, in place, every QuantizedLinear (any name, also inside peft wrappers) by its float copy."""
    return _replace(model, _children_named(model, frozenset(), QuantizedLinear),
                    lambda q: dequantized_linear(q, dtype))


def has_quantized_modules(model: nn.Module) -> bool:
    """Whether any layer of model is a QuantizedLinear (e.g. to skip merging LoRA into it)."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


@functools.cache
def _quantized_lora_class() -> type:
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QuantizedLoraLinear(LoraLinear):
        """peft's LoRA Linear over a QuantizedLinear, refusing to merge.

        peft's own merge adds the float update to `weight.data`: on int8 weights that either fails with a
        dtype error or, with safe_merge, truncates the update to integers and silently loses it.
        """

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            base = self.get_base_layer()
            if not isinstance(base, QuantizedLinear):  # dequantized since: peft's exact float merge
                return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            raise QuantizedMergeError(
                f"cannot merge a LoRA adapter into a {base.bits}-bit quantized layer; keep the adapter "
                "unmerged, or first replace the quantized layers by float ones with "
                "glmtune.models.quantization.dequantize_modules(model)")

    QuantizedLoraLinear.__module__ = __name__
    QuantizedLoraLinear.__qualname__ = "QuantizedLoraLinear"
    return QuantizedLoraLinear


def __getattr__(name: str):
    # QuantizedLoraLinear is built on first use so that importing this module does not import peft
    if name == "QuantizedLoraLinear":
        return _quantized_lora_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_quantized_lora(config):
    """Make a peft LoraConfig wrap QuantizedLinear layers with QuantizedLoraLinear; returns the config.

    Without it peft wraps them with its plain LoRA Linear, which trains fine but whose merge breaks on int
    weights (an unclear dtype error, or with safe_merge an 8-bit merge that silently drops the update).
    The mapping is not saved with the adapter: register again on the config used to load it.
    """
    config._register_custom_module({QuantizedLinear: _quantized_lora_class()})
    return config
