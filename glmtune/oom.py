"""Out of memory, on the GPU or the CPU: recognised, and turned into one line that says what to lower.

PyTorch raises `torch.OutOfMemoryError` when the GPU's memory runs out (`torch.cuda.OutOfMemoryError` is the
same class from torch 2.5; torch 2.4 has only the latter, recognised by its message); the CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't
allocate memory", "... not enough memory" on Windows), and Python itself MemoryError. Each caller (training,
predict and eval, the serving engine, the CLI as a last resort) knows which of its options would help, so the
advice is theirs; this module only recognises the error and frees what it can.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator

from glmtune.errors import GlmtuneError, one_line

# Pieces of the messages the allocators raise with (CUDA, ROCm, Apple MPS, XPU, the CPU allocator, and cuBLAS
# when it cannot allocate its workspace), compared in lower case.
MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory",
           "cublas_status_alloc_failed")

# What any command can try, for an error that reaches the CLI without a more precise message.
GENERIC_ADVICE = ("lower the batch size (batch_size, --batch-size), the sequence length (cutoff_len) or the answer "
                  "length (--max-new-tokens), turn on gradient_checkpointing when training, or load the base with "
                  "4-bit weights (quantization_bit 4, --quantization-bit 4)")


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation that failed for want of memory, on any device."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # an error can only come from torch once it is imported
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        return any(marker in text for marker in MARKERS)
    return False


def on_cpu(error: BaseException) -> bool:
    """True when the machine's RAM ran out rather than an accelerator's memory."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return False
    text = str(error).lower()
    return "cpu" in text or not any(device in text for device in ("cuda", "gpu", "hip", "mps", "xpu", "cublas"))


def free_memory() -> None:
    """Give back what the failed step left allocated (its tensors are garbage once the error is dropped), so
    a server can answer the next request and a caller can go on."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def where(error: BaseException) -> str:
    """'the GPU' or 'the CPU' (the machine's RAM), for the message."""
    return "the CPU (the machine's RAM)" if on_cpu(error) else "the GPU"


@contextlib.contextmanager
def reported(describe: Callable[[BaseException], str]) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into GlmtuneError(describe(error)); anything else passes."""
    message = None
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        message = describe(e)
    if message is not None:
        free_memory()
        raise GlmtuneError(message)


def last_resort_message(error: BaseException, command: str) -> str | None:
    """For the CLI: the one line for an out-of-memory error no step turned into its own message (loading
    the model, building the trainer), or None for any other error."""
    if not is_out_of_memory(error):
        return None
    free_memory()
    detail = f" ({one_line(error, 160)})" if str(error) else ""
    return f"out of memory on {where(error)} in glmtune {command}{detail}: {GENERIC_ADVICE}"
