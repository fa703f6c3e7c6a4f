"""The models the GPU check builds: checkpoint folders holding an official config.json (full size, or cut
down to a few narrow layers for `--tiny`) and a real tokenizer, but no weights (the check initialises them
on the device), and the training data it reads. Everything comes from the shared folder (GLMTUNE_SHARED)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from glmtune.errors import GlmtuneError

# GLM-4-9B-Chat in the Hugging Face format (THUDM/glm-4-9b-chat-hf config.json): the values that shape it.
GLM4_9B_CONFIG = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "hidden_size": 4096,
                  "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32,
                  "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552, "attention_bias": True,
                  "partial_rotary_factor": 0.5, "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07,
                  "tie_word_embeddings": False, "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338]}
GLM4_SPECIAL_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                       "<|observation|>"]
# GLM-4's chat layout for plain messages: [gMASK]<sop>, <|role|>\n{content} per message, <|assistant|> to answer.
GLM4_CHAT_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# Each model cut down for --tiny: two layers of width 64 (the vocabulary stays, so the real tokenizer fits).
TINY = {"chatglm": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "inner_hidden_size": 128},
        "chatglm3": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                     "kv_channels": 16, "multi_query_group_num": 2},
        "glm4": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 16, "intermediate_size": 128}}

TRAIN_DATA = Path("data") / "seed_mixed" / "mixed_train_dataset.jsonl"


@dataclass(frozen=True)
class Shapes:
    """Where the check finds its inputs and builds its model folders."""

    shared: Path
    work: Path
    tiny: bool

    @property
    def train_file(self) -> Path:
        path = self.shared / TRAIN_DATA
        if not path.is_file():
            raise GlmtuneError(f"training data not found: {path} (give --shared, the folder holding data/ and "
                               "fixtures/)")
        return path

    @property
    def golden(self) -> Path:
        path = self.shared / "fixtures" / "golden"
        if not (path / "chatglm" / "golden.safetensors").is_file():
            raise GlmtuneError(f"golden fixtures not found under {path} (give --shared)")
        return path

    def model(self, name: str) -> Path:
        """A folder for `name` (chatglm6b, chatglm3, glm4_9b): config.json and tokenizer, no weights."""
        folder = self.work / "models" / (name + ("-tiny" if self.tiny else ""))
        if (folder / "config.json").is_file():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        tokenizers = self.shared / "fixtures" / "tokenizers"
        if name == "chatglm6b":
            source = tokenizers / "chatglm-6b"
            config = _read(source / "official_config.json")
            for file in ("ice_text.model", "tokenizer_config.json"):
                _copy(source / file, folder / file)
            family = "chatglm"
        elif name == "chatglm3":
            source = tokenizers / "chatglm2-6b"
            config = _read(source / "official_config.chatglm3.json")
            _copy(source / "tokenizer.model", folder / "tokenizer.model")
            _copy(source / "tokenizer_config.chatglm3.json", folder / "tokenizer_config.json")
            family = "chatglm3"
        elif name == "glm4_9b":
            config = dict(GLM4_9B_CONFIG)
            family = "glm4"
            config.update(_standin_glm4_tokenizer(folder, self.train_file))
        else:
            raise ValueError(name)
        if self.tiny:
            config.update(TINY[family])
        config["_name_or_path"] = str(folder)  # not the hub name: nothing may look it up
        (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        return folder


def _read(path: Path) -> dict:
    if not path.is_file():
        raise GlmtuneError(f"{path} not found (give --shared, the folder holding fixtures/tokenizers)")
    return json.loads(path.read_text(encoding="utf-8"))


def _copy(source: Path, target: Path) -> None:
    if not source.is_file():
        raise GlmtuneError(f"{source} not found (give --shared, the folder holding fixtures/tokenizers)")
    shutil.copy(source, target)


def _standin_glm4_tokenizer(folder: Path, data: Path) -> dict:
    """GLM-4's tokenizer is not in the shared folder and nothing can be downloaded: a byte-level BPE learnt
    from the training data stands in, with GLM-4's special tokens and chat layout. Its sequence lengths are
    therefore only near GLM-4's; the model's shapes are the real ones. Returns the config ids it needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    texts = []
    for line in data.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts += [str(value) for value in row.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=16000, special_tokens=GLM4_SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=GLM4_SPECIAL_TOKENS[1:])
    tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids
    stops = [ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")]
    GenerationConfig(eos_token_id=stops, pad_token_id=stops[0]).save_pretrained(folder)
    return {"pad_token_id": stops[0], "eos_token_id": stops}
