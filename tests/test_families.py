import json

import pytest

from glmtune.config import TrainConfig
from glmtune.data.formats import load_samples
from glmtune.errors import GlmtuneError
from glmtune.config import GenerationOptions
from glmtune.inference.generate import Generator
from glmtune.methods.adapter import load_tuned_model, read_adapter_info
from glmtune.models.loader import detect_family, load_tokenizer
from glmtune.paths import shared_dir
from glmtune.train.trainer import run_training


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_glm4_hf_checkpoints_train_with_lora_on_their_projections(model_type, tmp_path, tokenizer, small_data):
    import torch
    from transformers import AutoModelForCausalLM, Glm4Config, GlmConfig

    config_class = {"glm": GlmConfig, "glm4": Glm4Config}[model_type]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=2,
                          eos_token_id=2, bos_token_id=1, initializer_range=0.2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    train, dev = small_data
    result = run_training(TrainConfig(model=str(tmp_path / "model"), train_file=str(train),
                                      output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4,
                                      lora_target="auto"))  # the family's own targets
    info = read_adapter_info(result.adapter_dir)
    assert info["family"] == "glm4"
    targets = json.loads((result.adapter_dir / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    loaded, _ = load_tuned_model(None, result.adapter_dir)
    prompts = [s.prompt_messages for s in load_samples(dev)[0][:2]]
    answers = Generator(loaded, info["template"]).generate(prompts, GenerationOptions(max_new_tokens=4))
    assert len(answers) == 2


def test_chatglm_families_are_detected_and_a_missing_vocabulary_is_named(tmp_path):
    assert detect_family({"model_type": "chatglm", "inner_hidden_size": 16384, "position_encoding_2d": True}) == "chatglm"
    assert detect_family({"model_type": "chatglm", "multi_query_attention": True, "ffn_hidden_size": 13696}) == "chatglm2"
    assert detect_family({"model_type": "chatglm", "ffn_hidden_size": 13696,
                          "_name_or_path": "THUDM/chatglm3-6b"}) == "chatglm3"
    assert detect_family({"model_type": "llama"}) == "generic"
    official = shared_dir() / "fixtures/tokenizers/chatglm-6b/official_config.json"
    config = json.loads(official.read_text()) if official.is_file() else {"model_type": "chatglm",
                                                                          "inner_hidden_size": 16384}
    (tmp_path / "chatglm").mkdir()
    (tmp_path / "chatglm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlmtuneError, match="no ice_text.model"):  # native, but the vocabulary is missing
        load_tokenizer(str(tmp_path / "chatglm"))
    (tmp_path / "chatglm2").mkdir()
    (tmp_path / "chatglm2" / "config.json").write_text(json.dumps(
        {"model_type": "chatglm", "multi_query_attention": True, "ffn_hidden_size": 13696}))
    with pytest.raises(GlmtuneError, match="tokenizer.model"):
        load_tokenizer(str(tmp_path / "chatglm2"))

def test_the_family_table_is_the_one_place_that_names_families():
    from glmtune.data.templates import FAMILY_TEMPLATES
    from glmtune.families import FAMILIES, NATIVE_FAMILIES, TEMPLATE_NAMES, family_facts
    from glmtune.models.kbit import Quantization

    assert NATIVE_FAMILIES == ("chatglm", "chatglm2", "chatglm3")
    assert family_facts("some-future-family") == FAMILIES["generic"]  # unknown names behave as before: generic
    for facts in FAMILIES.values():
        for name in (facts.template, facts.fallback_template):
            assert name is None or name in FAMILY_TEMPLATES
        assert Quantization(bits=4).for_family(facts.name).backend == facts.quantization_backend
    # the names --template and `template:` accept come from the table: every family layout, nothing else
    assert set(TEMPLATE_NAMES) == {"auto", "chat", "plain"} | set(FAMILY_TEMPLATES)
    with pytest.raises(GlmtuneError, match="own int layout"):
        Quantization(bits=4, backend="chatglm").for_family("glm4")
