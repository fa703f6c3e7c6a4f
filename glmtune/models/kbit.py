"""How the frozen base is quantized: nothing, ChatGLM's own int8/int4 layout, or bitsandbytes (QLoRA).

Two backends:
- `chatglm`: the official ChatGLM weight-only layout (glmtune.models.quantization), for ChatGLM-6B/2/3. It
  runs anywhere plain PyTorch does and reads the official -int4 / -int8 checkpoints.
- `bitsandbytes`: transformers' bitsandbytes integration, for every family: 4-bit NF4 (or FP4), with or
  without double quantization of the scales, or 8-bit (LLM.int8). This is QLoRA's base. bitsandbytes runs
  on CUDA GPUs and, from version 0.46, on the CPU (checked here by running one quantized matmul).

`auto` picks `chatglm` for the native ChatGLM families and `bitsandbytes` for the rest.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import Any

from glmtune.errors import GlmtuneError

BACKENDS = ("auto", "chatglm", "bitsandbytes")
QUANT_TYPES = ("nf4", "fp4")
CHATGLM_BACKEND_FAMILIES = ("chatglm", "chatglm2", "chatglm3")


@dataclass(frozen=True)
class Quantization:
    bits: int = 0  # 0: full weights; 8 or 4
    backend: str = "auto"
    quant_type: str = "nf4"  # bitsandbytes 4-bit only
    double_quant: bool = True  # bitsandbytes 4-bit only: quantize the quantization scales too

    def __post_init__(self):
        if self.bits not in (0, 4, 8):
            raise GlmtuneError(f"quantization bits must be 0, 4 or 8; got {self.bits!r}")
        if self.backend not in BACKENDS:
            raise GlmtuneError(f"quantization_backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.quant_type not in QUANT_TYPES:
            raise GlmtuneError(f"quantization_type must be one of {', '.join(QUANT_TYPES)}; got {self.quant_type!r}")

    @classmethod
    def of(cls, value: "Quantization | int | None") -> "Quantization":
        return value if isinstance(value, Quantization) else cls(bits=int(value or 0))

    def for_family(self, family: str) -> "Quantization":
        """The backend made concrete for a family (auto resolved); a backend the family cannot use is refused."""
        if not self.bits:
            return Quantization()
        backend = self.backend
        if backend == "auto":
            backend = "chatglm" if family in CHATGLM_BACKEND_FAMILIES else "bitsandbytes"
        if backend == "chatglm" and family not in CHATGLM_BACKEND_FAMILIES:
            raise GlmtuneError(f"quantization_backend chatglm is ChatGLM-6B/2/3's own int layout; a {family} model "
                               "is quantized with quantization_backend: bitsandbytes (or auto)")
        return replace(self, backend=backend)

    def record(self) -> dict[str, Any]:
        """For glmtune_adapter.json."""
        return asdict(self)

    @classmethod
    def from_record(cls, info: dict[str, Any] | None) -> "Quantization":
        """From an adapter's info; adapters written before the backends existed record only quantization_bit."""
        info = info or {}
        if isinstance(info.get("quantization"), dict):
            return cls(**info["quantization"])
        return cls(bits=int(info.get("quantization_bit") or 0))

    @classmethod
    def chosen(cls, recorded: "Quantization", requested: "Quantization | int | None") -> "Quantization":
        """What to load an adapter's base with: the recorded quantization, unless the user asked otherwise;
        a bare bit count keeps the recorded backend and type (0: full weights)."""
        if requested is None:
            return recorded
        if isinstance(requested, Quantization):
            return requested
        return replace(recorded, bits=int(requested)) if requested else cls()

    def describe(self) -> str:
        if not self.bits:
            return "full weights"
        if self.backend == "bitsandbytes" and self.bits == 4:
            return f"4-bit {self.quant_type}{' with double quantization' if self.double_quant else ''} (bitsandbytes)"
        return f"{self.bits}-bit ({self.backend})"


@functools.cache
def bitsandbytes_problem(device_type: str) -> str | None:
    """None when bitsandbytes can quantize and multiply on `device_type` ('cpu', 'cuda'), else why not."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return "the bitsandbytes package is not installed (pip install 'glmtune[qlora]' or pip install bitsandbytes)"
    except Exception as e:  # a broken install (missing native library, CUDA mismatch) fails at import
        return f"bitsandbytes does not import: {e}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device_type)
        layer(torch.ones(1, 64, device=device_type))
    except Exception as e:
        version = getattr(bnb, "__version__", "?")
        return f"bitsandbytes {version} cannot run a 4-bit matmul on {device_type} ({type(e).__name__}: {e})"
    return None


def check_bitsandbytes(device_type: str, family: str) -> None:
    problem = bitsandbytes_problem(device_type)
    if problem:
        alternative = ("quantization_backend: chatglm (ChatGLM's own int8/int4, runs anywhere), or "
                       if family in CHATGLM_BACKEND_FAMILIES else "")
        raise GlmtuneError(f"a bitsandbytes-quantized base (method qlora, or quantization_bit) cannot be used here: "
                           f"{problem}. Use {alternative}method lora on the full-precision base (quantization_bit: 0), "
                           "or bitsandbytes >= 0.46 (it runs on the CPU too), or a CUDA GPU")


def bitsandbytes_config(quantization: Quantization, compute_dtype):
    from transformers import BitsAndBytesConfig

    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
                              bnb_4bit_use_double_quant=quantization.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_bitsandbytes_model(model) -> bool:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def dequantize_bitsandbytes(model, dtype=None) -> int:
    """Replace, in place, every bitsandbytes 4-bit / 8-bit linear layer (also one inside a peft LoRA wrapper)
    by a float nn.Linear holding its dequantized weight (float32 unless `dtype` says otherwise), and drop the
    model's bitsandbytes state, so that it merges and saves like a full-precision model. Returns the count.

    The weight is exactly what the quantized layer multiplies by (4-bit: bitsandbytes' own dequantize_4bit;
    8-bit: int8 rows times their absmax / 127), so an adapter merged into it matches what it was trained
    against."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            weight = bnb_functional.int8_vectorwise_dequant(module.weight.data, scales)
        else:
            continue
        bias = module.bias
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        linear.train(module.training)
        model.set_submodule(name, linear)
        replaced += 1
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel
    for attribute in ("hf_quantizer", "quantization_method"):  # transformers' markers of a quantized model
        if attribute in vars(inner):
            delattr(inner, attribute)
    if hasattr(getattr(inner, "config", None), "quantization_config"):
        del inner.config.quantization_config
    for attribute in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attribute in vars(inner):
            setattr(inner, attribute, False)
    return replaced
