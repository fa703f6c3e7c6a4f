"""NEFTune (Jain et al., 2023): uniform noise added to the input embeddings while training, scaled by
alpha / sqrt(L x d) for a sample of L tokens and hidden size d.

transformers' own NEFTune takes L from the padded row, which under glmtune's padding-free batches (a whole
batch side by side in one row) or packing would be the length of all the samples together, shrinking the
noise. Here every token's L is the length of the sample it belongs to, which the collator writes under
SAMPLE_LENGTHS; padding gets no noise. Evaluation and generation (the module not in training mode) get none.
"""

from __future__ import annotations

import torch

from glmtune.data.collate import SAMPLE_LENGTHS


class EmbeddingNoise:
    def __init__(self, model, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # [rows, sequence]: the sample length of each token, 0 for padding
        self.calls = 0  # forward passes that got noise (tests and the log read it)
        self.handle = model.get_input_embeddings().register_forward_hook(self._add)

    def take_lengths(self, batch: dict) -> None:
        """Called with each training batch before its forward pass."""
        self.lengths = batch.get(SAMPLE_LENGTHS)

    def _add(self, module, args, output):
        lengths = self.lengths
        if not module.training or lengths is None or tuple(lengths.shape) != tuple(output.shape[:2]):
            return output
        lengths = lengths.to(device=output.device, dtype=torch.float32)
        scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * output.shape[-1]), 0.0)
        noise = torch.empty_like(output).uniform_(-1, 1) * scale.unsqueeze(-1).to(output.dtype)
        self.calls += 1
        return output + noise

    def remove(self) -> None:
        self.handle.remove()
