"""Words of a prompt and the token positions each occupies in the text encoder's input.

Works for CLIP's byte-level BPE (a word may span several tokens, marked by ``</w>`` at its end),
T5's SentencePiece (a word starts at a token beginning with ``▁``), GPT-2-style byte-level BPE (Qwen's:
a word starts at a token beginning with ``Ġ``, a space) and word-level tokenizers (one token per word).
Positions count the start token as 0, as the cross-attention keys do; a T5 or Qwen prompt has no start
token. :class:`TextKeys` lays out several tokenizers' tokens along one key sequence
(SD3's: CLIP's 77, then T5's).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    return _model_kind(tokenizer) == "BPE"


def _model_kind(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else type(backend.model).__name__


def _marks_word_starts(tokenizer: Any) -> bool:
    """Whether a BPE tokenizer marks a word's first token (GPT-2-style byte-level BPE, Qwen's: ``Ġ`` for the space
    before it) instead of its last (CLIP's ``</w>`` suffix)."""
    return _is_bpe(tokenizer) and not getattr(tokenizer.backend_tokenizer.model, "end_of_word_suffix", None)


def tokenize_words(tokenizer: Any, prompt: str, length: int | None = None) -> TokenizedPrompt:
    """Splits ``prompt`` into words and maps each to its token positions (padded to ``length`` tokens,
    default the tokenizer's ``model_max_length``).

    A textual-inversion embedding is one word, named by its token, over all its vectors' positions. A
    tokenizer with its own ``words_at_keys(prompt, length)`` (a family's text keys, e.g. a prompt inside a chat
    template) gives (tokens, words, positions, start, end) itself.
    """
    own = getattr(tokenizer, "words_at_keys", None)
    if own is not None:
        tokens, words, positions, start, end = own(prompt, length)
        return TokenizedPrompt(prompt, tuple(tokens), tuple(words), tuple(map(tuple, positions)), start, end)
    ids = tokenizer(
        expand_embeddings(tokenizer, prompt),
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    if _model_kind(tokenizer) == "Unigram":
        return _sentencepiece_words(tokenizer, prompt, ids)
    if _marks_word_starts(tokenizer):
        return _sentencepiece_words(tokenizer, prompt, ids, marker="Ġ")
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


def _sentencepiece_words(tokenizer: Any, prompt: str, ids: list[int], marker: str = "▁") -> TokenizedPrompt:
    """Words of a tokenization that marks a word's first token: a word starts at a token beginning with ``marker``
    (SentencePiece's ``▁``, T5; byte-level BPE's ``Ġ``, Qwen). The prompt ends at the first end or padding token
    (Qwen's tokenizer adds no end token)."""
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    groups: list[list[int]] = []
    for position in range(end):
        if tokens[position].startswith(marker) or not groups:
            groups.append([])
        groups[-1].append(position)
    groups = [g for g in groups if tokenizer.decode([ids[p] for p in g]).strip()]  # a lone "▁" is no word
    words = tuple(tokenizer.decode([ids[p] for p in g]).strip().lower() for g in groups)
    return TokenizedPrompt(prompt, tokens, words, tuple(tuple(g) for g in groups), 0, end)


@dataclass(frozen=True)
class TextKeys:
    """The text keys of a denoiser's attention as segments: (tokenizer, first key, length) each.

    A UNet's keys are one tokenizer's tokens; SD3's are CLIP's 77 then T5's; FLUX's are T5's. A word's
    positions are its positions in every segment (SD3: its CLIP and its T5 tokens); a segment without a
    tokenizer (None) holds keys of no word."""

    segments: tuple[tuple[Any, int, int], ...]

    @classmethod
    def of(cls, tokenizer: Any) -> TextKeys:
        return cls(((tokenizer, 0, int(tokenizer.model_max_length)),))

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[Any, int, int]]) -> TextKeys:
        return cls(tuple((tokenizer, int(first), int(length)) for tokenizer, first, length in segments))

    @property
    def length(self) -> int:
        """L: the number of text keys."""
        return max(first + length for _, first, length in self.segments)

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        """The prompt's words with their key positions over all segments (words in the first segment's order)."""
        parts = [
            (tokenize_words(tokenizer, prompt, length), first)
            for tokenizer, first, length in self.segments
            if tokenizer is not None  # keys without a tokenizer: SD3's zeros where it has no T5
        ]
        if len(parts) == 1 and parts[0][1] == 0:
            return parts[0][0]
        words: list[str] = []
        positions: dict[str, list[int]] = {}
        for tokenized, first in parts:
            for word, places in zip(tokenized.words, tokenized.positions):
                if word not in positions:
                    words.append(word)
                    positions[word] = []
                positions[word].extend(first + p for p in places)
        head, first = parts[0]
        tokens: list[str] = []
        for tokenized, offset in parts:
            tokens += [""] * (offset - len(tokens)) + list(tokenized.tokens)
        return TokenizedPrompt(
            prompt,
            tuple(tokens),
            tuple(words),
            tuple(tuple(positions[w]) for w in words),
            head.start + first,
            head.end + first,
        )
