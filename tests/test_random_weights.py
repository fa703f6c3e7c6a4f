"""load_random_model: a model folder's architecture with random weights built on the device, for the GPU
check's full-size measurements (no weight file is read)."""

from __future__ import annotations

import pytest
import torch

from glmtune.errors import GlmtuneError
from glmtune.models.loader import load_model, load_random_model


@pytest.mark.parametrize("family", ["chatglm", "chatglm3", "glm4"])
def test_random_model_has_the_architecture_but_not_the_weights(tiny_family_dir, family):
    folder = tiny_family_dir(family)
    random = load_random_model(str(folder), dtype="float32", device="cpu", seed=1)
    stored = load_model(str(folder), dtype="float32")
    assert random.family == stored.family == family
    shapes = {name: p.shape for name, p in stored.model.named_parameters()}
    assert {name: p.shape for name, p in random.model.named_parameters()} == shapes
    differ = [name for name, p in random.model.named_parameters()
              if p.ndim == 2 and not torch.equal(p, dict(stored.model.named_parameters())[name])]
    assert differ  # initialised here, not read from the folder's weight file
    ids = torch.tensor([random.tokenizer.encode("hello world")])
    with torch.no_grad():
        loss = random.model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert random.model.generation_config.pad_token_id == stored.model.generation_config.pad_token_id


def test_random_model_needs_no_weight_file_and_takes_chatglm_int4(tiny_family_dir, tmp_path):
    from glmtune.models.quantization import has_quantized_modules

    folder = tmp_path / "no-weights"
    folder.mkdir()
    for file in tiny_family_dir("chatglm").iterdir():
        if not file.name.endswith((".safetensors", ".bin")):
            (folder / file.name).write_bytes(file.read_bytes())
    with pytest.raises(GlmtuneError, match="no weight files"):
        load_model(str(folder))
    loaded = load_random_model(str(folder), dtype="float32", device="cpu", quantization=4)
    assert has_quantized_modules(loaded.model) and loaded.quantization.bits == 4
    with pytest.raises(GlmtuneError, match="bitsandbytes"):
        load_random_model(str(tiny_family_dir("glm4")), quantization=4)
