"""How the frozen base is quantized: nothing, ChatGLM's own int8/int4 layout, or bitsandbytes (QLoRA).

Two backends:
- `chatglm`: the official ChatGLM weight-only layout (glmtune.models.quantization), for ChatGLM-6B/2/3. It
  runs anywhere plain PyTorch does and reads the official -int4 / -int8 checkpoints.
- `bitsandbytes`: transformers' bitsandbytes integration, for every family: 4-bit NF4 (or FP4), with or
  without double quantization of the scales, or 8-bit (LLM.int8). This is QLoRA's base. bitsandbytes runs
  on CUDA GPUs and, from version 0.46, on the CPU (checked here by running one quantized matmul).

`auto` picks `chatglm` for the native ChatGLM families and `bitsandbytes` for the rest.

Two things about bitsandbytes that glmtune manages rather than leaves to chance:
- Importing it. peft (and with it transformers' Trainer) imports bitsandbytes as a side effect; on CPUs with
  AVX-512 BF16 that import logs a warning about an optional kernel package that reads like an error, and it
  costs about 1.5 s. The CLI holds it back (hold_back_bitsandbytes) and import_bitsandbytes, called only where
  a bitsandbytes base is used, imports it with its import-time messages sent to the debug log.
- Its CPU layout. On a CPU with AVX-512 BF16, a 4-bit layer's first forward pass in eval mode without
  gradients repacks the weight in place into a CPU-only layout (absmax rounded to bf16, output rows in blocks
  of 32). Anything that later reads the weight as NF4 (merging, saving, comparing) reads other bytes, and the
  layer computes in bf16. keep_standard_layout keeps every layer glmtune loads out of that path, so a 4-bit
  base computes the same on every CPU and always holds the weights it was quantized to.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families import family_facts

log = logging.getLogger(__name__)

BACKENDS = ("auto", "chatglm", "bitsandbytes")
QUANT_TYPES = ("nf4", "fp4")


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
        own = family_facts(family).quantization_backend
        backend = own if self.backend == "auto" else self.backend
        if backend == "chatglm" and own != "chatglm":  # ChatGLM's layout fits only the families it is made for
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


# ---------------------------------------------------------------- importing bitsandbytes

def hold_back_bitsandbytes() -> bool:
    """Keep libraries from importing bitsandbytes as a side effect until import_bitsandbytes() is called (a
    None entry in sys.modules is how Python spells 'not installed'). Returns whether a hold was placed: not
    where bitsandbytes is already imported."""
    if "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None
    return True


def release_bitsandbytes() -> None:
    """Lift hold_back_bitsandbytes' hold (nothing to do where there is none)."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
        # peft and transformers cache "is bitsandbytes installed?"; an answer given during the hold is stale
        for module_name, names in (("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
                                   ("transformers.utils.import_utils", ("is_bitsandbytes_available",))):
            module = sys.modules.get(module_name)
            for name in names:
                cache_clear = getattr(getattr(module, name, None), "cache_clear", None)
                if cache_clear is not None:
                    cache_clear()


class _ToDebugLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("bitsandbytes (while importing): %s", record.getMessage())


def import_bitsandbytes():
    """The bitsandbytes module, imported now (lifting any hold). What it logs or warns while importing goes to
    glmtune's debug log (-v shows it): on CPUs with AVX-512 BF16 it warns that an optional kernel package
    ('kernels') is missing, which changes nothing glmtune does."""
    release_bitsandbytes()
    if sys.modules.get("bitsandbytes") is not None:
        return sys.modules["bitsandbytes"]
    logger = logging.getLogger("bitsandbytes")
    handler, propagate = _ToDebugLog(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bitsandbytes
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    for warning in caught:
        log.debug("bitsandbytes (while importing): %s", warning.message)
    return bitsandbytes


@functools.cache
def bitsandbytes_problem(device_type: str) -> str | None:
    """None when bitsandbytes can quantize and multiply on `device_type` ('cpu', 'cuda'), else why not."""
    try:
        import torch

        bnb = import_bitsandbytes()
    except ImportError:
        return "the bitsandbytes package is not installed (pip install 'glmtune[qlora]' or pip install bitsandbytes)"
    except Exception as e:  # a broken install (missing native library, CUDA mismatch) fails at import
        return f"bitsandbytes does not import: {e}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device_type)
        keep_standard_layout(layer)
        layer(torch.ones(1, 64, device=device_type))
    except Exception as e:
        version = getattr(bnb, "__version__", "?")
        return f"bitsandbytes {version} cannot run a 4-bit matmul on {device_type} ({type(e).__name__}: {e})"
    return None


def check_bitsandbytes(device_type: str, family: str) -> None:
    problem = bitsandbytes_problem(device_type)
    if problem:
        alternative = ("quantization_backend: chatglm (ChatGLM's own int8/int4, runs anywhere), or "
                       if family_facts(family).quantization_backend == "chatglm" else "")
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


def keep_standard_layout(model) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` in the standard NF4/FP4 layout on every CPU (see the
    module docstring): its AVX-512 BF16 repacking is switched off, and a layer already repacked is unpacked
    by bitsandbytes' own inverse (the one it runs before saving). Returns the number of 4-bit layers."""
    bnb = import_bitsandbytes()
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False  # the flag Linear4bit.forward checks before repacking
        if is_repacked(module):
            module.state_dict()  # bitsandbytes restores the standard layout, in place, before it saves
            if is_repacked(module):
                raise RuntimeError("bitsandbytes did not restore the standard 4-bit layout of a repacked layer")
        count += 1
    return count


def bitsandbytes_bits(model) -> int:
    """8 or 4 where `model` holds bitsandbytes 8-bit or 4-bit layers (8 if both), else 0."""
    bnb = import_bitsandbytes()
    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, bnb.nn.Linear8bitLt) for k in kinds):
        return 8
    return 4 if any(issubclass(k, bnb.nn.Linear4bit) for k in kinds) else 0


def is_repacked(layer) -> bool:
    """Whether a bitsandbytes 4-bit layer holds its weight in the CPU-only AVX-512 BF16 layout."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def dequantize_bitsandbytes(model, dtype=None) -> int:
    """Replace, in place, every bitsandbytes 4-bit / 8-bit linear layer (also one inside a peft LoRA wrapper)
    by a float nn.Linear holding its dequantized weight (float32 unless `dtype` says otherwise), and drop the
    model's bitsandbytes state, so that it merges and saves like a full-precision model. Returns the count.

    The weight is exactly what the quantized layer multiplies by (4-bit: bitsandbytes' own dequantize_4bit;
    8-bit: int8 rows times their absmax / 127), so an adapter merged into it matches what it was trained
    against. A 4-bit weight is read in the standard layout (keep_standard_layout first), never as repacked
    bytes."""
    import torch
    from torch import nn

    bnb = import_bitsandbytes()
    bnb_functional = bnb.functional
    dtype = dtype or torch.float32
    keep_standard_layout(model)
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
