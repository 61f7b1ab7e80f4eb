"""Words of a prompt and the token positions each occupies in the text encoder's input.

Works for CLIP's byte-level BPE (a word may span several tokens, marked by ``</w>`` at its end)
and for word-level tokenizers (one token per word). Positions count the start token as 0, as the
cross-attention keys do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from negprompt.errors import NegpromptError
from negprompt.models.embeddings import embedding_base, expand_embeddings


class WordError(NegpromptError):
    """A word that is not in the prompt."""


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt's tokens and its words, each word with its token positions (start token = 0)."""

    prompt: str
    tokens: tuple[str, ...]  # every position up to model_max_length, special tokens and padding included
    words: tuple[str, ...]
    positions: tuple[tuple[int, ...], ...]  # per word
    start: int  # position of the start token
    end: int  # position of the end token; padding follows

    def positions_of(self, word: str) -> tuple[int, ...]:
        """Token positions of ``word`` (case-insensitive; every occurrence); the error lists the words."""
        wanted = word.strip().lower()
        found = tuple(
            p for candidate, positions in zip(self.words, self.positions) if candidate == wanted for p in positions
        )
        if found:
            return found
        if wanted in ("<start>", "<end>"):
            return (self.start,) if wanted == "<start>" else (self.end,)
        available = ", ".join(repr(w) for w in self.words) or "none (empty prompt)"
        raise WordError(
            f"word {word!r} is not in the prompt {self.prompt!r}; its words are: {available} (or <start>, <end>)"
        )


def _is_word_end(token: str, tokenizer: Any) -> bool:
    return token.endswith("</w>") or not _is_bpe(tokenizer)


def _is_bpe(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "BPE"


def tokenize_words(tokenizer: Any, prompt: str) -> TokenizedPrompt:
    """Splits ``prompt`` into words and maps each to its token positions.

    A textual-inversion embedding is one word, named by its token, over all its vectors' positions.
    """
    ids = tokenizer(
        expand_embeddings(tokenizer, prompt),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    start = 0 if ids and ids[0] == tokenizer.bos_token_id else -1
    end = next(i for i in range(1, len(ids)) if ids[i] == tokenizer.eos_token_id)
    words: list[str] = []
    positions: list[tuple[int, ...]] = []
    current: list[int] = []
    words_in_progress = ""  # the embedding token whose vectors ``current`` holds, if any
    for position in range(start + 1, end):
        if ids[position] in special:
            continue
        embedding = embedding_base(tokenizer, tokens[position])
        if embedding is not None:  # an embedding's vectors: one word, ended by any token that does not continue it
            name, continues = embedding[0].lower(), embedding[1]
            if current and not (continues and words_in_progress == name):
                words.append(words_in_progress or tokenizer.decode([ids[p] for p in current]).strip().lower())
                positions.append(tuple(current))
                current = []
            current.append(position)
            words_in_progress = name
            continue
        if words_in_progress:
            words.append(words_in_progress)
            positions.append(tuple(current))
            current, words_in_progress = [], ""
        current.append(position)
        if _is_word_end(tokens[position], tokenizer):
            words.append(tokenizer.decode([ids[p] for p in current]).strip().lower())
            positions.append(tuple(current))
            current = []
    if current:  # an embedding before the end token, or a word cut by truncation
        words.append(words_in_progress or tokenizer.decode([ids[p] for p in current]).strip().lower())
        positions.append(tuple(current))
    return TokenizedPrompt(prompt, tokens, tuple(words), tuple(positions), max(start, 0), end)
