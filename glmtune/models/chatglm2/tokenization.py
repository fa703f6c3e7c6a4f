"""Tokenizers for ChatGLM2-6B and ChatGLM3-6B, written for transformers 5.x (no remote code, no checkpoint .py files).

They reproduce what the official tokenizers produce (THUDM/chatglm2-6b 8fd7fba2 and THUDM/chatglm3-6b 456aa875,
run on transformers 4.30). Both families read the same ``tokenizer.model``:

* Text goes straight to SentencePiece (byte fallback, a dummy-prefix ``▁``); no whitespace rewriting.
* Ids 0..64788 are the SentencePiece pieces (``<unk>`` 0, which is also the pad id, ``<s>`` 1, ``</s>`` 2 = eos).
  Command tokens follow: ``[MASK]`` 64789, ``[gMASK]`` 64790, ``[sMASK]`` 64791, ``sop`` 64792, ``eop`` 64793, and
  for ChatGLM3 the role tokens ``<|system|>`` 64794, ``<|user|>``, ``<|assistant|>``, ``<|observation|>`` 64797.
  ``vocab_size`` is 64794 (ChatGLM2) or 64798 (ChatGLM3). ``bos_token`` is unset, as in the official classes;
  ``get_command("<bos>")`` is 1.
* Written in text, none of these names is a token: ``"</s>"`` or ``"[gMASK]"`` are split like any text (the official
  classes register no special token with transformers). Only ChatGLM3 with ``encode_special_tokens=True`` reads
  the four role tokens out of text. Special tokens go in by id (``get_command``, ``convert_tokens_to_ids``).
* ``build_inputs_with_special_tokens``: ``[gMASK, sop] + a``, pairs ``[gMASK, sop] + a + b + [eos]``.
* Padding is on the left with id 0. Every encoding (padded or not, whatever ``return_attention_mask`` says, as
  the official ``_pad``) carries a 1D ``attention_mask`` (1 = token, 0 = pad) and ``position_ids`` (pads 0, tokens
  0, 1, 2, ...); ready-made ones are kept and padded.
* Decoding drops ids 0, 1 and 2 and hands the rest to SentencePiece as pieces; ChatGLM2 drops its command tokens
  too, ChatGLM3 writes them out (``"[gMASK]sop 你好"``), which its ``chat()`` relies on to split answers at
  ``<|assistant|>``. No clean-up of tokenization spaces. Tokens a user adds (``add_tokens``) are cut out of text and
  decode as literal text, runs of pieces decoded apart and joined by spaces, as transformers 4.30 did.
* ChatGLM3 conversations: ``build_chat_input`` as the official; ``chatglm3_stop_ids`` the official ``chat()`` stop
  ids. ChatGLM2's prompt text: ``build_chat_prompt``. (The official fine-tuning labels, the oracle glmtune's
  ChatGLM3 template is tested against, live in tests/chatglm_oracles.py.)

Deliberate differences (the official outputs there were broken or raised): ``skip_special_tokens=True`` drops the
command and role tokens (the official flag had no effect); ``convert_ids_to_tokens`` names every id (``<unk>``,
``[gMASK]``, ...; the official gave ``""`` for several) and ``get_vocab()`` is a proper table of ``vocab_size``
entries; ``unk_token_id`` is 0 (officially None); pair ``token_type_ids`` and ``special_tokens_mask`` have the
sequence's length; ids past the vocabulary decode as nothing (ChatGLM2 raised IndexError); a right padding side
raises ValueError when padding is asked for (the official code padded left anyway or failed an assert);
``token_type_ids`` and ``special_tokens_mask`` are padded along with the ids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import PaddingStrategy

from glmtune.models.added_tokens import split_on_added_tokens

__all__ = [
    "CHATGLM2_COMMANDS",
    "CHATGLM3_ROLES",
    "VOCAB_FILE_NAME",
    "ChatGLM2Tokenizer",
    "ChatGLM3Tokenizer",
    "GLMSentencePieceTokenizer",
    "build_chat_prompt",
    "chatglm3_message_parts",
    "chatglm3_stop_ids",
    "guess_family",
    "left_pad_features",
    "load_chatglm2_tokenizer",
]

VOCAB_FILE_NAME = "tokenizer.model"
CHATGLM2_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in CHATGLM3_ROLES)
_NAMED_IDS = ("<bos>", "<eos>", "<pad>")  # get_command names for SentencePiece's own ids


# ----------------------------------------------------------------------------------------------------------------
# prompts


def build_chat_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
    """The prompt text ChatGLM2-6B's `chat()` tokenizes: `[Round i]` blocks numbered from 1, blank lines between."""
    rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history or (), start=1)]
    return "".join(rounds) + f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："


# ----------------------------------------------------------------------------------------------------------------
# left padding with 1D masks and positions (what the official `_pad` builds)


def _as_id_list(input_ids: Iterable[Any]) -> list[int]:
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    return [int(i) for i in input_ids]


def _round_up(length: int, multiple: int | None) -> int:
    if multiple and length % multiple:
        return (length // multiple + 1) * multiple
    return length


def left_pad_features(
    features: Mapping[str, Any], length: int, *, pad_id: int = 0, pad_token_type_id: int = 0, key: str = "input_ids"
) -> dict[str, Any]:
    """One sequence's features with `attention_mask` (all 1) and `position_ids` (0, 1, ...) added when absent
    (kept when given), left-padded to `length` (never shortened): pad ids, mask 0, position 0."""
    out = dict(features)
    ids = _as_id_list(out[key])
    if "attention_mask" not in out:
        out["attention_mask"] = [1] * len(ids)
    if "position_ids" not in out:
        out["position_ids"] = list(range(len(ids)))
    extra = length - len(ids)
    if extra > 0:
        out["attention_mask"] = [0] * extra + _as_id_list(out["attention_mask"])
        out["position_ids"] = [0] * extra + _as_id_list(out["position_ids"])
        if "token_type_ids" in out:
            out["token_type_ids"] = [pad_token_type_id] * extra + _as_id_list(out["token_type_ids"])
        if "special_tokens_mask" in out:
            out["special_tokens_mask"] = [1] * extra + _as_id_list(out["special_tokens_mask"])
        out[key] = [pad_id] * extra + ids
    return out


# ----------------------------------------------------------------------------------------------------------------
# vocabulary


class _GLMVocab:
    """`tokenizer.model` with the command tokens numbered after its pieces."""

    def __init__(self, model_file: str, commands: Sequence[str]):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.piece_count = self.sp.get_piece_size()
        self.commands = {token: self.piece_count + i for i, token in enumerate(commands)}
        self.command_names = {i: token for token, i in self.commands.items()}
        # ids the official decode blanks out: pad/unk, bos and eos
        self.silent = {self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()}

    def __len__(self) -> int:
        return self.piece_count + len(self.commands)

    def token_to_id(self, token: str) -> int:
        if token in self.commands:
            return self.commands[token]
        return self.sp.piece_to_id(token)  # unknown pieces read as <unk> (0)

    def id_to_token(self, index: int) -> str | None:
        if index in self.command_names:
            return self.command_names[index]
        if 0 <= index < self.piece_count:
            return self.sp.id_to_piece(index)
        return None

    def table(self) -> dict[str, int]:
        table = {self.sp.id_to_piece(i): i for i in range(self.piece_count)}
        table.update(self.commands)
        return table


# ----------------------------------------------------------------------------------------------------------------
# the tokenizers


class GLMSentencePieceTokenizer(PreTrainedTokenizer):
    """What ChatGLM2-6B and ChatGLM3-6B share; see the module docstring. Use the family classes below."""

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"
    family = ""
    command_tokens: tuple[str, ...] = CHATGLM2_COMMANDS
    writes_commands = False  # decode shows command tokens as text (ChatGLM3) or drops them (ChatGLM2)

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<unk>",
        **kwargs: Any,
    ) -> None:
        for key in ("auto_map", "tokenizer_class", "is_local", "local_files_only"):  # loading details, not saved
            kwargs.pop(key, None)
        # the command tokens are registered as special (skip_special_tokens drops them), after any the caller adds
        extra = list(kwargs.pop("extra_special_tokens", None) or []) + list(
            kwargs.pop("additional_special_tokens", None) or [])
        extra = [t for i, t in enumerate(extra) if str(t) not in self.command_tokens and t not in extra[:i]]
        self.vocab_file = str(vocab_file)
        self._vocab = _GLMVocab(self.vocab_file, self.command_tokens)
        self._vocab_table: dict[str, int] | None = None
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            extra_special_tokens=list(self.command_tokens) + list(extra),
            **kwargs,
        )

    # -- pickling (datasets hashes and ships tokenizers between processes) ------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_vocab"] = None
        state["_vocab_table"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_vocab"] = _GLMVocab(state["vocab_file"], type(self).command_tokens)

    # -- ids ---------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab_table is None:
            self._vocab_table = self._vocab.table()
        vocab = dict(self._vocab_table)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        """The id of a command token (`[gMASK]`, `sop`, ...) or of `<bos>`, `<eos>`, `<pad>`, as the official."""
        named = {"<bos>": self._vocab.sp.bos_id(), "<eos>": self._vocab.sp.eos_id(), "<pad>": self._vocab.sp.unk_id()}
        if token in named:
            return named[token]
        if token not in self._vocab.commands:
            raise ValueError(f"{token!r} is not a command token of the {self.family} tokenizer "
                             f"(it has {', '.join(_NAMED_IDS + tuple(self._vocab.commands))})")
        return self._vocab.commands[token]

    @property
    def gmask_token_id(self) -> int:
        return self.get_command("[gMASK]")

    @property
    def sop_token_id(self) -> int:
        """`sop`, the second token of every prompt."""
        return self.get_command("sop")

    @property
    def eop_token_id(self) -> int:
        return self.get_command("eop")

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a generated answer in the official `chat()`."""
        return [self.eos_token_id]

    def get_prefix_tokens(self) -> list[int]:
        return [self.gmask_token_id, self.sop_token_id]

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        token = self._vocab.id_to_token(int(index))
        return str(self.unk_token) if token is None else token

    def encode_text(self, text: str) -> list[int]:
        """SentencePiece's ids for `text` alone: no prefix, never a role token (as the official chat builders)."""
        return self._vocab.sp.encode(text)

    # -- text ----------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # Only tokens added by the user (beyond the vocabulary) are cut out of text; the vocabulary's own and the
        # command names stay plain text, as with the official classes.
        kwargs.pop("split_special_tokens", None)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        added = {tok.content: tok for idx, tok in self._added_tokens_decoder.items() if idx >= self.vocab_size}
        return split_on_added_tokens(text, added, lambda chunk: self._tokenize(chunk, **kwargs))

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._vocab.sp.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._vocab.sp.decode_pieces([str(t) for t in tokens])

    def _decode_piece(self, index: int) -> str:
        """The piece the official decode hands SentencePiece for `index` ('' for nothing)."""
        if index in self._vocab.silent:
            return ""
        if index in self._vocab.command_names:
            return self._vocab.command_names[index] if self.writes_commands else ""
        if 0 <= index < self._vocab.piece_count:
            return self._vocab.sp.id_to_piece(index)
        return ""

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        # tokens added beyond the vocabulary are literal text between separately decoded runs of pieces
        parts: list[str] = []
        run: list[str] = []
        for index in (int(t) for t in token_ids):
            if index in skip:
                continue
            added = self._added_tokens_decoder.get(index) if index >= self.vocab_size else None
            if added is None:
                run.append(self._decode_piece(index))
                continue
            if run:
                parts.append(self._vocab.sp.decode_pieces(run))
                run = []
            parts.append(added.content)
        if run or not parts:
            parts.append(self._vocab.sp.decode_pieces(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # -- special tokens --------------------------------------------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        types = [0] * (len(token_ids_0) + 2)
        if token_ids_1 is not None:
            types += [1] * (len(token_ids_1) + 1)
        return types

    # -- padding ---------------------------------------------------------------------------------------------------

    def _pad(
        self,
        encoded_inputs: dict[str, Any],
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict[str, Any]:
        # return_attention_mask is ignored on purpose: the official `_pad` always adds the mask and positions
        key = self.model_input_names[0]
        length = len(encoded_inputs[key])
        if padding_strategy != PaddingStrategy.DO_NOT_PAD:
            if (padding_side or self.padding_side) != "left":
                raise ValueError(f"the {self.family} tokenizer pads on the left only (padding_side='left'); its "
                                 "position ids are built for left padding")
            if padding_strategy == PaddingStrategy.LONGEST:
                max_length = length
            if max_length is not None:
                length = max(length, _round_up(max_length, pad_to_multiple_of))
        return left_pad_features(encoded_inputs, length, pad_id=self.pad_token_id,
                                 pad_token_type_id=self.pad_token_type_id, key=key)

    # -- saving ------------------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(target):
                shutil.copyfile(self.vocab_file, target)
        else:
            with open(target, "wb") as f:
                f.write(self._vocab.sp.serialized_model_proto())
        return (target,)


class ChatGLM2Tokenizer(GLMSentencePieceTokenizer):
    """ChatGLM2-6B's tokenizer: command tokens `[MASK]`..`eop`, decoded as nothing."""

    family = "chatglm2"

    def build_prompt(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
        return build_chat_prompt(query, history)


class ChatGLM3Tokenizer(GLMSentencePieceTokenizer):
    """ChatGLM3-6B's tokenizer: ChatGLM2's plus four role tokens; command tokens decode as their names."""

    family = "chatglm3"
    command_tokens = CHATGLM2_COMMANDS + ROLE_TOKENS
    writes_commands = True
    _ROLE_TOKEN_PATTERN = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))

    def __init__(self, vocab_file: str, encode_special_tokens: bool = False, **kwargs: Any) -> None:
        self.encode_special_tokens = bool(encode_special_tokens)
        super().__init__(vocab_file, encode_special_tokens=self.encode_special_tokens, **kwargs)

    @property
    def stop_token_ids(self) -> list[int]:
        return chatglm3_stop_ids(self)

    def role_token_id(self, role: str) -> int:
        if role not in CHATGLM3_ROLES:
            raise ValueError(f"ChatGLM3 roles are {', '.join(CHATGLM3_ROLES)}; got {role!r}")
        return self.get_command(f"<|{role}|>")

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        encode_special = kwargs.get("encode_special_tokens", self.encode_special_tokens)
        if not encode_special:
            return super()._tokenize(text)
        pieces: list[str] = []
        start = 0
        for match in self._ROLE_TOKEN_PATTERN.finditer(text):
            if match.start() > start:
                pieces.extend(super()._tokenize(text[start:match.start()]))
            pieces.append(match.group(0))
            start = match.end()
        if start < len(text):
            pieces.extend(super()._tokenize(text[start:]))
        return pieces

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """One message: its role token, the metadata line and the text, each part encoded on its own."""
        return [self.role_token_id(role)] + self.encode_text(f"{metadata}\n") + self.encode_text(message)

    def build_chat_input(
        self, query: str, history: Sequence[Mapping[str, Any]] | None = None, role: str = "user",
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """The official `chat()` input: `[gMASK] sop`, the history, the query as `role`, then `<|assistant|>`;
        with `attention_mask` and `position_ids` (tensors as the official, unless `return_tensors` says otherwise)."""
        ids = self.get_prefix_tokens()
        for message in list(history or []) + [{"role": role, "content": query}]:
            ids += self.build_single_message(*chatglm3_message_parts(message))
        ids.append(self.role_token_id("assistant"))
        return self.pad({"input_ids": [ids]}, padding=False, return_tensors=return_tensors)


def _message_field(message: Any, name: str, default: Any = None) -> Any:
    if isinstance(message, Mapping):
        return message.get(name, default)
    return getattr(message, name, default)


def chatglm3_message_parts(message: Any) -> tuple[str, str, str]:
    """(role, metadata, content) of a history message (a mapping or an object), as the official
    `build_chat_input` reads it: a system message's `tools` go after its content as indented JSON."""
    role = _message_field(message, "role")
    content = _message_field(message, "content", "") or ""
    tools = _message_field(message, "tools")
    has_tools = "tools" in message if isinstance(message, Mapping) else tools is not None
    if role == "system" and has_tools:
        content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    return role, _message_field(message, "metadata", "") or "", content


def chatglm3_stop_ids(tokenizer: GLMSentencePieceTokenizer) -> list[int]:
    """The ids that end a ChatGLM3 answer in the official `chat()`: eos, `<|user|>` and `<|observation|>`."""
    return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]


# ----------------------------------------------------------------------------------------------------------------
# loading

TOKENIZER_CLASSES: dict[str, type[GLMSentencePieceTokenizer]] = {
    "chatglm2": ChatGLM2Tokenizer,
    "chatglm3": ChatGLM3Tokenizer,
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def guess_family(folder: str | os.PathLike) -> str:
    """'chatglm3' or 'chatglm2' from a checkpoint folder's tokenizer_config.json / config.json / name."""
    path = Path(folder)
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    saved_class = tokenizer_config.get("tokenizer_class")
    if saved_class == ChatGLM3Tokenizer.__name__ or "encode_special_tokens" in tokenizer_config:
        return "chatglm3"
    if saved_class == ChatGLM2Tokenizer.__name__:
        return "chatglm2"
    names = " ".join(str(x) for x in (tokenizer_config.get("name_or_path"),
                                      _read_json(path / "config.json").get("_name_or_path"), path.resolve().name))
    return "chatglm3" if "chatglm3" in names.lower() else "chatglm2"


def load_chatglm2_tokenizer(
    folder: str | os.PathLike, family: str | None = None, **kwargs: Any
) -> ChatGLM2Tokenizer | ChatGLM3Tokenizer:
    """The tokenizer of a ChatGLM2-6B (`family="chatglm2"`) or ChatGLM3-6B (`"chatglm3"`) checkpoint folder:
    `tokenizer.model` + optional `tokenizer_config.json`, whose `tokenizer_class` and `auto_map` are ignored; nothing
    from the folder is imported or executed. `family=None` guesses it (`guess_family`). `kwargs` override config
    values. Raises FileNotFoundError without `tokenizer.model`, ValueError for another family."""
    path = Path(folder)
    if not (path / VOCAB_FILE_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {VOCAB_FILE_NAME}, the ChatGLM2/3-6B tokenizer's vocabulary")
    family = family or guess_family(path)
    if family not in TOKENIZER_CLASSES:
        raise ValueError(f"family must be one of {', '.join(TOKENIZER_CLASSES)}; got {family!r}")
    kwargs.setdefault("local_files_only", True)
    return TOKENIZER_CLASSES[family].from_pretrained(str(path), **kwargs)
