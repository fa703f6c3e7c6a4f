"""What `glmtune bench` measures besides time: the device's matmul peak, peak memory, and the FLOPs a
training step needs (model FLOPs, from which utilisation is computed).

Model FLOPs count the work the method needs for the real tokens, never padding or recomputation:
- every matmul in the decoder (LoRA's A and B included): forward, and the backward pass's gradient for
  its input (2 FLOPs per weight per token each); the weight's own gradient only where it is trained;
- attention scores and the weighted sum over the pairs a causal model computes (n(n+1)/2 per sample of
  n tokens, plus n times the P-Tuning prefix): forward, and twice that backward;
- the output layer only at labelled positions (the loss needs nothing else): forward and input gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of a large square matmul on `device` in `dtype`, measured now."""
    size = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5 if device.startswith("cuda") else 8):
        _sync(device)
        start = time.perf_counter()
        for _ in range(10 if device.startswith("cuda") else 2):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / (10 if device.startswith("cuda") else 2))
    return 2 * size ** 3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class FlopCounter:
    """Model FLOPs per sample of a model with a method applied (see the module docstring)."""

    matmul_weights: int  # per token: every decoder matmul's weights, LoRA included
    trained_matmul_weights: int  # the part of those whose gradient is computed
    head_weights: int  # hidden x vocabulary
    attention_width: int  # query heads x head dim, summed over layers
    prefix_length: int  # P-Tuning v2's pre_seq_len, 0 otherwise

    @classmethod
    def of(cls, model, prefix_length: int = 0) -> "FlopCounter":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        matmul = trained = 0
        for module in base.modules():
            if module is head or any(True for _ in module.children()):
                continue
            inputs, outputs = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if isinstance(inputs, int) and isinstance(outputs, int):
                matmul += inputs * outputs
                weight = getattr(module, "weight", None)
                if weight is not None and weight.requires_grad:
                    trained += inputs * outputs
        config = base.config
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers")
        heads = config.num_attention_heads
        head_dim = (getattr(config, "head_dim", None) or getattr(config, "kv_channels", None)
                    or config.hidden_size // heads)
        return cls(matmul, trained, head.in_features * head.out_features, layers * heads * head_dim, prefix_length)

    def sample(self, tokens: int, labelled: int) -> float:
        """FLOPs of one training pass over a sample of `tokens` tokens with `labelled` answer positions."""
        pairs = tokens * (tokens + 1) / 2 + tokens * self.prefix_length
        forward = 2 * self.matmul_weights * tokens + 4 * self.attention_width * pairs + 2 * self.head_weights * labelled
        backward = (2 * self.matmul_weights * tokens + 2 * self.trained_matmul_weights * tokens
                    + 8 * self.attention_width * pairs + 2 * self.head_weights * labelled)
        return forward + backward


class ProfiledMemory:
    """Peak bytes allocated while it is active, from the PyTorch profiler's memory events: every allocation
    and release of the device allocator, including buffers an operator uses only inside itself. The CPU
    has no `max_memory_allocated`; this is how a CPU training step's peak is measured (on a GPU, PeakMemory
    reads the allocator's own counter).

    `baseline` adds bytes that exist before it starts (the model's weights and optimizer state, see
    `storage_bytes`), so `peak` is comparable with a GPU's max_memory_allocated. Profiling slows the
    measured code down (about 2x); measure one step, not a run. Not inside another profiler."""

    def __init__(self, baseline: int = 0):
        self.baseline = baseline
        self.current = baseline
        self.peak = baseline
        self._profiler = None

    def __enter__(self) -> "ProfiledMemory":
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        events = self._profiler.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self._profiler = None
        current = peak = self.baseline
        for _, change in changes:  # + an allocation, - a release, in time order
            current += change
            peak = max(peak, current)
        self.current, self.peak = current, peak


def storage_bytes(*holders) -> int:
    """Bytes of the tensors held by modules (parameters and buffers) and optimizers (their state), each
    storage once (tied weights share one)."""
    storages: dict[int, int] = {}
    for holder in holders:
        if isinstance(holder, torch.nn.Module):
            tensors = [*holder.parameters(), *holder.buffers()]
        else:  # an optimizer
            tensors = [t for state in holder.state.values() for t in state.values() if torch.is_tensor(t)]
        for tensor in tensors:
            if tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
