"""Cutting added tokens out of text, for glmtune's own (native ChatGLM) tokenizers.

transformers' slow-tokenizer machinery decides itself which added tokens it matches in text; the ChatGLM
tokenizers must decide it the way the official code did under transformers 4.30 (which tokens, and how the
whitespace around them goes), so they match with this helper instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from transformers.tokenization_utils_base import AddedToken


def split_on_added_tokens(text: str, tokens: Mapping[str, AddedToken], tokenize: Callable[[str], list[str]]
                          ) -> list[str]:
    """`text` as pieces: each of `tokens` written in it stays one piece, the text between goes to `tokenize`.
    A token's lstrip / rstrip removes the whitespace beside it, newlines and tabs included (str.strip, as
    transformers 4.30 did)."""
    if not tokens:
        return tokenize(text)
    from transformers.tokenization_python import Trie

    trie = Trie()
    for content in tokens:
        trie.add(content)
    chunks = trie.split(text)
    for i, chunk in enumerate(chunks):
        token = tokens.get(chunk)
        if token is None:
            continue
        if token.rstrip and i + 1 < len(chunks):
            chunks[i + 1] = chunks[i + 1].lstrip()
        if token.lstrip and i > 0:
            chunks[i - 1] = chunks[i - 1].rstrip()
    pieces: list[str] = []
    for chunk in chunks:
        if chunk in tokens:
            pieces.append(chunk)
        elif chunk:
            pieces.extend(tokenize(chunk))
    return pieces
