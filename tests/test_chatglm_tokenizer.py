"""The native ChatGLM-6B tokenizer against the official tokenizer's recorded outputs (shared fixtures)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from glmtune.paths import shared_dir

TOKENIZER_DIR = Path("fixtures/tokenizers/chatglm-6b")
GOLDEN_TOKENIZER = Path("fixtures/golden/tokenizers/chatglm.json")
GOLDEN_MODEL_DIR = Path("fixtures/golden/chatglm")
TINY = {"bos_id": 1004, "mask_id": 1000, "gmask_id": 1001, "pad_id": 3}  # golden/chatglm's stand-in ids
REAL_SHIFT = 129000  # tiny special id + 129000 = real special id


def _shared(relative: Path) -> Path:
    path = shared_dir() / relative
    if not path.exists():
        pytest.skip(f"shared fixture {path} is missing (set GLMTUNE_SHARED to the team's shared folder)")
    return path


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(_shared(GOLDEN_TOKENIZER).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    folder = _shared(TOKENIZER_DIR)
    _shared(TOKENIZER_DIR / "ice_text.model")
    return folder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

    return load_chatglm_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def golden_tensors() -> dict:
    from safetensors.numpy import load_file

    return load_file(str(_shared(GOLDEN_MODEL_DIR / "golden.safetensors")))


@pytest.fixture(scope="module")
def golden_model_json() -> dict:
    return json.loads(_shared(GOLDEN_MODEL_DIR / "golden.json").read_text(encoding="utf-8"))


def _ints(value) -> list:
    """Nested lists of ints from lists / numpy arrays / tensors of ints or bools."""
    if isinstance(value, list) and value and not isinstance(value[0], (int, list)):
        return [_ints(v) for v in value]
    return np.asarray(value).astype(np.int64).tolist()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# golden/tokenizers/chatglm.json


def test_vocab_file_is_the_golden_one(golden, tokenizer_dir):
    assert _sha256(tokenizer_dir / "ice_text.model") == golden["vocab_file_sha256"]
    assert (shared_dir() / golden["vocab_file"]).resolve() == (tokenizer_dir / "ice_text.model").resolve()


def test_config_kwargs_and_sizes(tok, golden):
    kwargs = golden["tokenizer_kwargs"]
    for name in ("bos_token", "eos_token", "end_token", "gmask_token", "mask_token", "pad_token", "unk_token"):
        assert str(getattr(tok, name)) == kwargs[name], name
    assert tok.remove_space is kwargs["remove_space"]
    assert tok.do_lower_case is kwargs["do_lower_case"]
    assert tok.num_image_tokens == kwargs["num_image_tokens"]
    assert tok.vocab_size == golden["vocab_size"] == len(tok) == len(tok.get_vocab())
    assert tok.padding_side == "left"


def test_special_ids(tok, golden):
    ids = golden["special_ids"]
    assert tok.bos_token_id == tok.sop_token_id == ids["bos(<sop>)"] == 130004
    assert tok.eos_token_id == ids["eos(<eop>)"] == 130005
    assert tok.pad_token_id == ids["pad"] == 3
    assert tok.unk_token_id == ids["unk"] == 0
    assert tok.mask_token_id == ids["[MASK]"] == 130000
    assert tok.gmask_token_id == ids["[gMASK]"] == 130001
    assert tok.end_token_id == ids["end(</s>)"] == 2
    assert tok.convert_tokens_to_ids(["[sMASK]", "<sop>", "<eop>"]) == [130002, 130004, 130005]
    assert tok.convert_ids_to_tokens([130000, 130001, 130004, 130005, 3]) == ["[MASK]", "[gMASK]", "<sop>", "<eop>",
                                                                              "<pad>"]


def _golden_texts():
    path = shared_dir() / GOLDEN_TOKENIZER
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"shared fixture {path} is missing"))]
    cases = json.loads(path.read_text(encoding="utf-8"))["texts"]
    return [pytest.param(c, id=f"text{i}") for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", _golden_texts())
def test_golden_text(tok, case):
    text = case["text"]
    assert tok.tokenize(text) == case["tokenize"]
    assert tok.encode(text) == case["encode"]
    assert tok(text)["input_ids"] == case["encode"]
    assert tok.encode(text, add_special_tokens=False) == case["encode_no_special"]
    assert tok.convert_tokens_to_ids(case["tokenize"]) == case["encode_no_special"]
    assert tok.decode(case["encode"]) == case["decode(encode)"]
    assert tok.decode(case["encode_no_special"]) == case["decode(encode_no_special)"]
    assert tok.decode(case["encode"], skip_special_tokens=True) == case["decode(encode)"]


def test_golden_batch_padding(tok, golden):
    batch = golden["batch"]
    out = tok(batch["texts"], padding=True)
    assert set(out.keys()) == {"input_ids", "attention_mask", "position_ids"}
    assert _ints(out["input_ids"]) == batch["input_ids"]
    assert all(np.asarray(m).dtype == np.bool_ for m in out["attention_mask"])
    assert _ints(out["attention_mask"]) == batch["attention_mask_true_means_masked"]
    assert _ints(out["position_ids"]) == batch["position_ids"]
    assert tok.batch_decode(out["input_ids"]) == [tok.decode(tok.encode(t)) for t in batch["texts"]]


def test_golden_batch_as_tensors(tok, golden):
    import torch

    batch = golden["batch"]
    out = tok(batch["texts"], padding=True, return_tensors="pt")
    n, length = len(batch["texts"]), len(batch["input_ids"][0])
    assert out["input_ids"].shape == (n, length) and out["input_ids"].dtype == torch.int64
    assert out["attention_mask"].shape == (n, 1, length, length) and out["attention_mask"].dtype == torch.bool
    assert out["position_ids"].shape == (n, 2, length) and out["position_ids"].dtype == torch.int64
    assert out["input_ids"].tolist() == batch["input_ids"]
    assert out["attention_mask"].int().tolist() == batch["attention_mask_true_means_masked"]
    assert out["position_ids"].tolist() == batch["position_ids"]


def test_golden_chat_prompt(tok, golden):
    from glmtune.models.chatglm.tokenization import build_chat_prompt

    chat = golden["chat_prompt"]
    history = [tuple(turn) for turn in chat["history"]]
    prompt = build_chat_prompt(chat["query"], history)
    assert prompt == chat["prompt"]
    assert tok([prompt])["input_ids"] == [chat["input_ids"]]
    assert build_chat_prompt(chat["query"]) == chat["query"]


# --------------------------------------------------------------------------------------------------------------
# the mask / position builder against golden/chatglm (tiny ids)


def test_official_masks_infer(golden_tensors, golden_model_json):
    from glmtune.models.chatglm.tokenization import official_masks

    ids = golden_model_json["inputs"]["infer.input_ids"]
    unpadded = [[t for t in row if t != TINY["pad_id"]] for row in ids]  # the prompts + [gMASK, <sop>]
    out = official_masks(unpadded, **TINY)
    assert out["input_ids"].tolist() == golden_tensors["infer.input_ids"].tolist()
    assert out["attention_mask"].dtype == np.bool_
    np.testing.assert_array_equal(out["attention_mask"], golden_tensors["infer.attention_mask"])
    assert out["position_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["position_ids"], golden_tensors["infer.position_ids"])


def test_official_masks_infill_prefers_mask_over_gmask(golden_tensors):
    from glmtune.models.chatglm.tokenization import official_masks

    out = official_masks(golden_tensors["infill.input_ids"].tolist(), **TINY)
    np.testing.assert_array_equal(out["input_ids"], golden_tensors["infill.input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], golden_tensors["infill.attention_mask"])
    np.testing.assert_array_equal(out["position_ids"], golden_tensors["infill.position_ids"])


def test_official_masks_on_already_padded_rows(golden_tensors):
    # `_pad` on right-padded training rows (nothing left to pad): pads count as ordinary tokens
    from glmtune.models.chatglm.tokenization import official_masks

    out = official_masks(golden_tensors["train.input_ids"].tolist(), **TINY)
    np.testing.assert_array_equal(out["attention_mask"], golden_tensors["train.collator_attention_mask"])
    np.testing.assert_array_equal(out["position_ids"], golden_tensors["train.collator_position_ids"])


def test_official_masks_lengths():
    from glmtune.models.chatglm.tokenization import official_masks

    out = official_masks([[5, 1001, 1004]], max_length=5, pad_to_multiple_of=4, **TINY)
    assert out["input_ids"].tolist() == [[3] * 5 + [5, 1001, 1004]]
    assert out["attention_mask"].shape == (1, 1, 8, 8) and out["attention_mask"][0, 0, :5].all()
    assert out["position_ids"].tolist() == [[[0] * 5 + [0, 1, 1], [0] * 5 + [0, 0, 1]]]
    no_sop = official_masks([[7, 8, 1001]], **TINY)  # no <sop>: all context, nothing masked
    assert not no_sop["attention_mask"].any() and no_sop["position_ids"].tolist() == [[[0, 1, 2], [0, 0, 0]]]
    with pytest.raises(ValueError):
        official_masks([[1, 2, 3]], max_length=2, **TINY)


def _real(ids: list[int]) -> list[int]:
    return [t + REAL_SHIFT if t >= 1000 else t for t in ids]


def test_tokenizer_pad_uses_the_same_builder(tok, golden_tensors, golden_model_json):
    import torch

    rows = [[t for t in row if t != TINY["pad_id"]] for row in golden_model_json["inputs"]["infer.input_ids"]]
    out = tok.pad({"input_ids": [_real(r) for r in rows]}, return_tensors="pt")
    assert out["input_ids"].tolist() == [_real(r) for r in golden_tensors["infer.input_ids"].tolist()]
    assert torch.equal(out["attention_mask"], torch.from_numpy(golden_tensors["infer.attention_mask"]))
    assert torch.equal(out["position_ids"], torch.from_numpy(golden_tensors["infer.position_ids"]))

    infill = _real(golden_tensors["infill.input_ids"][0].tolist())
    single = tok.pad({"input_ids": infill}, padding=True, return_tensors="np")
    np.testing.assert_array_equal(single["attention_mask"], golden_tensors["infill.attention_mask"][0])
    np.testing.assert_array_equal(single["position_ids"], golden_tensors["infill.position_ids"][0])

    # as a collate_fn over a list of features, and via the tokenizer's own shortcut
    collated = tok.pad([{"input_ids": _real(r)} for r in rows], return_tensors="pt")
    assert torch.equal(collated["attention_mask"], out["attention_mask"])
    np.testing.assert_array_equal(tok.official_masks([_real(r) for r in rows])["position_ids"],
                                  golden_tensors["infer.position_ids"])


def test_pad_pads_ready_made_masks(tok, golden):
    import torch

    texts = golden["batch"]["texts"]
    features = [tok(t, padding=True) for t in texts]  # each already carries its [1, L, L] mask
    out = tok.pad(features, return_tensors="pt")
    expected = tok(texts, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(out[key], expected[key]), key


# --------------------------------------------------------------------------------------------------------------
# behaviour of the official tokenizer outside the golden file (checked against it on transformers 4.30.2)


def test_outputs_without_padding(tok):
    assert set(tok("你好").keys()) == {"input_ids"}
    assert set(tok(["你好", "晚上睡不着怎么办"]).keys()) == {"input_ids"}
    single = tok("你好", padding=True)
    assert _ints(single["attention_mask"]) == [[[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]]
    assert _ints(single["position_ids"]) == [[0, 1, 2, 2], [0, 0, 0, 1]]
    truncated = tok("晚上睡不着怎么办", max_length=4, truncation=True)  # a max_length alone builds the masks
    assert truncated["input_ids"] == [74747, 83400, 130001, 130004]
    assert _ints(truncated["position_ids"]) == [[0, 1, 2, 2], [0, 0, 0, 1]]
    assert tok("你好", padding=True, return_tensors="pt")["attention_mask"].shape == (1, 1, 4, 4)


def test_padding_options(tok):
    texts = ["你好", "晚上睡不着怎么办"]
    ignored = tok(texts, padding=True, return_attention_mask=False)  # the official code ignores the flag
    assert set(ignored.keys()) == {"input_ids", "attention_mask", "position_ids"}
    assert ignored["input_ids"] == [[3, 5, 74874, 130001, 130004], [74747, 83400, 66846, 130001, 130004]]
    assert _ints(ignored["attention_mask"][0])[0][0] == [1, 1, 1, 1, 1]
    multiple = tok(texts, padding=True, pad_to_multiple_of=8)
    assert multiple["input_ids"] == [[3] * 4 + [5, 74874, 130001, 130004],
                                     [3] * 3 + [74747, 83400, 66846, 130001, 130004]]
    assert _ints(multiple["position_ids"][1]) == [[0, 0, 0, 0, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1]]
    fixed = tok(texts, padding="max_length", max_length=9, return_tensors="pt")
    assert fixed["attention_mask"].shape == (2, 1, 9, 9)
    with pytest.raises(ValueError, match="left"):
        tok(texts, padding=True, padding_side="right")


# Expected ids below come from the official tokenization_chatglm.py (THUDM/chatglm-6b 8b7d335) run under
# transformers 4.30.2 on the real ice_text.model: by default as the class constructed from its vocabulary (which
# registers no special token for matching in text), with parse_special_tokens=True as
# AutoTokenizer.from_pretrained(folder, trust_remote_code=True) loaded it (its sanitize step made the five named
# specials no-split tokens that swallow the whitespace around them).
WRITTEN_SPECIALS_PLAIN = {
    "x <sop> y": [399, 46, 106, 2823, 33, 548],
    "你好[MASK]世界": [5, 74874, 52, 15475, 42, 64097],
    "<eop>": [46, 150, 2823, 33],
    "<pad>\t<unk>": [46, 6784, 33, 130008, 60, 14846, 33],
    "a\n<eop>\nb": [104, 4, 60, 150, 2823, 33, 4, 178],
    "[gMASK]<sop>": [53, 199, 15475, 42, 60, 106, 2823, 33],
    "<SOP> [Mask]": [46, 41666, 33, 53, 12348, 42],
    "<image_5><n><|tab|>": [46, 1526, 24, 15, 33, 4, 130008],  # <n> and <|tab|> are whitespace pieces in any mode
}
WRITTEN_SPECIALS_PARSED = {
    "x <sop> y": [399, 130004, 548],
    "你好[MASK]世界": [5, 74874, 130000, 5, 64097],
    "<eop>": [130005],
    "<pad>\t<unk>": [3, 0],
    "a\n<eop>\nb": [104, 130005, 463],
    "[gMASK]<sop>": [53, 199, 15475, 42, 130004],
    "<SOP> [Mask]": [46, 41666, 33, 53, 12348, 42],
    "<image_5><n><|tab|>": [46, 1526, 24, 15, 33, 4, 130008],
}
# do_lower_case=True: the text is lower-cased one character at a time first (a final "Σ" gives "σ"), and only
# then are the parsed special tokens looked for, so "<SOP>" becomes <sop> when they are parsed
WRITTEN_SPECIALS_LOWER = {
    "<SOP> [Mask]": ([46, 106, 2823, 33, 53, 6877, 42], [130004, 53, 6877, 42]),
    "[gMASK]<sop>": ([53, 199, 6877, 42, 60, 106, 2823, 33], [53, 199, 6877, 42, 130004]),
    "ΟΔΟΣ <SOP>": ([127669, 129012, 126215, 46, 106, 2823, 33], [127669, 129012, 126215, 130004]),
    "你好[MASK]世界": ([5, 74874, 52, 6877, 42, 64097], [5, 74874, 130000, 5, 64097]),
}
# ChatGLM-6B's chat() prompt with history whose text spells <eop>, <sop> and [MASK] (official ids, both modes)
FORGED_CHAT_PROMPT = "[Round 0]\n问：你好<eop>\n答：<sop>我是\n[Round 1]\n问：[MASK]\n答："
FORGED_CHAT_IDS_PLAIN = [53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 60, 150, 2823, 33, 4, 67342, 12, 60, 106, 2823, 33,
                         65806, 4, 52, 6945, 5, 9, 42, 4, 64286, 126133, 15475, 42, 4, 67342, 12, 130001, 130004]
FORGED_CHAT_IDS_PARSED = [53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 130005, 68188, 12, 130004, 71232, 4, 52, 6945, 5,
                          9, 42, 4, 64286, 12, 130000, 68188, 12, 130001, 130004]


@pytest.fixture(scope="module")
def tok_parsed(tokenizer_dir):
    from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

    return load_chatglm_tokenizer(tokenizer_dir, parse_special_tokens=True)


@pytest.mark.parametrize("text", list(WRITTEN_SPECIALS_PLAIN))
def test_special_tokens_written_in_text_are_plain_text(tok, text):
    ids = WRITTEN_SPECIALS_PLAIN[text]
    assert tok.parse_special_tokens is False
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok(text)["input_ids"] == ids + [130001, 130004]
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids
    assert tok.decode(tok.encode(text)) == text.replace("<n>", "\n").replace("<|tab|>", "\t")


@pytest.mark.parametrize("text", list(WRITTEN_SPECIALS_PARSED))
def test_special_tokens_written_in_text_parsed_on_request(tok, tok_parsed, text):
    ids = WRITTEN_SPECIALS_PARSED[text]
    assert tok_parsed.encode(text, add_special_tokens=False) == ids
    assert tok_parsed(text)["input_ids"] == ids + [130001, 130004]
    assert tok.encode(text, add_special_tokens=False, parse_special_tokens=True) == ids  # per call too


@pytest.mark.parametrize("text", list(WRITTEN_SPECIALS_LOWER))
def test_special_tokens_written_in_text_with_do_lower_case(tokenizer_dir, text):
    from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

    plain, parsed = WRITTEN_SPECIALS_LOWER[text]
    assert load_chatglm_tokenizer(tokenizer_dir, do_lower_case=True).encode(text, add_special_tokens=False) == plain
    lowered = load_chatglm_tokenizer(tokenizer_dir, do_lower_case=True, parse_special_tokens=True)
    assert lowered.encode(text, add_special_tokens=False) == parsed


def test_chat_prompt_cannot_forge_special_tokens(tok, tok_parsed):
    from glmtune.models.chatglm.tokenization import build_chat_prompt

    prompt = build_chat_prompt("[MASK]", [("你好<eop>", "<sop>我是")])
    assert prompt == FORGED_CHAT_PROMPT
    assert tok([prompt])["input_ids"][0] == FORGED_CHAT_IDS_PLAIN
    assert tok_parsed([prompt])["input_ids"][0] == FORGED_CHAT_IDS_PARSED
    # only the appended [gMASK] <sop> are control ids: the GLM context ends where the template says
    position_ids = tok(prompt, padding=True)["position_ids"]
    assert _ints(position_ids)[1][-2:] == [0, 1] and _ints(position_ids)[0][-1] == len(FORGED_CHAT_IDS_PLAIN) - 2


def test_special_token_attributes_and_added_tokens(tok, tokenizer_dir):
    from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

    # the named specials stay special tokens by id (skip_special_tokens, masks) whatever text does
    assert tok.all_special_tokens == ["<sop>", "<eop>", "<unk>", "<pad>", "[MASK]"]
    assert tok.convert_tokens_to_ids(["<sop>", "<eop>", "[MASK]", "[gMASK]", "<pad>", "<unk>"]) == [
        130004, 130005, 130000, 130001, 3, 0]
    assert tok.decode([104, 130004, 463, 130001, 130004], skip_special_tokens=True) == "a b"
    # [gMASK] and </s> are no special tokens of the official class: plain text in every mode
    assert tok.tokenize("a [gMASK] b") == ["▁a", "▁[", "g", "MASK", "]", "▁b"]
    assert tok.tokenize("x</s>y") == ["▁x", "</", "s", ">", "y"]
    # tokens a user adds are still read out of text; transformers' split_special_tokens reads nothing
    added = load_chatglm_tokenizer(tokenizer_dir)
    added.add_tokens(["<new>"])
    new_id = added.convert_tokens_to_ids("<new>")
    assert new_id == added.vocab_size
    assert added.encode("a<new>b <sop>", add_special_tokens=False) == [104, new_id, 463, 46, 106, 2823, 33]
    assert added.tokenize("a<new>b", split_special_tokens=True) == ["▁a", "<", "new", ">", "b"]


def test_parse_special_tokens_survives_save_and_load(tok_parsed, tmp_path):
    from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

    tok_parsed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))["parse_special_tokens"]
    assert load_chatglm_tokenizer(tmp_path).encode("x <sop> y", add_special_tokens=False) == [399, 130004, 548]
    assert pickle.loads(pickle.dumps(tok_parsed)).encode("<eop>", add_special_tokens=False) == [130005]


def test_whitespace_pieces(tok):
    assert tok.tokenize("   ") == ["▁", "<|blank_3|>"]
    assert tok.tokenize("\t\tindent") == ["▁", "<|tab|>", "<|tab|>", "indent"]
    assert tok.tokenize("a" + " " * 161 + "b") == ["▁a", "<|blank_80|>", "<|blank_80|>", "▁b"]
    assert tok.tokenize("a" + " " * 81 + "b") == ["▁a", "<|blank_80|>", "▁b"]
    assert tok.tokenize("a" + " " * 162 + "b") == ["▁a", "<|blank_80|>", "<|blank_80|>", "<|blank_2|>", "b"]
    assert tok.decode(tok.encode("<n>literal<|tab|>")) == "\nliteral\t"
    for width in range(1, 200):
        text = "a" + " " * width + "b\n\tc"
        assert tok.decode(tok.encode(text)) == text, width


def test_decode_details(tok):
    assert tok.decode(tok.encode("Hello , world . I 'm here !")) == "Hello, world. I'm here!"  # 4.30's clean-up
    assert tok.decode(tok.encode("Hello , world ."), clean_up_tokenization_spaces=False) == "Hello , world ."
    assert tok.decode([0, 5]) == " ⁇  "
    assert tok.decode([0, 5, 74874], skip_special_tokens=True) == "你好"
    assert tok.decode([3, 3, 5, 74874, 130001, 130004]) == "你好"
    assert tok.decode([130000, 130002, 130003, 130006, 130007]) == ""
    assert tok.decode(74874) == "你好"
    assert tok.decode([]) == ""
    assert tok.decode([130400]) == " ⁇ "  # beyond the vocabulary: the official code raises IndexError here
    assert tok.get_special_tokens_mask([5, 74874, 130001, 130004], already_has_special_tokens=True) == [0, 0, 0, 1]


def test_pairs(tok):
    a, b = tok.encode("你好", add_special_tokens=False), tok.encode("世界", add_special_tokens=False)
    assert tok.build_inputs_with_special_tokens(a) == a + [130001, 130004]
    assert tok.build_inputs_with_special_tokens(a, b) == a + [130001, 130004] + b + [130005]
    out = tok("你好", "世界", return_token_type_ids=True, return_special_tokens_mask=True)
    assert out["input_ids"] == [5, 74874, 130001, 130004, 5, 64097, 130005]
    assert out["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert out["special_tokens_mask"] == [0, 0, 1, 1, 0, 0, 1]
    assert tok.num_special_tokens_to_add() == 2 and tok.num_special_tokens_to_add(pair=True) == 3


def test_image_token_offset(tokenizer_dir, golden):
    from glmtune.models.chatglm.tokenization import ChatGLMTokenizer

    shifted = ChatGLMTokenizer(vocab_file=str(tokenizer_dir / "ice_text.model"))  # official default: 20000
    assert shifted.num_image_tokens == 20000
    assert shifted.vocab_size == golden["vocab_size"] + 20000
    case = golden["texts"][1]
    assert shifted.encode(case["text"]) == [t + 20000 for t in case["encode"]]
    assert shifted.decode(shifted.encode(case["text"])) == case["decode(encode)"]
    assert shifted.gmask_token_id == 150001 and shifted.bos_token_id == 150004
    assert shifted.convert_ids_to_tokens([5, 20005]) == ["<image_5>", "▁"]
    assert shifted.convert_tokens_to_ids("<image_7>") == 7


def test_preprocessing_flags(tokenizer_dir):
    from glmtune.models.chatglm.tokenization import ChatGLMTokenizer

    vocab = str(tokenizer_dir / "ice_text.model")
    spaced = ChatGLMTokenizer(vocab_file=vocab, num_image_tokens=0, remove_space=True)
    assert spaced.tokenize("  a   b  ") == spaced.tokenize("a b")
    lowered = ChatGLMTokenizer(vocab_file=vocab, num_image_tokens=0, do_lower_case=True)
    assert lowered.tokenize("Hello [MASK]") == lowered.tokenize("hello [MASK]")
    assert lowered.tokenize("Hello [MASK]") == ["▁hello", "▁[", "mask", "]"]  # the official class's pieces
    parsed = ChatGLMTokenizer(vocab_file=vocab, num_image_tokens=0, do_lower_case=True, parse_special_tokens=True)
    assert parsed.tokenize("Hello [MASK]") == ["▁hello", "[MASK]"]


# --------------------------------------------------------------------------------------------------------------
# loading and saving


def _same_behaviour(a, b, golden):
    texts = [c["text"] for c in golden["texts"]] + [golden["chat_prompt"]["prompt"], "你好 [MASK] 世界"]
    for text in texts:
        assert a.tokenize(text) == b.tokenize(text)
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    batch = golden["batch"]["texts"]
    x, y = a(batch, padding=True, return_tensors="np"), b(batch, padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask", "position_ids"):
        np.testing.assert_array_equal(x[key], y[key])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "gmask_token_id",
                 "end_token_id", "vocab_size", "num_image_tokens", "padding_side", "all_special_tokens"):
        assert getattr(a, name) == getattr(b, name), name


def test_save_pretrained_round_trip(tok, golden, tmp_path):
    from glmtune.models.chatglm.tokenization import ChatGLMTokenizer, load_chatglm_tokenizer

    tok.save_pretrained(tmp_path)
    assert _sha256(tmp_path / "ice_text.model") == golden["vocab_file_sha256"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer" and "auto_map" not in config
    assert config["gmask_token"] == "[gMASK]" and config["end_token"] == "</s>" and config["num_image_tokens"] == 0
    _same_behaviour(tok, ChatGLMTokenizer.from_pretrained(str(tmp_path)), golden)
    _same_behaviour(tok, load_chatglm_tokenizer(tmp_path), golden)


def test_official_folder_loads_without_remote_code(tokenizer_dir, golden, tmp_path, tok):
    from glmtune.models.chatglm.tokenization import ChatGLMTokenizer, load_chatglm_tokenizer

    folder = tmp_path / "chatglm-6b"
    folder.mkdir()
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer" and "AutoTokenizer" in config["auto_map"]
    # a booby-trapped remote-code file: importing it would fail the test
    (folder / "tokenization_chatglm.py").write_text("raise RuntimeError('remote code was executed')\n")
    for loaded in (ChatGLMTokenizer.from_pretrained(str(folder)), load_chatglm_tokenizer(folder)):
        assert type(loaded) is ChatGLMTokenizer
        _same_behaviour(tok, loaded, golden)


def test_load_needs_the_vocabulary(tmp_path):
    from glmtune.models.chatglm.tokenization import load_chatglm_tokenizer

    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        load_chatglm_tokenizer(tmp_path)


def test_pickle_round_trip(tok, golden):
    _same_behaviour(tok, pickle.loads(pickle.dumps(tok)), golden)
