"""P-Tuning v2 export: the final prefix table as one small file.

With prefix_projection the trained encoder is an embedding followed by an MLP, but its output for the
pre_seq_len positions is all the model ever uses; storing that output as a plain embedding drops the MLP
(often most of the parameters) and gives the same forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TABLE_NAME = "embedding.weight"


@torch.no_grad()
def final_table(model) -> tuple[str, torch.Tensor]:
    """(file key, [pre_seq_len, width] float32): the encoder's output for every prefix position, under the
    key prefix of the model's family (official `transformer.prefix_encoder.` for native ChatGLM)."""
    from glmtune.methods.ptuning import key_prefix, prefix_encoder

    encoder = prefix_encoder(model)
    positions = torch.arange(encoder.pre_seq_len, device=encoder.embedding.weight.device)
    return key_prefix(model) + TABLE_NAME, encoder(positions).float().cpu()


def write_prefix(out: Path, key: str, table: torch.Tensor, dtype: torch.dtype) -> str:
    from safetensors.torch import save_file

    from glmtune.methods.ptuning import WEIGHTS_FILE

    save_file({key: table.to(dtype).contiguous()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return WEIGHTS_FILE


@torch.no_grad()
def use_table(model, table: torch.Tensor) -> None:
    """Turn the model's prefix encoder, in place, into the plain embedding an export loads into (the table
    cast to the encoder's dtype, as loading does), for the quality check. The encoder object stays, so the
    forward hooks that hold it keep working."""
    from glmtune.methods.ptuning import prefix_encoder

    encoder = prefix_encoder(model)
    weight = encoder.embedding.weight
    encoder.embedding = nn.Embedding(*table.shape, device=weight.device, dtype=weight.dtype)
    encoder.embedding.weight.copy_(table.to(weight.dtype))
    encoder.projection = False
    if hasattr(encoder, "trans"):
        del encoder.trans
