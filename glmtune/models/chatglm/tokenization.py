"""Tokenizer for ChatGLM-6B (v1), written for transformers 5.x (no remote code, no checkpoint .py files).

It reproduces what the THUDM/chatglm-6b tokenizer produces (repo commit 8b7d335, run on transformers 4.30):

* Text is rewritten before SentencePiece sees it: a newline becomes the piece ``<n>``, a tab ``<|tab|>``, and every
  run of 2..80 spaces ``<|blank_N|>`` (longer runs are cut into 80-space pieces from the left; a single space left
  over stays a space).  Decoding undoes this.  ``remove_space`` and ``do_lower_case`` act on each text segment first.
* The vocabulary is ``ice_text.model``; ids are shifted by ``num_image_tokens`` (the official default is 20000, the
  released tokenizer_config.json sets 0), ids below the shift read as ``<image_N>``.
* ``build_inputs_with_special_tokens``: ``a + [gMASK, <sop>]``, pairs ``a + [gMASK, <sop>] + b + [<eop>]``.
* The named special tokens are ``<sop>`` (bos), ``<eop>`` (eos), ``<unk>``, ``<pad>`` and ``[MASK]``.  Written in
  text they are plain text by default, as with the official class constructed from its vocabulary: ``"<sop>"``
  becomes ``▁< s op >``, never id 130004, so text cannot place a ``<sop>`` (which moves the GLM attention boundary
  and the 2D positions).  ``parse_special_tokens=True`` gives what the official tokenizer did when loaded with
  ``AutoTokenizer.from_pretrained`` under transformers 4.30: those five become their ids and swallow all whitespace
  on both sides (with ``do_lower_case``, ``<SOP>`` too, as text is lower-cased first).  ``[gMASK]``, ``</s>``,
  ``[sMASK]``, ``<ENC>`` ... are never special, so written in text they are always plain text.  Tokens a user adds
  (``add_tokens``) are cut out of text either way; transformers' ``split_special_tokens=True`` cuts out nothing.
* Padding is on the left only.  Whenever a length is asked for (``padding=True``, ``padding="max_length"``, or a
  ``max_length``), the output holds, per sequence, a bool attention mask ``[1, L, L]`` (True = masked: every row
  sees the whole context before ``<sop>``, causal from ``<sop>`` on, added pad rows/columns masked) and 2D position
  ids ``[2, L]`` (row 0 positions, everything from ``<sop>`` on at the index of ``[MASK]``, else ``[gMASK]``; row 1
  block positions 0 on the context, 1, 2, ... from ``<sop>``; added pads get 0).  ``return_attention_mask=False``
  does not remove them (the official code ignores it).  Without padding and without a length, only ``input_ids``.
* Decoding drops ``<pad>`` ids, lets SentencePiece drop the control pieces ([MASK], [gMASK], <sop>, <eop>, ...) and
  cleans up tokenization spaces by default (``" ,"`` -> ``","``), as transformers 4.30 did.

Deliberate differences (the official outputs there were broken or raised): pair ``token_type_ids`` and
``special_tokens_mask`` have the sequence's length; ids outside the vocabulary decode as ``<unk>`` instead of
raising; a right padding side raises ``ValueError`` only when padding or masks are actually requested.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken
from transformers.utils import PaddingStrategy

from glmtune.models.added_tokens import split_on_added_tokens

__all__ = [
    "VOCAB_FILE_NAME",
    "ChatGLMTokenizer",
    "build_chat_prompt",
    "encode_whitespace",
    "fill_glm_features",
    "glm_attention_mask",
    "glm_position_ids",
    "load_chatglm_tokenizer",
    "official_masks",
    "restore_whitespace",
]

VOCAB_FILE_NAME = "ice_text.model"
MAX_BLANK_LENGTH = 80
DEFAULT_NUM_IMAGE_TOKENS = 20000  # the official constructor default; the released checkpoint's config says 0
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"

_SPACE_RUN = re.compile(" {2,}")
_WHITESPACE_PIECE = re.compile(r"<n>|<\|tab\|>|<\|blank_([1-9][0-9]*)\|>")
_IMAGE_TOKEN = re.compile(r"<image_([0-9]+)>")


# ----------------------------------------------------------------------------------------------------------------
# text <-> SentencePiece input


def blank_piece(width: int) -> str:
    """The piece standing for `width` (2..80) spaces."""
    return f"<|blank_{width}|>"


def _spaces_to_pieces(width: int, max_blank: int) -> str:
    full, rest = divmod(width, max_blank)
    tail = blank_piece(rest) if rest >= 2 else " " * rest
    return blank_piece(max_blank) * full + tail


def encode_whitespace(text: str, max_blank: int = MAX_BLANK_LENGTH) -> str:
    """Newlines, tabs and runs of spaces rewritten as the pieces ChatGLM-6B's vocabulary has for them."""
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
    return _SPACE_RUN.sub(lambda m: _spaces_to_pieces(len(m.group(0)), max_blank), text)


def restore_whitespace(text: str, max_blank: int = MAX_BLANK_LENGTH) -> str:
    """The inverse of `encode_whitespace` on decoded text (blank pieces wider than `max_blank` are kept as text)."""

    def expand(m: re.Match) -> str:
        piece = m.group(0)
        if piece == NEWLINE_PIECE:
            return "\n"
        if piece == TAB_PIECE:
            return "\t"
        width = int(m.group(1))
        return " " * width if 2 <= width <= max_blank else piece

    return _WHITESPACE_PIECE.sub(expand, text)


def build_chat_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
    """The prompt ChatGLM-6B's `chat()` tokenizes: the bare query, or numbered rounds when there is history."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


# ----------------------------------------------------------------------------------------------------------------
# GLM attention masks and 2D position ids (what the official `_pad` builds)


def _as_id_list(input_ids: Iterable[Any]) -> list[int]:
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    return [int(i) for i in input_ids]


def _context_length(ids: list[int], bos_id: int) -> int:
    return ids.index(bos_id) if bos_id in ids else len(ids)


def glm_attention_mask(input_ids: Iterable[Any], *, bos_id: int) -> np.ndarray:
    """`[1, n, n]` bool, True = masked: full visibility over the context before `<sop>`, causal from `<sop>` on."""
    ids = _as_id_list(input_ids)
    n = len(ids)
    visible = np.tril(np.ones((n, n), dtype=bool))
    visible[:, : _context_length(ids, bos_id)] = True
    return ~visible[None]


def glm_position_ids(input_ids: Iterable[Any], *, bos_id: int, mask_id: int, gmask_id: int) -> np.ndarray:
    """`[2, n]` int64: row 0 token positions (from `<sop>` on: the index of `[MASK]`, else of `[gMASK]`, if present),
    row 1 block positions (0 on the context, 1, 2, ... from `<sop>`)."""
    ids = _as_id_list(input_ids)
    n = len(ids)
    context = _context_length(ids, bos_id)
    positions = np.arange(n, dtype=np.int64)
    anchor = mask_id if mask_id in ids else gmask_id
    if anchor in ids:
        positions[context:] = ids.index(anchor)
    blocks = np.zeros(n, dtype=np.int64)
    blocks[context:] = np.arange(1, n - context + 1, dtype=np.int64)
    return np.stack([positions, blocks])


def fill_glm_features(
    features: Mapping[str, Any],
    length: int,
    *,
    bos_id: int,
    mask_id: int,
    gmask_id: int,
    pad_id: int,
    pad_token_type_id: int = 0,
    key: str = "input_ids",
) -> dict[str, Any]:
    """One sequence's features with the GLM mask and position ids added (kept if already there) and left-padded
    to `length` (never shortened). Pad rows/columns of the mask are True (masked), pad positions are 0."""
    out = dict(features)
    ids = _as_id_list(out[key])
    mask = out.get("attention_mask")
    if mask is None or np.ndim(mask) != 3:  # absent, or a plain 0/1 list from elsewhere: build the GLM one
        out["attention_mask"] = glm_attention_mask(ids, bos_id=bos_id)
    positions = out.get("position_ids")
    if positions is None or np.ndim(positions) != 2:
        out["position_ids"] = glm_position_ids(ids, bos_id=bos_id, mask_id=mask_id, gmask_id=gmask_id)
    extra = length - len(ids)
    if extra > 0:
        out["attention_mask"] = np.pad(np.asarray(out["attention_mask"], dtype=bool),
                                       ((0, 0), (extra, 0), (extra, 0)), constant_values=True)
        out["position_ids"] = np.pad(np.asarray(out["position_ids"], dtype=np.int64), ((0, 0), (extra, 0)))
        if "token_type_ids" in out:
            out["token_type_ids"] = [pad_token_type_id] * extra + list(out["token_type_ids"])
        if "special_tokens_mask" in out:
            out["special_tokens_mask"] = [1] * extra + list(out["special_tokens_mask"])
        out[key] = [pad_id] * extra + ids
    return out


def _round_up(length: int, multiple: int | None) -> int:
    if multiple and length % multiple:
        return (length // multiple + 1) * multiple
    return length


def official_masks(
    input_ids_list: Iterable[Iterable[Any]],
    *,
    bos_id: int,
    mask_id: int,
    gmask_id: int,
    pad_id: int,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-pad a batch of token id lists the way ChatGLM-6B's tokenizer does and build its masks.

    Returns `input_ids` int64 `[B, L]`, `attention_mask` bool `[B, 1, L, L]` (True = masked) and `position_ids`
    int64 `[B, 2, L]`. L is the longest sequence (or `max_length`), rounded up to `pad_to_multiple_of`. Pad ids
    already inside a sequence are treated as ordinary tokens, as the official code does.
    """
    sequences = [_as_id_list(s) for s in input_ids_list]
    longest = max((len(s) for s in sequences), default=0)
    length = _round_up(longest if max_length is None else max_length, pad_to_multiple_of)
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit max_length={length}")
    rows = [fill_glm_features({"input_ids": s}, length, bos_id=bos_id, mask_id=mask_id, gmask_id=gmask_id,
                              pad_id=pad_id) for s in sequences]
    if not rows:
        return {"input_ids": np.zeros((0, length), dtype=np.int64),
                "attention_mask": np.zeros((0, 1, length, length), dtype=bool),
                "position_ids": np.zeros((0, 2, length), dtype=np.int64)}
    return {
        "input_ids": np.asarray([r["input_ids"] for r in rows], dtype=np.int64),
        "attention_mask": np.stack([r["attention_mask"] for r in rows]),
        "position_ids": np.stack([r["position_ids"] for r in rows]),
    }


# ----------------------------------------------------------------------------------------------------------------
# vocabulary


class _IceTextVocab:
    """`ice_text.model` with the block of image-token ids in front of the text ids."""

    def __init__(self, model_file: str, num_image_tokens: int):
        import sentencepiece as spm

        self.model_file = model_file
        self.offset = int(num_image_tokens)
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.text_size = self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.offset + self.text_size

    def has_piece(self, piece: str) -> bool:
        return self.sp.piece_to_id(piece) != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id())

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def text(self, pieces: list[str]) -> str:
        return self.sp.decode_pieces(pieces)

    def token_to_id(self, token: str) -> int:
        m = _IMAGE_TOKEN.fullmatch(token)
        if m:  # the official lookup reads <image_N> as N whatever the offset
            return int(m.group(1))
        return self.sp.piece_to_id(token) + self.offset

    def id_to_token(self, index: int) -> str | None:
        """The piece for `index`, or None outside the vocabulary."""
        if 0 <= index < self.offset:
            return f"<image_{index}>"
        if self.offset <= index < len(self):
            return self.sp.id_to_piece(index - self.offset)
        return None

    def table(self) -> dict[str, int]:
        table = {f"<image_{i}>": i for i in range(self.offset)}
        table.update({self.sp.id_to_piece(i): i + self.offset for i in range(self.text_size)})
        return table


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B (v1) tokenizer on transformers' Python tokenizer base; see the module docstring for behaviour."""

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str | AddedToken = "<sop>",
        eos_token: str | AddedToken = "<eop>",
        end_token: str = "</s>",
        mask_token: str | AddedToken = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str | AddedToken = "<pad>",
        unk_token: str | AddedToken = "<unk>",
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        parse_special_tokens: bool = False,
        **kwargs: Any,
    ) -> None:
        # transformers 5 hands unknown *_token config keys over in one dict; ours are plain attributes
        extra_named = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        gmask_token = str(extra_named.pop("gmask_token", gmask_token))
        end_token = str(extra_named.pop("end_token", end_token))
        if extra_named:
            kwargs["model_specific_special_tokens"] = extra_named
        for remote_key in ("auto_map", "tokenizer_class"):  # never acted on, never saved again
            kwargs.pop(remote_key, None)
        kwargs.setdefault("clean_up_tokenization_spaces", True)  # the default of the transformers the original ran on

        self.vocab_file = str(vocab_file)
        self.do_lower_case = bool(do_lower_case)
        self.remove_space = bool(remove_space)
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = MAX_BLANK_LENGTH
        self.gmask_token = gmask_token
        self.end_token = end_token
        self._vocab = _IceTextVocab(self.vocab_file, self.num_image_tokens)
        self._vocab_table: dict[str, int] | None = None

        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
                 "mask_token": mask_token}
        # Register the named specials that the vocabulary holds at their own ids, stripping the spaces around them
        # when written in text (what plain-string special tokens did in the transformers the original ran on).
        self._added_tokens_decoder = {}
        for token in named.values():
            if token is None or not self._vocab.has_piece(str(token)):
                continue
            if not isinstance(token, AddedToken):
                token = AddedToken(str(token), lstrip=True, rstrip=True, normalized=False, special=True)
            self._added_tokens_decoder[self._vocab.token_to_id(str(token))] = token
        # The official class never registers its named specials for matching in text; only from_pretrained's
        # sanitize step (transformers 4.30) did. They are read out of text only with parse_special_tokens.
        self.parse_special_tokens = bool(parse_special_tokens)
        self._named_special_texts = frozenset(str(t) for t in named.values() if t is not None)

        super().__init__(
            do_lower_case=self.do_lower_case,
            remove_space=self.remove_space,
            num_image_tokens=self.num_image_tokens,
            parse_special_tokens=self.parse_special_tokens,
            padding_side=padding_side,
            **named,
            **kwargs,
        )
        self.init_kwargs["gmask_token"] = gmask_token  # saved by save_pretrained, read back by from_pretrained
        self.init_kwargs["end_token"] = end_token

    # -- pickling (datasets hashes and ships tokenizers between processes) ------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_vocab"] = None
        state["_vocab_table"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_vocab"] = _IceTextVocab(state["vocab_file"], state["num_image_tokens"])

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

    @property
    def gmask_token_id(self) -> int | None:
        return None if self.gmask_token is None else self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self) -> int | None:
        return None if self.end_token is None else self.convert_tokens_to_ids(self.end_token)

    @property
    def sop_token_id(self) -> int | None:
        """`<sop>`, the token that starts the generated part (ChatGLM-6B's bos)."""
        return self.bos_token_id

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        token = self._vocab.id_to_token(int(index))
        return str(self.unk_token) if token is None else token

    # -- text ----------------------------------------------------------------------------------------------------

    def preprocess_text(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def _matched_tokens(self, parse_special_tokens: bool) -> dict[str, AddedToken]:
        """The added tokens that are cut out of text: the user's, and the named specials only when parsed."""
        matched = {}
        for content, index in self._added_tokens_encoder.items():
            if parse_special_tokens or content not in self._named_special_texts:
                matched[content] = self._added_tokens_decoder[index]
        return matched

    def _lower_outside(self, text: str, keep: Iterable[str]) -> str:
        """`text` lower-cased except where it spells one of `keep` exactly (transformers 4.30's do_lower_case
        step, which ran before special tokens were looked for, so `<SOP>` could still become `<sop>`)."""

        def lower(part: str) -> str:  # one character at a time, as that step did: a final "Σ" becomes "σ"
            return "".join(c.lower() for c in part)

        keep = sorted({k for k in keep if k}, key=len, reverse=True)
        if not keep:
            return lower(text)
        pattern = re.compile("|".join(re.escape(k) for k in keep))
        out, start = [], 0
        for m in pattern.finditer(text):
            out += [lower(text[start:m.start()]), m.group(0)]
            start = m.end()
        out.append(lower(text[start:]))
        return "".join(out)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # transformers' own switch (e.g. its chat-template helpers): nothing is cut out of the text
        split_all = kwargs.pop("split_special_tokens", self.split_special_tokens)
        parse = kwargs.pop("parse_special_tokens", self.parse_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        matched = {} if split_all else self._matched_tokens(parse)
        if self.do_lower_case:
            text = self._lower_outside(text, list(matched) + [str(t) for t in self.all_special_tokens])
        return split_on_added_tokens(text, matched, self._tokenize)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._vocab.pieces(encode_whitespace(self.preprocess_text(text), self.max_blank_length))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return restore_whitespace(self._vocab.text([str(t) for t in tokens]), self.max_blank_length)

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
        pad_id = self.pad_token_id
        ids = [int(i) for i in token_ids if int(i) != pad_id]
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        # tokens added beyond the vocabulary are literal text, kept apart from the SentencePiece pieces
        literal = {tok.content for idx, tok in self._added_tokens_decoder.items() if idx >= self.vocab_size}
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in literal:
                if run:
                    parts.append(self.convert_tokens_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # -- special tokens --------------------------------------------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
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

    def pad(self, encoded_inputs: Any, *args: Any, **kwargs: Any):
        # transformers 5 sets ready-made [1, L, L] masks of a batch aside and stacks them unpadded; hand them to
        # `_pad` as nested lists instead, which pads them the way the official code did
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0].keys()}
        masks = encoded_inputs.get("attention_mask") if isinstance(encoded_inputs, Mapping) else None
        if isinstance(masks, list) and masks and getattr(masks[0], "ndim", 0) > 1:
            encoded_inputs = dict(encoded_inputs)
            encoded_inputs["attention_mask"] = [np.asarray(m).tolist() for m in masks]
        return super().pad(encoded_inputs, *args, **kwargs)

    def _pad(
        self,
        encoded_inputs: dict[str, Any],
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict[str, Any]:
        # return_attention_mask is ignored on purpose: the official tokenizer always returns the GLM mask here
        key = self.model_input_names[0]
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(encoded_inputs[key])
        if max_length is None:
            return encoded_inputs
        max_length = _round_up(max_length, pad_to_multiple_of)
        side = padding_side or self.padding_side
        if side != "left":
            raise ValueError("ChatGLM-6B's tokenizer pads on the left only (padding_side='left'); its attention "
                             "mask and position ids are built for left padding")
        length = max_length if padding_strategy != PaddingStrategy.DO_NOT_PAD else 0
        return fill_glm_features(
            encoded_inputs,
            length,
            bos_id=self.bos_token_id,
            mask_id=self.mask_token_id,
            gmask_id=self.gmask_token_id,
            pad_id=self.pad_token_id,
            key=key,
        )

    def official_masks(self, input_ids_list: Iterable[Iterable[Any]], **kwargs: Any) -> dict[str, np.ndarray]:
        """`official_masks` with this tokenizer's special ids."""
        return official_masks(input_ids_list, bos_id=self.bos_token_id, mask_id=self.mask_token_id,
                              gmask_id=self.gmask_token_id, pad_id=self.pad_token_id, **kwargs)

    # -- saving ------------------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        target = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        source = self.vocab_file
        if os.path.isfile(source):
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        else:
            with open(target, "wb") as f:
                f.write(self._vocab.sp.serialized_model_proto())
        return (target,)


def load_chatglm_tokenizer(folder: str | os.PathLike, **kwargs: Any) -> ChatGLMTokenizer:
    """The tokenizer of a ChatGLM-6B checkpoint folder (`ice_text.model` + optional `tokenizer_config.json`).

    The config's `tokenizer_class` and `auto_map` are ignored; nothing from the folder is imported or executed.
    `kwargs` override config values (e.g. `num_image_tokens`, `parse_special_tokens`). Raises FileNotFoundError
    without `ice_text.model`.
    """
    path = Path(folder)
    if not (path / VOCAB_FILE_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {VOCAB_FILE_NAME}, the ChatGLM-6B tokenizer's vocabulary")
    kwargs.setdefault("local_files_only", True)
    return ChatGLMTokenizer.from_pretrained(str(path), **kwargs)
